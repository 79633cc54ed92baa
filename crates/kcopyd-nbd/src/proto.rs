//! The wire protocol, with the names of the NBD protocol document (`doc/proto.md` of the
//! reference implementation): magic numbers, option and command numbers, flags, and the
//! fixed layouts of requests and replies. Everything is big-endian.
//!
//! ```text
//!  handshake   server: NBDMAGIC IHAVEOPT u16 handshake flags      client: u32 client flags
//!  option      client: IHAVEOPT u32 option u32 length data
//!              server: NBD_REP_MAGIC u32 option u32 reply type u32 length data   (repeated)
//!  request     NBD_REQUEST_MAGIC u16 flags u16 type u64 cookie u64 offset u32 length [data]
//!  simple      NBD_SIMPLE_REPLY_MAGIC u32 error u64 cookie [data]
//!  structured  NBD_STRUCTURED_REPLY_MAGIC u16 flags u16 type u64 cookie u32 length payload
//! ```

// Handshake.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(crate) const NBD_OPT_STARTTLS: u32 = 5;
pub(crate) const NBD_OPT_GO: u32 = 7;
pub(crate) const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub(crate) const NBD_REP_ACK: u32 = 1;
pub(crate) const NBD_REP_INFO: u32 = 3;
pub(crate) const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;

/// Whether an option reply type is an error.
pub(crate) fn is_rep_error(reply: u32) -> bool {
    reply & NBD_REP_FLAG_ERROR != 0
}

/// The protocol's name of an option reply error.
pub(crate) fn rep_error_name(reply: u32) -> &'static str {
    match reply & !NBD_REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown NBD_REP_ERR",
    }
}

// Information items of NBD_OPT_GO.
pub(crate) const NBD_INFO_EXPORT: u16 = 0;
pub(crate) const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Requests.
pub(crate) const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const NBD_CMD_READ: u16 = 0;
pub(crate) const NBD_CMD_WRITE: u16 = 1;
pub(crate) const NBD_CMD_DISC: u16 = 2;
pub(crate) const NBD_CMD_FLUSH: u16 = 3;
pub(crate) const NBD_CMD_TRIM: u16 = 4;
pub(crate) const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// `NBD_CMD_WRITE_ZEROES` must leave the range allocated: without it the server may release
/// the range's storage (punch a hole), as long as it reads back as zeroes.
pub(crate) const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// The protocol's name of a command, for messages.
pub(crate) fn command_name(command: u16) -> &'static str {
    match command {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "an unknown NBD_CMD",
    }
}

// Replies.
pub(crate) const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(crate) const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const NBD_REPLY_TYPE_NONE: u16 = 0;
pub(crate) const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// Whether a structured reply chunk type is an error chunk.
pub(crate) fn is_reply_error(chunk_type: u16) -> bool {
    chunk_type & NBD_REPLY_TYPE_ERROR_BIT != 0
}

/// `base:allocation` block status flags.
pub(crate) const NBD_STATE_HOLE: u32 = 1 << 0;
pub(crate) const NBD_STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this client asks for.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";

/// The TCP port of `nbd://` URIs without one.
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// The largest payload of one read or write when the server states no maximum block size:
/// 32 MiB, the protocol document's default.
pub const PAYLOAD_BYTES_DEFAULT_MAX: u32 = 32 << 20;
/// The largest length of one write-zeroes, trim or block-status request this client sends:
/// 1 GiB, well inside the 32-bit length field and what both qemu-nbd and nbdkit accept.
pub const NO_PAYLOAD_BYTES_MAX: u32 = 1 << 30;
/// The most bytes of an option reply this client reads (a server sending more is broken).
pub(crate) const OPTION_REPLY_BYTES_MAX: u32 = 1 << 20;
/// The most bytes of a structured reply chunk without read data (errors, block status).
pub(crate) const CHUNK_BYTES_MAX: u32 = 1 << 24;

/// The header of one request, 28 bytes on the wire.
pub(crate) fn request_header(flags: u16, command: u16, cookie: u64, offset_bytes: u64, len_bytes: u32) -> [u8; 28] {
    let mut header = [0u8; 28];
    header[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..24].copy_from_slice(&offset_bytes.to_be_bytes());
    header[24..28].copy_from_slice(&len_bytes.to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout() {
        let header = request_header(0, NBD_CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(
            header,
            [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0]
        );
        assert!(is_rep_error(0x8000_0006) && rep_error_name(0x8000_0006) == "NBD_REP_ERR_UNKNOWN");
        assert!(is_reply_error(NBD_REPLY_TYPE_ERROR_OFFSET) && !is_reply_error(NBD_REPLY_TYPE_OFFSET_DATA));
    }
}
