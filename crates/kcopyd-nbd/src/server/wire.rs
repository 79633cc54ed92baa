//! What only the server side of the protocol needs, beside the constants it shares with the
//! client in `proto.rs`: the options and replies a client never sends or reads, command flags,
//! errno values, and the encoders of option replies and transmission replies.
//!
//! ```text
//!  option reply  NBD_REP_MAGIC u64 | option u32 | reply type u32 | length u32 | data
//!  simple        NBD_SIMPLE_REPLY_MAGIC u32 | errno u32 | cookie u64 | [read data]
//!  chunk         NBD_STRUCTURED_REPLY_MAGIC u32 | flags u16 | type u16 | cookie u64 | length u32 | payload
//! ```

use crate::proto::*;

// Options a client may send that this crate's client never does.
pub(crate) const NBD_OPT_EXPORT_NAME: u32 = 1;
pub(crate) const NBD_OPT_ABORT: u32 = 2;
pub(crate) const NBD_OPT_LIST: u32 = 3;
pub(crate) const NBD_OPT_INFO: u32 = 6;
pub(crate) const NBD_OPT_LIST_META_CONTEXT: u32 = 9;

// Option replies.
pub(crate) const NBD_REP_SERVER: u32 = 2;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub(crate) const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub(crate) const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub(crate) const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// Transmission flags the client does not look at.
pub(crate) const NBD_FLAG_SEND_FUA: u16 = 1 << 3;

// Command flags (NBD_CMD_FLAG_NO_HOLE, which the client sends too, is in `proto.rs`).
pub(crate) const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub(crate) const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// The generic error chunk (no offset).
pub(crate) const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// The errno values of the protocol (the same numbers as Linux's).
pub(crate) const NBD_EPERM: u32 = 1;
pub(crate) const NBD_EIO: u32 = 5;
pub(crate) const NBD_ENOMEM: u32 = 12;
pub(crate) const NBD_EINVAL: u32 = 22;
pub(crate) const NBD_ENOSPC: u32 = 28;
pub(crate) const NBD_EOVERFLOW: u32 = 75;
pub(crate) const NBD_ENOTSUP: u32 = 95;

/// The bytes of one option reply.
pub(crate) fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).expect("option replies are small").to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The 16-byte header of a simple reply.
pub(crate) fn simple_reply(errno: u32, cookie: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&errno.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header
}

/// The 20-byte header of a structured reply chunk carrying `len_bytes` of payload.
pub(crate) fn chunk_header(flags: u16, chunk_type: u16, cookie: u64, len_bytes: u32) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..20].copy_from_slice(&len_bytes.to_be_bytes());
    header
}

/// The payload of an error chunk: the errno, then a message of at most 4096 bytes (cut at a
/// character boundary).
pub(crate) fn error_payload(errno: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let mut out = Vec::with_capacity(6 + message.len());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The errno a device's error is sent as: its own where it has one the protocol names, else by
/// its kind, else `EIO`.
pub(crate) fn errno_of(error: &std::io::Error) -> u32 {
    use std::io::ErrorKind;
    if let Some(code) = error.raw_os_error() {
        let code = code as u32;
        if [NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP].contains(&code) {
            return code;
        }
    }
    match error.kind() {
        ErrorKind::InvalidInput => NBD_EINVAL,
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        ErrorKind::StorageFull => NBD_ENOSPC,
        ErrorKind::Unsupported => NBD_ENOTSUP,
        ErrorKind::OutOfMemory => NBD_ENOMEM,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_laid_out_as_the_protocol_says() {
        assert_eq!(simple_reply(22, 7), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
        let chunk = chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1, 520);
        assert_eq!(&chunk[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1]);
        assert_eq!(&chunk[16..], &520u32.to_be_bytes());
        let long = "é".repeat(3000);
        let payload = error_payload(NBD_EIO, &long);
        assert_eq!(u16::from_be_bytes([payload[4], payload[5]]) as usize, payload.len() - 6);
        assert!(payload.len() - 6 <= 4096 && std::str::from_utf8(&payload[6..]).is_ok());
        assert_eq!(option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]).len(), 20);
    }

    #[test]
    fn device_errors_map_to_protocol_errnos() {
        use std::io::{Error, ErrorKind};
        assert_eq!(errno_of(&Error::from_raw_os_error(28)), NBD_ENOSPC);
        assert_eq!(errno_of(&Error::from_raw_os_error(61)), NBD_EIO, "ENODATA is not the protocol's");
        assert_eq!(errno_of(&Error::new(ErrorKind::InvalidInput, "x")), NBD_EINVAL);
        assert_eq!(errno_of(&Error::other("x")), NBD_EIO);
    }
}
