//! The NBD wire format as a client sees it, sans-IO: constants, the fixed-newstyle
//! greeting, the options a client sends (`NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`) and the server's option replies, the
//! transmission request and the headers of simple and structured replies.
//!
//! Every function here works on byte slices the caller already holds; nothing reads a
//! socket. A length that comes from the server is checked against a fixed cap before
//! the caller may allocate or read that many bytes (see [`parse_option_reply_header`]).
//! The validation of whole replies (which chunk may say what) is in
//! [`super::reply`].

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Every option error reply has bit 31 set.
pub const REP_ERR_BIT: u32 = 1 << 31;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Every error chunk type has bit 15 set.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// The NBD error value a server uses while it shuts down.
pub const ESHUTDOWN: u32 = 108;

/// Longest string the protocol allows (export names, context names, messages).
pub const MAX_STRING: usize = 4096;
/// Largest option reply we accept (QEMU's are a few dozen bytes).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most replies we accept to one option (contexts granted, infos sent).
pub const MAX_OPTION_REPLIES: usize = 256;
/// Largest export size we accept: what an `off_t` (and QEMU) can address.
pub const MAX_EXPORT_SIZE: u64 = u64::MAX >> 1;

pub const GREETING_LEN: usize = 18;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;

/// What the server sent that the protocol (or our caps) forbids. Any of these means
/// the byte stream can no longer be trusted: the connection is dropped.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("Bad {what} magic {got:#x}")]
    Magic { what: &'static str, got: u64 },
    #[error("Server does not speak fixed newstyle (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    #[error("Reply to option {got} where option {sent} was sent")]
    WrongOption { sent: u32, got: u32 },
    #[error("{what} of {len} bytes is over the {max}-byte limit")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is malformed: {len} bytes")]
    Malformed { what: &'static str, len: usize },
    #[error("More than {MAX_OPTION_REPLIES} replies to one option")]
    TooManyReplies,
    #[error("Unexpected option reply type {kind:#x} to option {opt}")]
    UnexpectedOptionReply { opt: u32, kind: u32 },
    #[error("Metadata context id {0} granted twice")]
    DuplicateContext(u32),
    #[error("Metadata context name is not UTF-8")]
    ContextName,
    #[error("Export size {0} is over the limit")]
    ExportSize(u64),
    #[error("Block size constraints {min}/{preferred}/{max} are inconsistent")]
    BlockSize { min: u32, preferred: u32, max: u32 },
    #[error("Server accepted NBD_OPT_GO without sending the export size")]
    NoExportInfo,
    #[error("Reply cookie {got:#x} where {expected:#x} was sent")]
    WrongCookie { expected: u64, got: u64 },
    #[error("Unexpected reply chunk type {kind} (length {len})")]
    UnexpectedChunk { kind: u16, len: u32 },
    #[error("Chunk of {len} bytes at {offset} lies outside the request ({req_len} bytes at {req_offset})")]
    OutsideRequest {
        offset: u64,
        len: u64,
        req_offset: u64,
        req_len: u64,
    },
    #[error("Chunk of {len} bytes at {offset} overlaps an earlier chunk")]
    Overlap { offset: u64, len: u64 },
    #[error("Read reply scattered in too many pieces")]
    TooFragmented,
    #[error("Reply ended after {got} of {want} bytes")]
    Incomplete { got: u64, want: u64 },
    #[error("Zero-length {0}")]
    ZeroLength(&'static str),
    #[error("Error chunk with error value 0")]
    ZeroError,
    #[error("Too many error chunks in one reply")]
    TooManyErrors,
    #[error("Block status for context {0}, which was not negotiated")]
    UnknownContext(u32),
    #[error("Block status for context {0} sent twice in one reply")]
    RepeatedContext(u32),
    #[error("Block status reply lacks context {0}")]
    MissingContext(u32),
    #[error("Extent starts at {offset}, past the end of the request at {end}")]
    ExtentBeyondRequest { offset: u64, end: u64 },
    #[error("Simple reply without error to a request that needs a structured reply")]
    SimpleSuccess,
}

pub(crate) fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(s))
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(s))
}

/// The server's greeting: NBDMAGIC, IHAVEOPT and the handshake flags, which must
/// include fixed newstyle (oldstyle servers fail here on the second magic).
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    let magic = be_u64(b, 0).unwrap_or_default();
    if magic != NBDMAGIC {
        return Err(ProtoError::Magic {
            what: "greeting",
            got: magic,
        });
    }
    let opt = be_u64(b, 8).unwrap_or_default();
    if opt != IHAVEOPT {
        return Err(ProtoError::Magic {
            what: "newstyle",
            got: opt,
        });
    }
    let flags = be_u16(b, 16).unwrap_or_default();
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// The client flags answering `server_flags`: fixed newstyle, and no zeroes only when
/// the server offers it (the spec forbids setting it otherwise).
pub fn client_flags(server_flags: u16) -> u32 {
    let mut f = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        f |= FLAG_C_NO_ZEROES;
    }
    f
}

/// Why a name we were asked to send cannot go on the wire.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{0} is longer than {MAX_STRING} bytes")]
    TooLong(&'static str),
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("No metadata context asked for")]
    NoContexts,
    #[error("More than {MAX_OPTION_REPLIES} metadata contexts asked for")]
    TooManyContexts,
}

/// Appends a length-prefixed string (32-bit length), after checking it.
fn put_string(v: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), NameError> {
    if s.len() > MAX_STRING {
        return Err(NameError::TooLong(what));
    }
    if s.as_bytes().contains(&0) {
        return Err(NameError::Nul(what));
    }
    let len = u32::try_from(s.len()).map_err(|_| NameError::TooLong(what))?;
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    Ok(())
}

/// One option: IHAVEOPT, option, length, data. Our data is at most a few KiB (names
/// are checked), so its length always fits.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: export name, then the queries.
pub fn set_meta_context_data(export: &str, queries: &[&str]) -> Result<Vec<u8>, NameError> {
    if queries.is_empty() {
        return Err(NameError::NoContexts);
    }
    if queries.len() > MAX_OPTION_REPLIES {
        return Err(NameError::TooManyContexts);
    }
    let mut v = Vec::new();
    put_string(&mut v, "export name", export)?;
    let n = u32::try_from(queries.len()).map_err(|_| NameError::TooManyContexts)?;
    v.extend_from_slice(&n.to_be_bytes());
    for q in queries {
        put_string(&mut v, "context name", q)?;
    }
    Ok(v)
}

/// The data of `NBD_OPT_GO`: export name and the info types asked for.
pub fn go_data(export: &str, infos: &[u16]) -> Result<Vec<u8>, NameError> {
    let mut v = Vec::new();
    put_string(&mut v, "export name", export)?;
    let n = u16::try_from(infos.len()).unwrap_or(u16::MAX);
    v.extend_from_slice(&n.to_be_bytes());
    for i in infos.iter().take(usize::from(n)) {
        v.extend_from_slice(&i.to_be_bytes());
    }
    Ok(v)
}

/// An option reply header; `len` bytes of data follow, at most [`MAX_OPTION_REPLY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub kind: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn is_error(&self) -> bool {
        self.kind & REP_ERR_BIT != 0
    }
}

/// Parses an option reply header to option `sent`: magic, the option echoed back, and
/// a data length within the cap (checked before anything is read or allocated).
pub fn parse_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
    sent: u32,
) -> Result<OptionReplyHeader, ProtoError> {
    let magic = be_u64(b, 0).unwrap_or_default();
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtoError::Magic {
            what: "option reply",
            got: magic,
        });
    }
    let got = be_u32(b, 8).unwrap_or_default();
    if got != sent {
        return Err(ProtoError::WrongOption { sent, got });
    }
    let kind = be_u32(b, 12).unwrap_or_default();
    let len = be_u32(b, 16).unwrap_or_default();
    if len > MAX_OPTION_REPLY {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: u64::from(len),
            max: u64::from(MAX_OPTION_REPLY),
        });
    }
    Ok(OptionReplyHeader { kind, len })
}

/// A metadata context the server granted, with the id block status replies carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// `NBD_REP_META_CONTEXT`: a 32-bit id and the context's name.
pub fn parse_meta_context(data: &[u8]) -> Result<MetaContext, ProtoError> {
    let id = be_u32(data, 0).ok_or(ProtoError::Malformed {
        what: "NBD_REP_META_CONTEXT",
        len: data.len(),
    })?;
    let name = data.get(4..).unwrap_or_default();
    if name.len() > MAX_STRING {
        return Err(ProtoError::TooLong {
            what: "context name",
            len: u64::try_from(name.len()).unwrap_or(u64::MAX),
            max: 4096,
        });
    }
    let name = std::str::from_utf8(name).map_err(|_| ProtoError::ContextName)?;
    Ok(MetaContext {
        id,
        name: name.to_string(),
    })
}

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// One `NBD_REP_INFO` reply to `NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size in bytes and transmission flags.
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize(BlockSize),
    /// An info type we did not ask for or do not use (name, description).
    Other(u16),
}

/// Parses an `NBD_REP_INFO` payload, checking the export size and that block sizes
/// are consistent powers of two (min at most 64 KiB, max at least preferred).
pub fn parse_info(data: &[u8]) -> Result<Info, ProtoError> {
    let malformed = |what| ProtoError::Malformed {
        what,
        len: data.len(),
    };
    let kind = be_u16(data, 0).ok_or(malformed("NBD_REP_INFO"))?;
    match kind {
        INFO_EXPORT => {
            if data.len() != 12 {
                return Err(malformed("NBD_INFO_EXPORT"));
            }
            let size = be_u64(data, 2).unwrap_or_default();
            let flags = be_u16(data, 10).unwrap_or_default();
            if size > MAX_EXPORT_SIZE {
                return Err(ProtoError::ExportSize(size));
            }
            Ok(Info::Export { size, flags })
        }
        INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(malformed("NBD_INFO_BLOCK_SIZE"));
            }
            let min = be_u32(data, 2).unwrap_or_default();
            let preferred = be_u32(data, 6).unwrap_or_default();
            let max = be_u32(data, 10).unwrap_or_default();
            let ok = min.is_power_of_two()
                && min <= 64 << 10
                && preferred.is_power_of_two()
                && preferred >= min
                && max >= preferred;
            if !ok {
                return Err(ProtoError::BlockSize {
                    min,
                    preferred,
                    max,
                });
            }
            Ok(Info::BlockSize(BlockSize {
                min,
                preferred,
                max,
            }))
        }
        other => Ok(Info::Other(other)),
    }
}

/// The message of an option error reply, for display (not trusted to be UTF-8).
pub fn error_message(data: &[u8]) -> String {
    let cut = data.get(..MAX_STRING).unwrap_or(data);
    String::from_utf8_lossy(cut).into_owned()
}

/// The name of an option error reply type.
pub fn rep_err_name(kind: u32) -> &'static str {
    match kind {
        k if k == REP_ERR_BIT + 1 => "NBD_REP_ERR_UNSUP",
        k if k == REP_ERR_BIT + 2 => "NBD_REP_ERR_POLICY",
        k if k == REP_ERR_BIT + 3 => "NBD_REP_ERR_INVALID",
        k if k == REP_ERR_BIT + 4 => "NBD_REP_ERR_PLATFORM",
        k if k == REP_ERR_BIT + 5 => "NBD_REP_ERR_TLS_REQD",
        k if k == REP_ERR_BIT + 6 => "NBD_REP_ERR_UNKNOWN",
        k if k == REP_ERR_BIT + 7 => "NBD_REP_ERR_SHUTDOWN",
        k if k == REP_ERR_BIT + 8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        k if k == REP_ERR_BIT + 9 => "NBD_REP_ERR_TOO_BIG",
        k if k == REP_ERR_BIT + 10 => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown option error",
    }
}

/// One transmission request (no payload: this client never writes).
pub fn encode_request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // 4..6: command flags, none (no REQ_ONE: we want every extent the server offers)
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// Which kind of reply a magic announces; the rest of its header follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMagic {
    /// 12 more bytes: error, cookie.
    Simple,
    /// 16 more bytes: flags, type, cookie, length.
    Structured,
}

pub const SIMPLE_REST_LEN: usize = 12;
pub const CHUNK_REST_LEN: usize = 16;

pub fn parse_reply_magic(b: [u8; 4]) -> Result<ReplyMagic, ProtoError> {
    match u32::from_be_bytes(b) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyMagic::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyMagic::Structured),
        got => Err(ProtoError::Magic {
            what: "reply",
            got: u64::from(got),
        }),
    }
}

/// The rest of a simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn parse_simple_reply(b: &[u8; SIMPLE_REST_LEN]) -> SimpleReply {
    SimpleReply {
        error: be_u32(b, 0).unwrap_or_default(),
        cookie: be_u64(b, 4).unwrap_or_default(),
    }
}

/// The rest of a structured reply chunk header; `len` bytes of payload follow, and
/// the validators in [`super::reply`] say how many may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

pub fn parse_chunk_header(b: &[u8; CHUNK_REST_LEN]) -> ChunkHeader {
    ChunkHeader {
        flags: be_u16(b, 0).unwrap_or_default(),
        kind: be_u16(b, 2).unwrap_or_default(),
        cookie: be_u64(b, 4).unwrap_or_default(),
        len: be_u32(b, 12).unwrap_or_default(),
    }
}

/// A reply must carry the cookie of the one request in flight.
pub fn check_cookie(expected: u64, got: u64) -> Result<(), ProtoError> {
    if expected == got {
        Ok(())
    } else {
        Err(ProtoError::WrongCookie { expected, got })
    }
}
