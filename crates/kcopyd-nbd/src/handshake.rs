//! The fixed newstyle handshake: TLS if asked for, structured replies, the `base:allocation`
//! metadata context, then `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`.
//!
//! ```text
//!  server ── NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE [| NO_ZEROES]) ──► client   (greet)
//!  client ── flags(C_FIXED_NEWSTYLE [| C_NO_ZEROES]) ──────────────────► server
//!  nbds:  client ── NBD_OPT_STARTTLS ──► ACK ─► TLS handshake; all that follows inside it
//!                                        error ─► ConnectError::TlsRefused (no plain text)
//!  client ── NBD_OPT_STRUCTURED_REPLY ──► ACK (or ERR_UNSUP: simple replies only)
//!  client ── NBD_OPT_SET_META_CONTEXT(export, "base:allocation") ──► META_CONTEXT id … ACK
//!  client ── NBD_OPT_GO(export, [NBD_INFO_BLOCK_SIZE]) ──► INFO(EXPORT: size, flags)
//!                                                          INFO(BLOCK_SIZE: min, preferred, max)
//!                                                          ACK ─► transmission phase
//! ```
//!
//! A plain-text client whose server answers `NBD_REP_ERR_TLS_REQD` (to any option) gets
//! [`ConnectError::TlsRequired`], naming the `nbds://` URI to use.
//!
//! Every reply is checked: the option it names, its type, its length; `base:allocation`
//! agreed with one id; `NBD_INFO_EXPORT` present and each item stated once (or identically
//! again); block sizes that keep the protocol's rules ([`check_block_sizes`]).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::ConnectError;
use crate::proto::*;
use crate::uri::with_tls_scheme;

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// The export's size.
    pub size_bytes: u64,
    /// `NBD_FLAG_*` transmission flags.
    pub transmission_flags: u16,
    /// Minimum block size (1 when the server states none).
    pub block_min_bytes: u32,
    /// Preferred block size (4096 when the server states none).
    pub block_preferred_bytes: u32,
    /// Maximum payload of one request ([`PAYLOAD_BYTES_DEFAULT_MAX`] when the server states none).
    pub block_max_bytes: u32,
    /// Whether the server sends structured replies.
    pub structured: bool,
    /// The id of the `base:allocation` context, when the server offers it.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub(crate) fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// Reads the server's greeting and sends the client's flags; `server` names the URI in errors.
pub(crate) async fn greet<R, W>(reader: &mut R, writer: &mut W, server: &str) -> Result<(), ConnectError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    Options { reader, writer, server, tls: false }.greeting().await
}

/// `NBD_OPT_STARTTLS`: returns when the server agreed, and the TLS handshake is to start on
/// the socket. `reader` must not buffer: the server's first TLS bytes are not for it.
pub(crate) async fn start_tls<R, W>(reader: &mut R, writer: &mut W, server: &str) -> Result<(), ConnectError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut options = Options { reader, writer, server, tls: true };
    options.send(NBD_OPT_STARTTLS, &[]).await?;
    let (reply, data) = options.reply(NBD_OPT_STARTTLS).await?;
    match reply {
        NBD_REP_ACK if data.is_empty() => Ok(()),
        _ if is_rep_error(reply) => Err(ConnectError::TlsRefused {
            server: server.to_owned(),
            reply: rep_error_name(reply),
            message: String::from_utf8_lossy(&data).into_owned(),
        }),
        _ => Err(options.protocol(format!(
            "reply {reply:#x} with {} bytes to NBD_OPT_STARTTLS (NBD_REP_ACK or an error expected)",
            data.len()
        ))),
    }
}

/// Runs the option haggling for `export` after the greeting (and, with `tls`, inside the
/// TLS session); `server` names the URI in errors.
pub(crate) async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    export: &str,
    (server, tls): (&str, bool),
) -> Result<ExportInfo, ConnectError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut options = Options { reader, writer, server, tls };
    let structured = options.structured_replies().await?;
    let base_allocation = if structured { options.meta_context(export).await? } else { None };
    let (size_bytes, transmission_flags, block_sizes) = options.go(export).await?;
    if transmission_flags & NBD_FLAG_HAS_FLAGS == 0 {
        return Err(options.protocol("transmission flags without NBD_FLAG_HAS_FLAGS".into()));
    }
    // Without NBD_INFO_BLOCK_SIZE: the protocol's defaults.
    let (block_min_bytes, block_preferred_bytes, block_max_bytes) =
        block_sizes.unwrap_or((1, 4096, PAYLOAD_BYTES_DEFAULT_MAX));
    check_block_sizes(block_min_bytes, block_preferred_bytes, block_max_bytes)
        .map_err(|broken| options.protocol(broken.to_string()))?;
    Ok(ExportInfo {
        size_bytes,
        transmission_flags,
        block_min_bytes,
        block_preferred_bytes,
        block_max_bytes,
        structured,
        base_allocation,
    })
}

/// What `NBD_OPT_GO` stated: size, transmission flags, block sizes if any.
type GoInfo = (u64, u16, Option<(u32, u32, u32)>);

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Options<'_, R, W> {
    fn protocol(&self, problem: String) -> ConnectError {
        ConnectError::Protocol { server: self.server.to_owned(), problem }
    }

    /// The server's greeting (fixed newstyle only) and the client's flags.
    async fn greeting(&mut self) -> Result<(), ConnectError> {
        let result = self.reader.read_u64().await;
        let magic = result.map_err(|e| self.io(e))?;
        if magic != NBDMAGIC {
            return Err(self.protocol(format!("not an NBD server (greeting {magic:#018x})")));
        }
        let result = self.reader.read_u64().await;
        if result.map_err(|e| self.io(e))? != IHAVEOPT {
            return Err(self.protocol("an oldstyle NBD server: only the fixed newstyle handshake is supported".into()));
        }
        let result = self.reader.read_u16().await;
        let handshake_flags = result.map_err(|e| self.io(e))?;
        if handshake_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("the server does not offer the fixed newstyle handshake".into()));
        }
        let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if handshake_flags & NBD_FLAG_NO_ZEROES != 0 {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        let result = self.writer.write_u32(client_flags).await;
        result.map_err(|e| self.io(e))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: whether the server agreed.
    async fn structured_replies(&mut self) -> Result<bool, ConnectError> {
        self.send(NBD_OPT_STRUCTURED_REPLY, &[]).await?;
        let (reply, data) = self.reply(NBD_OPT_STRUCTURED_REPLY).await?;
        match reply {
            NBD_REP_ACK if data.is_empty() => Ok(true),
            // An older server: simple replies only.
            _ if is_rep_error(reply) => Ok(false),
            _ => Err(self.protocol(format!(
                "reply {reply:#x} with {} bytes to NBD_OPT_STRUCTURED_REPLY (NBD_REP_ACK or an error expected)",
                data.len()
            ))),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`: its id, if the server offers it.
    async fn meta_context(&mut self, export: &str) -> Result<Option<u32>, ConnectError> {
        let mut data = Vec::new();
        put_string32(&mut data, export);
        data.extend_from_slice(&1u32.to_be_bytes());
        put_string32(&mut data, BASE_ALLOCATION);
        self.send(NBD_OPT_SET_META_CONTEXT, &data).await?;
        let mut base_allocation = None;
        loop {
            let (reply, data) = self.reply(NBD_OPT_SET_META_CONTEXT).await?;
            match reply {
                NBD_REP_META_CONTEXT if data.len() >= 4 => {
                    let id = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                    if &data[4..] == BASE_ALLOCATION.as_bytes() {
                        if base_allocation.is_some_and(|agreed| agreed != id) {
                            return Err(self.protocol(format!("{BASE_ALLOCATION} given two context ids")));
                        }
                        base_allocation = Some(id);
                    }
                    // Any other context (not asked for) is never used: block status for it is
                    // refused in transmission.
                }
                NBD_REP_ACK if data.is_empty() => return Ok(base_allocation),
                // Refused or unknown: the export simply has no block status.
                _ if is_rep_error(reply) => return Ok(None),
                _ => return Err(self.protocol(format!("reply {reply:#x} to NBD_OPT_SET_META_CONTEXT"))),
            }
        }
    }

    /// `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`: what the server states about the export.
    async fn go(&mut self, export: &str) -> Result<GoInfo, ConnectError> {
        let mut data = Vec::new();
        put_string32(&mut data, export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        self.send(NBD_OPT_GO, &data).await?;
        let (mut export_info, mut block_sizes) = (None, None);
        loop {
            let (reply, data) = self.reply(NBD_OPT_GO).await?;
            match reply {
                NBD_REP_INFO if data.len() >= 2 => self.info(&data, &mut export_info, &mut block_sizes)?,
                NBD_REP_ACK if data.is_empty() => break,
                _ if is_rep_error(reply) => {
                    return Err(ConnectError::OptionRefused {
                        server: self.server.to_owned(),
                        option: "NBD_OPT_GO",
                        reply: rep_error_name(reply),
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                _ => return Err(self.protocol(format!("reply {reply:#x} to NBD_OPT_GO"))),
            }
        }
        let (size_bytes, flags) =
            export_info.ok_or_else(|| self.protocol("NBD_OPT_GO ended without NBD_INFO_EXPORT".into()))?;
        Ok((size_bytes, flags, block_sizes))
    }

    /// One `NBD_REP_INFO`: the export's size and flags, or its block sizes, each stated once
    /// (or again the same).
    fn info(
        &self,
        data: &[u8],
        export_info: &mut Option<(u64, u16)>,
        block_sizes: &mut Option<(u32, u32, u32)>,
    ) -> Result<(), ConnectError> {
        match u16::from_be_bytes([data[0], data[1]]) {
            NBD_INFO_EXPORT if data.len() == 12 => {
                let size_bytes = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                let stated = (size_bytes, u16::from_be_bytes([data[10], data[11]]));
                if export_info.is_some_and(|before| before != stated) {
                    return Err(self.protocol("NBD_INFO_EXPORT sent twice, with different sizes or flags".into()));
                }
                *export_info = Some(stated);
            }
            NBD_INFO_BLOCK_SIZE if data.len() == 14 => {
                let word = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
                let stated = (word(2), word(6), word(10));
                if block_sizes.is_some_and(|before| before != stated) {
                    return Err(self.protocol("NBD_INFO_BLOCK_SIZE sent twice, with different sizes".into()));
                }
                *block_sizes = Some(stated);
            }
            info @ (NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE) => {
                return Err(self.protocol(format!("information item {info} of {} bytes", data.len())));
            }
            _ => {} // Information this client did not ask for, or does not use.
        }
        Ok(())
    }
}

/// The rules of `NBD_INFO_BLOCK_SIZE`: the minimum a power of two up to 64 KiB, the preferred
/// a power of two at least the minimum, the maximum at least the minimum and a multiple of it
/// (or `0xffffffff`).
///
/// Worked example: (1, 4096, 33554432) and (512, 4096, 0xffffffff) pass; (4096, 512, …) and
/// (512, 4096, 1000) do not.
pub(crate) fn check_block_sizes(min_bytes: u32, preferred_bytes: u32, max_bytes: u32) -> Result<(), BlockSizesBroken> {
    let rule = if !min_bytes.is_power_of_two() || min_bytes > 65536 {
        BlockSizeRule::Minimum
    } else if !preferred_bytes.is_power_of_two() || preferred_bytes < min_bytes {
        BlockSizeRule::Preferred
    } else if max_bytes < min_bytes || (max_bytes % min_bytes != 0 && max_bytes != u32::MAX) {
        BlockSizeRule::Maximum
    } else {
        return Ok(());
    };
    Err(BlockSizesBroken { min_bytes, preferred_bytes, max_bytes, rule })
}

/// Block sizes that break a rule of `NBD_INFO_BLOCK_SIZE` ([`check_block_sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block sizes minimum {min_bytes}, preferred {preferred_bytes}, maximum {max_bytes} break the protocol: {rule}")]
pub(crate) struct BlockSizesBroken {
    min_bytes: u32,
    preferred_bytes: u32,
    max_bytes: u32,
    rule: BlockSizeRule,
}

/// Which rule of [`check_block_sizes`] a server broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BlockSizeRule {
    #[error("the minimum is not a power of two up to 64 KiB")]
    Minimum,
    #[error("the preferred size is not a power of two at least the minimum")]
    Preferred,
    #[error("the maximum is not a multiple of the minimum")]
    Maximum,
}

/// Option requests and their replies.
struct Options<'a, R, W> {
    reader: &'a mut R,
    writer: &'a mut W,
    server: &'a str,
    /// Whether TLS was asked for (and, past `NBD_OPT_STARTTLS`, is in use).
    tls: bool,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Options<'_, R, W> {
    fn io(&self, source: std::io::Error) -> ConnectError {
        ConnectError::handshake_io(self.server, source)
    }

    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), ConnectError> {
        let mut message = Vec::with_capacity(16 + data.len());
        message.extend_from_slice(&IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&u32::try_from(data.len()).expect("option data fits 32 bits").to_be_bytes());
        message.extend_from_slice(data);
        let result = self.writer.write_all(&message).await;
        result.map_err(|e| self.io(e))?;
        let result = self.writer.flush().await;
        result.map_err(|e| self.io(e))
    }

    /// One reply to `option`: its type and data.
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ConnectError> {
        let mut header = [0u8; 20];
        let result = self.reader.read_exact(&mut header).await;
        result.map_err(|e| self.io(e))?;
        let protocol = |problem: String| ConnectError::Protocol { server: self.server.to_owned(), problem };
        let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
        let replied_to = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let reply = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let len_bytes = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        if magic != NBD_REP_MAGIC || replied_to != option {
            return Err(protocol(format!("malformed option reply (magic {magic:#x}, option {replied_to})")));
        }
        if len_bytes > OPTION_REPLY_BYTES_MAX {
            return Err(protocol(format!("an option reply of {len_bytes} bytes")));
        }
        if reply == NBD_REP_ERR_TLS_REQD {
            // Inside TLS the server has no reason to ask for it: a server that does is broken.
            return Err(match self.tls {
                false => {
                    ConnectError::TlsRequired { server: self.server.to_owned(), tls_uri: with_tls_scheme(self.server) }
                }
                true => protocol("NBD_REP_ERR_TLS_REQD although TLS was asked for".into()),
            });
        }
        let mut data = vec![0u8; len_bytes as usize];
        let result = self.reader.read_exact(&mut data).await;
        result.map_err(|e| self.io(e))?;
        Ok((reply, data))
    }
}

/// Appends a string with its 32-bit length in front.
fn put_string32(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&u32::try_from(text.len()).expect("names fit 32 bits").to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}
