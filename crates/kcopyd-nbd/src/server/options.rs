//! The server's side of the fixed newstyle handshake: the greeting, then every option a client
//! sends, answered one by one until `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) starts the
//! transmission phase, or `NBD_OPT_ABORT` (or anything broken) ends the connection.
//!
//! ```text
//!  ── NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE | NO_ZEROES) ──►   ◄── client flags (known bits only)
//!  ◄── IHAVEOPT option length data  (length ≤ OPTION_BYTES_MAX, at most OPTIONS_MAX options)
//!       STRUCTURED_REPLY ─► ACK              LIST ─► SERVER(name) ACK
//!       SET/LIST_META_CONTEXT ─► META_CONTEXT(1, "base:allocation")? ACK
//!       INFO/GO ─► INFO(EXPORT) INFO(BLOCK_SIZE) ACK  (GO: transmission)
//!       EXPORT_NAME ─► size, flags [, 124 zeroes]     (transmission)
//!       ABORT ─► ACK, close          anything else ─► ERR_UNSUP (data read and dropped)
//! ```
//!
//! Every option's data is checked against its layout to the byte: a length field that runs
//! past the option's end, or bytes left over, is answered with `NBD_REP_ERR_INVALID`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Export;
use super::wire::*;
use crate::proto::*;

/// The most bytes of one option's data this server reads: export names and context names are
/// at most 4096 bytes each; more is answered with `NBD_REP_ERR_TOO_BIG` and the connection
/// closed.
pub const OPTION_BYTES_MAX: u32 = 64 * 1024;
/// The most options one handshake may send before the server gives up on the client.
pub const OPTIONS_MAX: u32 = 1024;
/// The id of `base:allocation`, the one metadata context served.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on, for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Negotiated {
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured: bool,
    /// `base:allocation` selected (`NBD_OPT_SET_META_CONTEXT`).
    pub base_allocation: bool,
    /// The client asked for no zeroes after `NBD_OPT_EXPORT_NAME`'s reply.
    no_zeroes: bool,
}

fn invalid(problem: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, problem.into())
}

/// Runs the handshake: `Some` when the transmission phase starts, `None` when the client
/// aborted it.
///
/// # Errors
/// The socket failed or closed, or the client broke the protocol (the connection is then
/// dropped).
pub(crate) async fn negotiate<R, W>(reader: &mut R, writer: &mut W, export: &Export) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid(format!("unknown client flags {client_flags:#x}")));
    }
    let mut state = Negotiated { no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0, ..Negotiated::default() };
    for _ in 0..OPTIONS_MAX {
        let magic = reader.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(invalid(format!("option magic {magic:#018x}")));
        }
        let option = reader.read_u32().await?;
        let len_bytes = reader.read_u32().await?;
        if len_bytes > OPTION_BYTES_MAX {
            send(writer, option, NBD_REP_ERR_TOO_BIG, b"option data too long").await?;
            return Err(invalid(format!("an option of {len_bytes} bytes")));
        }
        let mut data = vec![0u8; len_bytes as usize];
        reader.read_exact(&mut data).await?;
        match option {
            NBD_OPT_EXPORT_NAME => return export_name(writer, export, &data, state).await.map(Some),
            NBD_OPT_ABORT => {
                // The client may close before reading it.
                let _ = send(writer, option, NBD_REP_ACK, &[]).await;
                return Ok(None);
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                if go(writer, export, option, &data).await? {
                    return Ok(Some(state));
                }
            }
            NBD_OPT_LIST => list(writer, export, &data).await?,
            NBD_OPT_STRUCTURED_REPLY if data.is_empty() => {
                state.structured = true;
                send(writer, option, NBD_REP_ACK, &[]).await?;
            }
            NBD_OPT_STRUCTURED_REPLY => send(writer, option, NBD_REP_ERR_INVALID, b"no data expected").await?,
            NBD_OPT_SET_META_CONTEXT | NBD_OPT_LIST_META_CONTEXT => {
                meta_context(writer, export, option, &data, &mut state).await?
            }
            _ => send(writer, option, NBD_REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
    Err(invalid(format!("more than {OPTIONS_MAX} options")))
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    writer.write_all(&option_reply(option, reply, data)).await?;
    writer.flush().await
}

/// Reads fields off an option's data, each checked against what is left.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    /// A string with its 32-bit length in front.
    fn string32(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

/// Whether `name` names the export: its name, or the empty default name.
fn names_export(export: &Export, name: &[u8]) -> bool {
    name.is_empty() || name == export.name.as_bytes()
}

/// `NBD_OPT_EXPORT_NAME`: no error can be sent, so an unknown name closes the connection.
async fn export_name<W: AsyncWrite + Unpin>(
    writer: &mut W,
    export: &Export,
    name: &[u8],
    state: Negotiated,
) -> io::Result<Negotiated> {
    if !names_export(export, name) {
        return Err(invalid("NBD_OPT_EXPORT_NAME of an unknown export"));
    }
    let mut reply = export.size_bytes.to_be_bytes().to_vec();
    reply.extend_from_slice(&export.flags.to_be_bytes());
    if !state.no_zeroes {
        reply.extend_from_slice(&[0u8; 124]);
    }
    writer.write_all(&reply).await?;
    writer.flush().await?;
    Ok(state)
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's size, flags and block sizes; whether the
/// transmission phase starts (a `GO` that succeeded).
async fn go<W: AsyncWrite + Unpin>(writer: &mut W, export: &Export, option: u32, data: &[u8]) -> io::Result<bool> {
    let mut fields = Fields(data);
    let parsed = fields.string32().and_then(|name| {
        let count = fields.u16()?;
        (0..count).try_for_each(|_| fields.u16().map(drop))?;
        fields.0.is_empty().then_some(name)
    });
    let Some(name) = parsed else {
        send(writer, option, NBD_REP_ERR_INVALID, b"malformed option data").await?;
        return Ok(false);
    };
    if !names_export(export, name) {
        send(writer, option, NBD_REP_ERR_UNKNOWN, b"no such export").await?;
        return Ok(false);
    }
    let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&export.size_bytes.to_be_bytes());
    info.extend_from_slice(&export.flags.to_be_bytes());
    send(writer, option, NBD_REP_INFO, &info).await?;
    // Sent whether asked or not (the protocol allows it): the minimum is the device's block.
    let mut sizes = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [export.block_bytes, export.block_preferred_bytes, export.payload_bytes_max] {
        sizes.extend_from_slice(&size.to_be_bytes());
    }
    send(writer, option, NBD_REP_INFO, &sizes).await?;
    send(writer, option, NBD_REP_ACK, &[]).await?;
    Ok(option == NBD_OPT_GO)
}

/// `NBD_OPT_LIST`: the one export.
async fn list<W: AsyncWrite + Unpin>(writer: &mut W, export: &Export, data: &[u8]) -> io::Result<()> {
    if !data.is_empty() {
        return send(writer, NBD_OPT_LIST, NBD_REP_ERR_INVALID, b"no data expected").await;
    }
    let mut name = (export.name.len() as u32).to_be_bytes().to_vec();
    name.extend_from_slice(export.name.as_bytes());
    send(writer, NBD_OPT_LIST, NBD_REP_SERVER, &name).await?;
    send(writer, NBD_OPT_LIST, NBD_REP_ACK, &[]).await
}

/// `NBD_OPT_SET_META_CONTEXT` (selects) and `NBD_OPT_LIST_META_CONTEXT` (only lists):
/// `base:allocation` is the one context; `base:` and an empty list of queries (listing only)
/// match it.
async fn meta_context<W: AsyncWrite + Unpin>(
    writer: &mut W,
    export: &Export,
    option: u32,
    data: &[u8],
    state: &mut Negotiated,
) -> io::Result<()> {
    let mut fields = Fields(data);
    let parsed = fields.string32().and_then(|name| {
        let count = fields.u32()?;
        let queries: Option<Vec<&[u8]>> = (0..count).map(|_| fields.string32()).collect();
        let queries = queries?;
        fields.0.is_empty().then_some((name, queries))
    });
    let Some((name, queries)) = parsed else {
        return send(writer, option, NBD_REP_ERR_INVALID, b"malformed option data").await;
    };
    let set = option == NBD_OPT_SET_META_CONTEXT;
    if set && !state.structured {
        return send(writer, option, NBD_REP_ERR_INVALID, b"structured replies must be negotiated first").await;
    }
    if !names_export(export, name) {
        return send(writer, option, NBD_REP_ERR_UNKNOWN, b"no such export").await;
    }
    let wanted = queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes() || (!set && *q == b"base:"));
    let matched = wanted || (!set && queries.is_empty());
    if set {
        state.base_allocation = matched;
    }
    if matched {
        let mut context = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        context.extend_from_slice(BASE_ALLOCATION.as_bytes());
        send(writer, option, NBD_REP_META_CONTEXT, &context).await?;
    }
    send(writer, option, NBD_REP_ACK, &[]).await
}
