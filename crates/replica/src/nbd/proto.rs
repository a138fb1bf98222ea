//! The NBD wire format, sans-IO: the fixed-newstyle handshake, options and the
//! transmission-phase requests and simple replies (see the NBD protocol document).
//! Everything a client sends is length- and range-checked here before any I/O.

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 2;
pub const TF_SEND_FLUSH: u16 = 4;
pub const TF_SEND_FUA: u16 = 8;
pub const TF_SEND_TRIM: u16 = 32;
pub const TF_SEND_WRITE_ZEROES: u16 = 64;

/// The transmission flags of our exports.
pub const EXPORT_FLAGS: u16 =
    TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest payload of one request (what QEMU and the spec's "maximum block size" use).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option a client may send (an export name is at most 4096 bytes).
pub const MAX_OPTION: u32 = 8192;

pub const REQUEST_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("option of {0} bytes is too long (at most {MAX_OPTION})")]
    OptionTooLong(u32),
    #[error("{what}: {len} bytes where {need} are needed")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("export name is not UTF-8")]
    Name,
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u32),
}

/// A fixed option header: (option, length of its data).
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), ProtoError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic(magic));
    }
    let opt = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    if len > MAX_OPTION {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok((opt, len))
}

/// The data of `NBD_OPT_GO`/`NBD_OPT_INFO`: export name and the info types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_go(data: &[u8]) -> Result<GoRequest, ProtoError> {
    let short = |need| ProtoError::Short {
        what: "NBD_OPT_GO",
        len: data.len(),
        need,
    };
    if data.len() < 6 {
        return Err(short(6));
    }
    let nlen = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
    let end = 4usize.checked_add(nlen).ok_or_else(|| short(usize::MAX))?;
    if data.len() < end + 2 {
        return Err(short(end.saturating_add(2)));
    }
    let name = std::str::from_utf8(&data[4..end])
        .map_err(|_| ProtoError::Name)?
        .to_string();
    let n = u16::from_be_bytes([data[end], data[end + 1]]) as usize;
    let need = end + 2 + n * 2;
    if data.len() != need {
        return Err(short(need));
    }
    let infos = data[end + 2..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(GoRequest { name, infos })
}

/// An option reply with its data.
pub fn option_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The transmission flags of an export (a read-only one takes no writes, trims or
/// flushes).
pub fn export_flags(read_only: bool) -> u16 {
    if read_only {
        TF_HAS_FLAGS | TF_READ_ONLY
    } else {
        EXPORT_FLAGS
    }
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, read_only: bool) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&export_flags(read_only).to_be_bytes());
    v
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
pub fn info_block_size(max: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&4096u32.to_be_bytes());
    v.extend_from_slice(&max.min(MAX_PAYLOAD).to_be_bytes());
    v
}

/// The server's greeting.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    /// A command we do not implement (answered ENOTSUP).
    Other(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Bytes of payload that follow the header.
    pub fn payload(&self) -> u32 {
        if self.cmd == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// The error to answer for this request against an export of `size` bytes, if any
    /// (range outside the export, a read over the limit).
    pub fn check(&self, size: u64) -> Option<u32> {
        match self.cmd {
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
                let end = self.offset.checked_add(self.len as u64);
                if end.is_none_or(|e| e > size) {
                    return Some(EINVAL);
                }
                if self.cmd == Command::Read && self.len > MAX_PAYLOAD {
                    return Some(EINVAL);
                }
                None
            }
            Command::Flush | Command::Disconnect => None,
            Command::Other(_) => Some(ENOTSUP),
        }
    }
}

/// Parses one request header. A write whose payload is over the limit is an error:
/// the connection cannot skip it safely and is closed.
pub fn parse_request(b: &[u8]) -> Result<Request, ProtoError> {
    if b.len() != REQUEST_LEN {
        return Err(ProtoError::Short {
            what: "request",
            len: b.len(),
            need: REQUEST_LEN,
        });
    }
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::Magic(magic as u64));
    }
    let flags = u16::from_be_bytes([b[4], b[5]]);
    let cmd = match u16::from_be_bytes([b[6], b[7]]) {
        0 => Command::Read,
        1 => Command::Write,
        2 => Command::Disconnect,
        3 => Command::Flush,
        4 => Command::Trim,
        6 => Command::WriteZeroes,
        n => Command::Other(n),
    };
    let r = Request {
        flags,
        cmd,
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    };
    if r.cmd == Command::Write && r.len > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLong(r.len));
    }
    Ok(r)
}

/// The header of a simple reply.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn requests_are_checked() {
        let r = parse_request(&req(1, 4096, 512)).unwrap();
        assert_eq!(r.cmd, Command::Write);
        assert!(r.fua());
        assert_eq!(r.payload(), 512);
        assert_eq!(r.check(8192), None);
        assert_eq!(r.check(4096), Some(EINVAL));
        // offset + len overflowing u64 is out of range, not a panic
        let r = parse_request(&req(0, u64::MAX, 2)).unwrap();
        assert_eq!(r.check(u64::MAX), Some(EINVAL));
        assert_eq!(
            parse_request(&req(1, 0, MAX_PAYLOAD + 1)),
            Err(ProtoError::PayloadTooLong(MAX_PAYLOAD + 1))
        );
        assert!(matches!(
            parse_request(&req(0, 0, 1)[..27]),
            Err(ProtoError::Short { .. })
        ));
        let mut bad = req(0, 0, 1);
        bad[0] = 0;
        assert!(matches!(parse_request(&bad), Err(ProtoError::Magic(_))));
        assert_eq!(
            parse_request(&req(9, 0, 1)).unwrap().check(10),
            Some(ENOTSUP)
        );
    }

    #[test]
    fn go_options_are_checked() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_go(&d).unwrap(),
            GoRequest {
                name: "vol".into(),
                infos: vec![3]
            }
        );
        // a name length pointing past the end, and one near u32::MAX
        let mut bad = 100u32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"vol\0\0");
        assert!(parse_go(&bad).is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 4]);
        assert!(parse_go(&huge).is_err());
        // trailing garbage after the info list
        let mut trailing = d.clone();
        trailing.push(0);
        assert!(parse_go(&trailing).is_err());
    }
}
