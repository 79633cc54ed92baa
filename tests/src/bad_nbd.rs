//! A scriptable NBD server that breaks the protocol on purpose, one named [`Misbehaviour`] at
//! a time, so that the client is tested against buggy, old and hostile servers: not only the
//! well-behaved qemu-nbd and nbdkit of `nbd_servers`.
//!
//! ```text
//!  BadServer::start(test, Misbehaviour::ReadOverlap, data)
//!    unix socket in a scratch dir ─► accept thread ─► a thread per connection:
//!      greeting ─► options (STRUCTURED_REPLY, SET_META_CONTEXT, GO) ─► requests
//!      each step asks `misbehaviour` whether to do it right or wrong
//!    uri() ─► nbd+unix:///?socket=…      export data: what a correct server would send
//!  dropped: stops accepting, stalled connections wake up and close
//! ```
//!
//! Apart from its one misbehaviour the server is correct: fixed newstyle, structured replies,
//! `base:allocation` as context 1, minimum block size 1, reads answered with one data chunk,
//! writes and write-zeroes applied to its memory. [`Misbehaviour::expect`] says what the
//! client must make of each (docs/NBD.md lists them).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::fixtures::TempDir;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const FLAG_HAS_FLAGS: u16 = 1;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const DONE: u16 = 1;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_ERROR: u16 = (1 << 15) | 1;
const TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
const STATE_ZERO: u32 = 2;
const EIO: u32 = 5;
/// The context id this server gives `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;
/// The context id of the other context it announces unasked (as qemu's allocation depth).
const OTHER_CONTEXT_ID: u32 = 2;
/// Chunks of [`Misbehaviour::BlockStatusFlood`], and extents in each (16 MiB less 8 bytes:
/// the largest block-status chunk a client takes).
const FLOOD_CHUNKS: usize = 48;
const FLOOD_CHUNK_EXTENTS: usize = (1 << 21) - 1;
/// The bytes that fail with EIO under [`Misbehaviour::EioOnRange`].
pub const EIO_RANGE: std::ops::Range<u64> = 16384..20480;

/// What the client must make of a misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing wrong that matters: every byte copied (exit 0).
    Copied,
    /// The I/O fails and its range is reported (exit 1); nothing is taken as copied that the
    /// server did not send.
    Failed,
    /// The export is refused when it is opened, before anything is written (exit 2).
    Refused,
}

macro_rules! misbehaviours {
    ($($(#[doc = $doc:literal])* $name:ident => $expect:ident,)*) => {
        /// One way an NBD server breaks the protocol (or a legal oddity a client must handle).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Misbehaviour {
            $($(#[doc = $doc])* $name,)*
        }

        impl Misbehaviour {
            /// Every misbehaviour.
            pub const ALL: &'static [Misbehaviour] = &[$(Misbehaviour::$name,)*];

            /// What the client must do with it.
            pub fn expect(self) -> Expect {
                match self {
                    $(Misbehaviour::$name => Expect::$expect,)*
                }
            }

            /// Its doc line, for docs and messages.
            pub fn describe(self) -> &'static str {
                match self {
                    $(Misbehaviour::$name => concat!($($doc),*).trim_start(),)*
                }
            }
        }
    };
}

misbehaviours! {
    /// None: a correct server (the control case).
    WellBehaved => Copied,
    /// An HTTP server on the port: answers with an HTTP error instead of the NBD greeting.
    HttpServer => Refused,
    /// The greeting's magic is wrong.
    BadMagic => Refused,
    /// An oldstyle server (no option haggling).
    OldStyle => Refused,
    /// Handshake flags without NBD_FLAG_FIXED_NEWSTYLE.
    NoFixedNewstyle => Refused,
    /// The greeting stops after 10 bytes and the connection closes.
    TruncatedGreeting => Refused,
    /// The server closes the connection after the client's first option.
    CloseMidHandshake => Refused,
    /// The server stops answering after the greeting (connect timeout).
    StallInHandshake => Refused,
    /// NBD_REP_INFO in answer to NBD_OPT_STRUCTURED_REPLY.
    StructuredReplyWrongType => Refused,
    /// An option reply naming another option than the one asked.
    WrongOptionEchoed => Refused,
    /// An option reply claiming 2 GiB of data.
    OversizedOptionReply => Refused,
    /// An option reply with a wrong magic.
    OptionReplyBadMagic => Refused,
    /// NBD_OPT_GO refused with NBD_REP_ERR_UNKNOWN (a legal refusal: no such export).
    GoRefused => Refused,
    /// NBD_OPT_GO acknowledged without NBD_INFO_EXPORT.
    GoWithoutInfoExport => Refused,
    /// NBD_INFO_EXPORT sent twice with different sizes.
    InfoExportTwiceDiffering => Refused,
    /// NBD_INFO_BLOCK_SIZE of 10 bytes instead of 14.
    InfoBlockSizeMalformed => Refused,
    /// base:allocation given two different context ids.
    MetaContextTwoIds => Refused,
    /// Transmission flags without NBD_FLAG_HAS_FLAGS.
    NoHasFlags => Refused,
    /// Block sizes: minimum 4096 above preferred 512.
    MinAbovePreferred => Refused,
    /// Block sizes: minimum 1000, not a power of two.
    MinNotPowerOfTwo => Refused,
    /// Block sizes: maximum 512 below minimum 4096.
    MaxBelowMin => Refused,
    /// Block sizes: minimum 128 KiB, above the protocol's 64 KiB.
    MinTooLarge => Refused,
    /// A 1,000-byte export with minimum block size 1 (legal): every byte is copied.
    OddSizeMinOne => Copied,
    /// A 1,000-byte export with minimum block size 512: its last 488 bytes cannot be read.
    OddSizeMin512 => Refused,
    /// A 1,000-byte export (minimum block size 1) that never answers a read or write of its
    /// last, partial block (I/O timeout): those 488 bytes are reported.
    OddSizeStallTail => Failed,
    /// NBD_CMD_FLUSH answered after a second (legal, if slow).
    SlowFlush => Copied,
    /// Every read answered correctly after 300 ms (legal, if slow).
    SlowReads => Copied,
    /// An export of 0 bytes (legal): nothing to copy.
    SizeZero => Copied,
    /// An export of 2^64 - 1 bytes.
    SizeHuge => Refused,
    /// Multi-conn: the second connection sees another size.
    SizeChangesBetweenConnections => Refused,
    /// Multi-conn: the second connection states other block sizes.
    MultiConnDifferentBlockSizes => Refused,
    /// Multi-conn: the second connection states other transmission flags.
    MultiConnDifferentFlags => Refused,
    /// Multi-conn offered, but every further connection is closed at once (the first is used).
    MultiConnRefuseExtra => Copied,
    /// Structured replies refused (an old server, legal): simple replies only.
    SimpleRepliesOnly => Copied,
    /// A read reply in chunks out of order, the second half first (legal).
    ChunksOutOfOrder => Copied,
    /// Read replies describe each 512-byte run of zeroes as a hole chunk, the rest as data
    /// chunks, last first (legal: the holes read as zeroes, exactly their bytes).
    HolesForZeroes => Copied,
    /// A read reply that sends the first half twice and the second half never.
    ReadOverlap => Failed,
    /// A read reply that sends the first half only, then NBD_REPLY_FLAG_DONE.
    ReadGap => Failed,
    /// A read reply chunk that runs past the end of the request.
    ReadChunkBeyondRequest => Failed,
    /// The whole read reply sent twice in one reply.
    ReadDuplicateChunk => Failed,
    /// A read reply to the wrong cookie.
    ReadWrongCookie => Failed,
    /// A read reply to a cookie no request ever had.
    ReadUnknownCookie => Failed,
    /// A simple reply to a read after structured replies were agreed.
    SimpleReplyWhenStructured => Failed,
    /// Structured reply chunks after structured replies were refused.
    StructuredWhenNotAgreed => Failed,
    /// A read reply's data without NBD_REPLY_FLAG_DONE, then silence (I/O timeout).
    MissingDone => Failed,
    /// An endless stream of error chunks without NBD_REPLY_FLAG_DONE, 1 KiB each.
    EndlessChunks => Failed,
    /// A data chunk claiming 4 GiB.
    OversizedChunkLength => Failed,
    /// A hole chunk over bytes a data chunk of the same reply already sent.
    HoleOverlappingData => Failed,
    /// A hole chunk of 0 bytes.
    ZeroLengthHole => Failed,
    /// NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE.
    NoneWithoutDone => Failed,
    /// Block status for a context the client did not ask for (qemu:allocation-depth's id,
    /// where 2 reads as the zero bit).
    BlockStatusWrongContext => Failed,
    /// Two block-status chunks for base:allocation in one reply (zero first, then data).
    BlockStatusTwoChunks => Failed,
    /// A block-status extent that runs past the request, flagged zero, with another after it.
    BlockStatusBeyondRequest => Failed,
    /// The last block-status extent runs past the request (legal, as nbdkit does): cut at
    /// the request's end.
    BlockStatusLastExtentPastRequest => Copied,
    /// A block-status extent of 0 bytes.
    BlockStatusZeroLengthExtent => Failed,
    /// A flood of block status: 48 chunks of 16 MiB (two million 512-byte extents each) in
    /// one reply, 768 MiB for a client that keeps them.
    BlockStatusFlood => Failed,
    /// A block-status chunk with no extents.
    BlockStatusEmpty => Failed,
    /// A block-status extent with flags base:allocation does not define.
    BlockStatusUnknownFlags => Failed,
    /// An error chunk with errno 0.
    ErrnoZero => Failed,
    /// An EIO error chunk without NBD_REPLY_FLAG_DONE, then NBD_REPLY_TYPE_NONE with it
    /// (legal: the read fails with EIO).
    ErrorWithoutDone => Failed,
    /// Reads touching bytes 16384..20480 fail with EIO (legal: that range is reported).
    EioOnRange => Failed,
    /// An error chunk for an offset outside the request.
    ErrorOffsetOutsideRequest => Failed,
    /// Read requests are never answered (I/O timeout).
    StallBeforeReply => Failed,
    /// A read reply stops half-way through its data, the connection open (I/O timeout).
    StallMidPayload => Failed,
    /// A read reply stops half-way through its data and the connection closes.
    CloseMidReply => Failed,
    /// A correct read reply, one byte every 20 ms (I/O timeout).
    SlowDrip => Failed,
    /// Writes touching bytes 16384..20480 fail with EIO (legal: that range is reported).
    WriteEioOnRange => Failed,
    /// Write requests are read and never answered (I/O timeout).
    StallOnWrite => Failed,
    /// A write's reply to a cookie no request has.
    WriteReplyUnknownCookie => Failed,
}

impl Misbehaviour {
    /// The export's size as the server states it, for data of `data_bytes`.
    pub fn size_bytes(self, data_bytes: u64) -> u64 {
        match self {
            Misbehaviour::OddSizeMinOne | Misbehaviour::OddSizeMin512 | Misbehaviour::OddSizeStallTail => 1000,
            Misbehaviour::SizeZero => 0,
            Misbehaviour::SizeHuge => u64::MAX,
            _ => data_bytes,
        }
    }

    /// Whether it only shows in block status (sparse copies).
    pub fn is_block_status(self) -> bool {
        matches!(
            self,
            Misbehaviour::BlockStatusWrongContext
                | Misbehaviour::BlockStatusTwoChunks
                | Misbehaviour::BlockStatusBeyondRequest
                | Misbehaviour::BlockStatusLastExtentPastRequest
                | Misbehaviour::BlockStatusZeroLengthExtent
                | Misbehaviour::BlockStatusFlood
                | Misbehaviour::BlockStatusEmpty
                | Misbehaviour::BlockStatusUnknownFlags
        )
    }

    /// Whether it only shows when the export is written (a copy's target).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Misbehaviour::WriteEioOnRange | Misbehaviour::StallOnWrite | Misbehaviour::WriteReplyUnknownCookie
        )
    }

    fn multi_conn(self) -> bool {
        matches!(
            self,
            Misbehaviour::SizeChangesBetweenConnections
                | Misbehaviour::MultiConnDifferentBlockSizes
                | Misbehaviour::MultiConnDifferentFlags
                | Misbehaviour::MultiConnRefuseExtra
        )
    }
}

/// A running misbehaving server on a unix socket; stopped when dropped.
#[derive(Debug)]
pub struct BadServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    data: Arc<Mutex<Vec<u8>>>,
    /// Requests held so far (stalled, or a slow flush waiting): a test aims a signal at one.
    held: Arc<AtomicUsize>,
    accept: Option<thread::JoinHandle<()>>,
    _dir: TempDir,
}

impl BadServer {
    /// Starts a server misbehaving as `misbehaviour`, serving `data` (its export's bytes:
    /// what a correct server would send).
    pub fn start(test: &str, misbehaviour: Misbehaviour, data: Vec<u8>) -> BadServer {
        let dir = TempDir::new(&format!("{test}-{misbehaviour:?}"));
        let socket = dir.join("bad.sock");
        let listener = UnixListener::bind(&socket).expect("binding the server's socket");
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Mutex::new(data));
        let held = Arc::new(AtomicUsize::new(0));
        let (accept_stop, accept_data, accept_held) = (stop.clone(), data.clone(), held.clone());
        let accept = thread::spawn(move || {
            let connections = AtomicUsize::new(0);
            for stream in listener.incoming() {
                if accept_stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let index = connections.fetch_add(1, Ordering::AcqRel);
                let connection = Connection {
                    stream,
                    misbehaviour,
                    index,
                    data: accept_data.clone(),
                    stop: accept_stop.clone(),
                    held: accept_held.clone(),
                    structured: false,
                };
                thread::spawn(move || connection.serve());
            }
        });
        BadServer { socket, stop, data, held, accept: Some(accept), _dir: dir }
    }

    /// The export's URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// How many times the server has held a request so far (a stall, a slow flush): it is
    /// holding one from the moment this counts it.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The export's bytes now (writes applied).
    pub fn data(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for BadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop.
        let _ = UnixStream::connect(&self.socket);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// One connection's server side.
struct Connection {
    stream: UnixStream,
    misbehaviour: Misbehaviour,
    index: usize,
    data: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    structured: bool,
}

/// A request from the client.
struct Request {
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Connection {
    fn serve(mut self) {
        // A client that vanishes ends the connection: nothing to report.
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(60)));
        if self.handshake().is_ok() {
            let _ = self.transmission();
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn read_exact<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut bytes = [0u8; N];
        self.stream.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    /// Sleeps until the server is dropped (at most a minute): a stalled server.
    fn stall(&self) -> io::Result<()> {
        self.held.fetch_add(1, Ordering::AcqRel);
        for _ in 0..600 {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::other("stalled"))
    }

    fn greeting(&mut self) -> io::Result<()> {
        use Misbehaviour::*;
        let mut greeting = Vec::new();
        match self.misbehaviour {
            HttpServer => {
                // As an HTTP server answers a request it cannot parse.
                self.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Err(io::Error::other("not NBD"));
            }
            BadMagic => greeting.extend_from_slice(&0x4e42_444d_4147_4943_u64.wrapping_add(1).to_be_bytes()),
            _ => greeting.extend_from_slice(&NBDMAGIC.to_be_bytes()),
        }
        match self.misbehaviour {
            OldStyle => {
                greeting.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
                greeting.extend_from_slice(&65536u64.to_be_bytes());
                greeting.extend_from_slice(&[0, 0, 0, 1]);
                greeting.extend_from_slice(&[0; 124]);
            }
            _ => greeting.extend_from_slice(&IHAVEOPT.to_be_bytes()),
        }
        let handshake_flags: u16 = if self.misbehaviour == NoFixedNewstyle { 0 } else { 3 };
        greeting.extend_from_slice(&handshake_flags.to_be_bytes());
        if self.misbehaviour == TruncatedGreeting {
            greeting.truncate(10);
            self.write(&greeting)?;
            return Err(io::Error::other("truncated"));
        }
        self.write(&greeting)?;
        let _client_flags: [u8; 4] = self.read_exact()?;
        if self.misbehaviour == StallInHandshake {
            self.stall()?;
        }
        Ok(())
    }

    fn option_reply(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        let magic = if self.misbehaviour == Misbehaviour::OptionReplyBadMagic { REP_MAGIC ^ 1 } else { REP_MAGIC };
        let mut message = Vec::with_capacity(20 + data.len());
        message.extend_from_slice(&magic.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&reply.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.write(&message)
    }

    fn handshake(&mut self) -> io::Result<()> {
        use Misbehaviour::*;
        if self.index > 0 && self.misbehaviour == MultiConnRefuseExtra {
            return Err(io::Error::other("refused"));
        }
        self.greeting()?;
        loop {
            let magic = u64::from_be_bytes(self.read_exact()?);
            let option = u32::from_be_bytes(self.read_exact()?);
            let len = u32::from_be_bytes(self.read_exact()?);
            if magic != IHAVEOPT || len > 65536 {
                return Err(io::Error::other("bad option"));
            }
            let mut data = vec![0u8; len as usize];
            self.stream.read_exact(&mut data)?;
            if self.misbehaviour == CloseMidHandshake {
                return Err(io::Error::other("closed"));
            }
            match option {
                OPT_STRUCTURED_REPLY => self.structured_reply_option()?,
                OPT_SET_META_CONTEXT => self.meta_context_option()?,
                OPT_GO => return self.go_option(),
                _ => self.option_reply(option, REP_ERR_UNSUP, &[])?,
            }
        }
    }

    fn structured_reply_option(&mut self) -> io::Result<()> {
        use Misbehaviour::*;
        match self.misbehaviour {
            StructuredReplyWrongType => self.option_reply(OPT_STRUCTURED_REPLY, REP_INFO, &[]),
            WrongOptionEchoed => self.option_reply(99, REP_ACK, &[]),
            OversizedOptionReply => {
                let mut header = Vec::new();
                header.extend_from_slice(&REP_MAGIC.to_be_bytes());
                header.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
                header.extend_from_slice(&REP_ACK.to_be_bytes());
                header.extend_from_slice(&0x8000_0000u32.to_be_bytes());
                self.write(&header)?;
                self.stall()
            }
            SimpleRepliesOnly | StructuredWhenNotAgreed => self.option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
            _ => {
                self.structured = true;
                self.option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
            }
        }
    }

    fn meta_context_option(&mut self) -> io::Result<()> {
        let context = |id: u32, name: &str| [&id.to_be_bytes()[..], name.as_bytes()].concat();
        self.option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &context(BASE_ALLOCATION_ID, "base:allocation"))?;
        match self.misbehaviour {
            Misbehaviour::MetaContextTwoIds => {
                self.option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &context(7, "base:allocation"))?;
            }
            Misbehaviour::BlockStatusWrongContext => {
                let other = context(OTHER_CONTEXT_ID, "qemu:allocation-depth");
                self.option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &other)?;
            }
            _ => {}
        }
        self.option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[])
    }

    /// The block sizes stated: (minimum, preferred, maximum).
    fn block_sizes(&self) -> (u32, u32, u32) {
        use Misbehaviour::*;
        match self.misbehaviour {
            MinAbovePreferred => (4096, 512, 1 << 20),
            MinNotPowerOfTwo => (1000, 4096, 1 << 20),
            MaxBelowMin => (4096, 4096, 512),
            MinTooLarge => (128 << 10, 128 << 10, 1 << 20),
            OddSizeMin512 => (512, 4096, 1 << 20),
            MultiConnDifferentBlockSizes if self.index > 0 => (512, 4096, 65536),
            _ => (1, 4096, 32 << 20),
        }
    }

    fn transmission_flags(&self) -> u16 {
        use Misbehaviour::*;
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES;
        if self.misbehaviour.multi_conn() {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        match self.misbehaviour {
            NoHasFlags => flags & !FLAG_HAS_FLAGS,
            MultiConnDifferentFlags if self.index > 0 => flags & !FLAG_SEND_WRITE_ZEROES,
            _ => flags,
        }
    }

    fn go_option(&mut self) -> io::Result<()> {
        use Misbehaviour::*;
        if self.misbehaviour == GoRefused {
            return self.option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export");
        }
        let data_bytes = self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        let mut size = self.misbehaviour.size_bytes(data_bytes);
        if self.misbehaviour == SizeChangesBetweenConnections && self.index > 0 {
            size += 4096;
        }
        let export =
            |size: u64, flags: u16| [&0u16.to_be_bytes()[..], &size.to_be_bytes(), &flags.to_be_bytes()].concat();
        let flags = self.transmission_flags();
        if self.misbehaviour != GoWithoutInfoExport {
            self.option_reply(OPT_GO, REP_INFO, &export(size, flags))?;
        }
        if self.misbehaviour == InfoExportTwiceDiffering {
            self.option_reply(OPT_GO, REP_INFO, &export(size * 2, flags))?;
        }
        let (min, preferred, max) = self.block_sizes();
        let mut block =
            [&3u16.to_be_bytes()[..], &min.to_be_bytes(), &preferred.to_be_bytes(), &max.to_be_bytes()].concat();
        if self.misbehaviour == InfoBlockSizeMalformed {
            block.truncate(10);
        }
        self.option_reply(OPT_GO, REP_INFO, &block)?;
        self.option_reply(OPT_GO, REP_ACK, &[])
    }

    fn read_request(&mut self) -> io::Result<Request> {
        let header: [u8; 28] = self.read_exact()?;
        let word = |at: usize, len: usize| header[at..at + len].iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
        if word(0, 4) as u32 != REQUEST_MAGIC {
            return Err(io::Error::other("bad request magic"));
        }
        Ok(Request { command: word(6, 2) as u16, cookie: word(8, 8), offset: word(16, 8), len: word(24, 4) as u32 })
    }

    fn transmission(&mut self) -> io::Result<()> {
        loop {
            let request = self.read_request()?;
            match request.command {
                CMD_DISC => return Ok(()),
                CMD_READ => self.read_reply(&request)?,
                CMD_BLOCK_STATUS => self.block_status_reply(&request)?,
                CMD_WRITE => self.write_reply(&request)?,
                CMD_FLUSH if self.misbehaviour == Misbehaviour::SlowFlush => {
                    self.held.fetch_add(1, Ordering::AcqRel);
                    thread::sleep(Duration::from_secs(1));
                    self.simple_reply(request.cookie, 0, &[])?;
                }
                CMD_WRITE_ZEROES => {
                    self.apply(request.offset, &vec![0; request.len as usize]);
                    self.simple_reply(request.cookie, 0, &[])?;
                }
                _ => self.simple_reply(request.cookie, 0, &[])?,
            }
        }
    }

    fn write_reply(&mut self, request: &Request) -> io::Result<()> {
        use Misbehaviour::*;
        let mut payload = vec![0u8; request.len as usize];
        self.stream.read_exact(&mut payload)?;
        let (offset, end) = (request.offset, request.offset + u64::from(request.len));
        match self.misbehaviour {
            WriteEioOnRange if offset < EIO_RANGE.end && end > EIO_RANGE.start => {
                self.simple_reply(request.cookie, EIO, &[])
            }
            StallOnWrite => self.stall(),
            OddSizeStallTail if request.len % 512 != 0 => self.stall(),
            WriteReplyUnknownCookie => {
                self.apply(offset, &payload);
                self.simple_reply(request.cookie ^ (1 << 40), 0, &[])
            }
            _ => {
                self.apply(offset, &payload);
                self.simple_reply(request.cookie, 0, &[])
            }
        }
    }

    fn apply(&self, offset: u64, bytes: &[u8]) {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let end = (offset as usize + bytes.len()).min(data.len());
        if (offset as usize) < end {
            data[offset as usize..end].copy_from_slice(&bytes[..end - offset as usize]);
        }
    }

    /// The export's bytes of `offset..offset + len` (zeroes past the data).
    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        (offset..offset + len).map(|at| data.get(at as usize).copied().unwrap_or(0)).collect()
    }

    fn simple_reply(&mut self, cookie: u64, errno: u32, data: &[u8]) -> io::Result<()> {
        let message = [&SIMPLE_MAGIC.to_be_bytes()[..], &errno.to_be_bytes(), &cookie.to_be_bytes(), data].concat();
        self.write(&message)
    }

    fn chunk(&mut self, flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) -> io::Result<()> {
        let header = [
            &STRUCTURED_MAGIC.to_be_bytes()[..],
            &flags.to_be_bytes(),
            &chunk_type.to_be_bytes(),
            &cookie.to_be_bytes(),
            &(payload.len() as u32).to_be_bytes(),
        ]
        .concat();
        self.write(&[header, payload.to_vec()].concat())
    }

    /// An OFFSET_DATA chunk of the export's bytes `offset..offset + len`.
    fn data_chunk(&mut self, flags: u16, cookie: u64, offset: u64, len: u64) -> io::Result<()> {
        let payload = [&offset.to_be_bytes()[..], &self.bytes(offset, len)].concat();
        self.chunk(flags, TYPE_OFFSET_DATA, cookie, &payload)
    }

    fn error_chunk(&mut self, flags: u16, cookie: u64, errno: u32, offset: Option<u64>) -> io::Result<()> {
        let message = b"injected";
        let mut payload = [&errno.to_be_bytes()[..], &(message.len() as u16).to_be_bytes(), message].concat();
        let chunk_type = match offset {
            Some(offset) => {
                payload.extend_from_slice(&offset.to_be_bytes());
                TYPE_ERROR_OFFSET
            }
            None => TYPE_ERROR,
        };
        self.chunk(flags, chunk_type, cookie, &payload)
    }

    fn read_reply(&mut self, request: &Request) -> io::Result<()> {
        use Misbehaviour::*;
        let (cookie, offset, len) = (request.cookie, request.offset, u64::from(request.len));
        let half = len / 2;
        match self.misbehaviour {
            OddSizeStallTail if len % 512 != 0 => self.stall(),
            SlowReads => {
                self.held.fetch_add(1, Ordering::AcqRel);
                thread::sleep(Duration::from_millis(300));
                self.data_chunk(DONE, cookie, offset, len)
            }
            SimpleRepliesOnly | SimpleReplyWhenStructured => {
                let data = self.bytes(offset, len);
                self.simple_reply(cookie, 0, &data)
            }
            ChunksOutOfOrder => {
                self.data_chunk(0, cookie, offset + half, len - half)?;
                self.data_chunk(DONE, cookie, offset, half)
            }
            HolesForZeroes => self.holes_for_zeroes(request),
            ReadOverlap => {
                self.data_chunk(0, cookie, offset, half)?;
                self.data_chunk(DONE, cookie, offset, half)
            }
            ReadGap => self.data_chunk(DONE, cookie, offset, half),
            ReadChunkBeyondRequest => self.data_chunk(DONE, cookie, offset + half, len),
            ReadDuplicateChunk => {
                self.data_chunk(0, cookie, offset, len)?;
                self.data_chunk(DONE, cookie, offset, len)
            }
            ReadWrongCookie => self.data_chunk(DONE, cookie + 1, offset, len),
            ReadUnknownCookie => self.data_chunk(DONE, u64::MAX - 7, offset, len),
            MissingDone => {
                self.data_chunk(0, cookie, offset, len)?;
                self.stall()
            }
            EndlessChunks => loop {
                let payload = [&EIO.to_be_bytes()[..], &1000u16.to_be_bytes(), &[b'x'; 1000]].concat();
                self.chunk(0, TYPE_ERROR, cookie, &payload)?;
            },
            OversizedChunkLength => {
                let header = [
                    &STRUCTURED_MAGIC.to_be_bytes()[..],
                    &DONE.to_be_bytes(),
                    &TYPE_OFFSET_DATA.to_be_bytes(),
                    &cookie.to_be_bytes(),
                    &0xffff_fff0u32.to_be_bytes(),
                    &offset.to_be_bytes(),
                ]
                .concat();
                self.write(&header)?;
                self.stall()
            }
            HoleOverlappingData => {
                self.data_chunk(0, cookie, offset, len)?;
                let hole = [&(offset + half).to_be_bytes()[..], &((len - half) as u32).to_be_bytes()].concat();
                self.chunk(DONE, TYPE_OFFSET_HOLE, cookie, &hole)
            }
            ZeroLengthHole => {
                let hole = [&offset.to_be_bytes()[..], &0u32.to_be_bytes()].concat();
                self.chunk(0, TYPE_OFFSET_HOLE, cookie, &hole)?;
                self.data_chunk(DONE, cookie, offset, len)
            }
            NoneWithoutDone => {
                self.data_chunk(0, cookie, offset, len)?;
                self.chunk(0, TYPE_NONE, cookie, &[])?;
                self.chunk(DONE, TYPE_NONE, cookie, &[])
            }
            _ => self.read_reply_more(request),
        }
    }

    /// A read reply of data and hole chunks, 512 bytes each, in reverse order.
    fn holes_for_zeroes(&mut self, request: &Request) -> io::Result<()> {
        let (cookie, offset, len) = (request.cookie, request.offset, u64::from(request.len));
        let pieces: Vec<u64> = (0..len.div_ceil(512)).map(|i| offset + i * 512).rev().collect();
        for (index, &at) in pieces.iter().enumerate() {
            let piece = (offset + len - at).min(512);
            let flags = if index + 1 == pieces.len() { DONE } else { 0 };
            if self.bytes(at, piece).iter().all(|&b| b == 0) {
                let hole = [&at.to_be_bytes()[..], &(piece as u32).to_be_bytes()].concat();
                self.chunk(flags, TYPE_OFFSET_HOLE, cookie, &hole)?;
            } else {
                self.data_chunk(flags, cookie, at, piece)?;
            }
        }
        Ok(())
    }

    fn read_reply_more(&mut self, request: &Request) -> io::Result<()> {
        use Misbehaviour::*;
        let (cookie, offset, len) = (request.cookie, request.offset, u64::from(request.len));
        match self.misbehaviour {
            ErrnoZero => self.error_chunk(DONE, cookie, 0, None),
            ErrorWithoutDone => {
                self.error_chunk(0, cookie, EIO, None)?;
                self.chunk(DONE, TYPE_NONE, cookie, &[])
            }
            EioOnRange if offset < EIO_RANGE.end && offset + len > EIO_RANGE.start => {
                self.error_chunk(DONE, cookie, EIO, Some(offset.max(EIO_RANGE.start)))
            }
            ErrorOffsetOutsideRequest => self.error_chunk(DONE, cookie, EIO, Some(offset + len + 4096)),
            StallBeforeReply => self.stall(),
            StallMidPayload | CloseMidReply => {
                let payload = [&offset.to_be_bytes()[..], &self.bytes(offset, len / 2)].concat();
                let header = [
                    &STRUCTURED_MAGIC.to_be_bytes()[..],
                    &DONE.to_be_bytes(),
                    &TYPE_OFFSET_DATA.to_be_bytes(),
                    &cookie.to_be_bytes(),
                    &((len + 8) as u32).to_be_bytes(),
                ]
                .concat();
                self.write(&[header, payload].concat())?;
                if self.misbehaviour == StallMidPayload { self.stall() } else { Err(io::Error::other("closed")) }
            }
            SlowDrip => {
                let payload = [&offset.to_be_bytes()[..], &self.bytes(offset, len)].concat();
                let header = [
                    &STRUCTURED_MAGIC.to_be_bytes()[..],
                    &DONE.to_be_bytes(),
                    &TYPE_OFFSET_DATA.to_be_bytes(),
                    &cookie.to_be_bytes(),
                    &(payload.len() as u32).to_be_bytes(),
                ]
                .concat();
                for byte in [header, payload].concat() {
                    if self.stop.load(Ordering::Acquire) {
                        return Err(io::Error::other("stopped"));
                    }
                    self.write(&[byte])?;
                    thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
            _ if self.structured || self.misbehaviour == StructuredWhenNotAgreed => {
                self.data_chunk(DONE, cookie, offset, len)
            }
            _ => {
                let data = self.bytes(offset, len);
                self.simple_reply(cookie, 0, &data)
            }
        }
    }

    fn block_status_reply(&mut self, request: &Request) -> io::Result<()> {
        use Misbehaviour::*;
        let (cookie, len) = (request.cookie, request.len);
        let half = len / 2;
        let chunk = |id: u32, extents: &[(u32, u32)]| {
            let mut payload = id.to_be_bytes().to_vec();
            for (len, flags) in extents {
                payload.extend_from_slice(&len.to_be_bytes());
                payload.extend_from_slice(&flags.to_be_bytes());
            }
            payload
        };
        let id = BASE_ALLOCATION_ID;
        match self.misbehaviour {
            BlockStatusWrongContext => {
                self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(OTHER_CONTEXT_ID, &[(len, 2)]))
            }
            BlockStatusTwoChunks => {
                self.chunk(0, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[(half, STATE_ZERO)]))?;
                self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[(len - half, 0)]))
            }
            BlockStatusBeyondRequest => {
                let extents = [(len.saturating_mul(2), STATE_ZERO), (512, 0)];
                self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &extents))
            }
            BlockStatusLastExtentPastRequest => {
                self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[(half, 0), (len, 0)]))
            }
            BlockStatusZeroLengthExtent => {
                self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[(0, 0), (len, STATE_ZERO)]))
            }
            BlockStatusEmpty => self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[])),
            BlockStatusFlood => {
                let extents = vec![(512, 0); FLOOD_CHUNK_EXTENTS];
                let payload = chunk(id, &extents);
                for index in 0..FLOOD_CHUNKS {
                    let flags = if index + 1 == FLOOD_CHUNKS { DONE } else { 0 };
                    self.chunk(flags, TYPE_BLOCK_STATUS, cookie, &payload)?;
                }
                Ok(())
            }
            BlockStatusUnknownFlags => {
                self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[(len, 0x80 | STATE_ZERO)]))
            }
            _ => self.chunk(DONE, TYPE_BLOCK_STATUS, cookie, &chunk(id, &[(len, 0)])),
        }
    }
}
