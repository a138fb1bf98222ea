//! The replication protocol between hosts, sans-IO. Every message is a frame: magic,
//! protocol version, kind, body length, body. Decoding checks the version, every length
//! against the bytes present and the limits, and that the body is used up exactly; a
//! peer that sends anything else is disconnected.

use thiserror::Error;

pub const MAGIC: u32 = 0x4652_5931; // "FRY1"
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;
/// Largest body: a 32 MiB write plus its fields, or a Hello with bitmaps.
pub const MAX_BODY: u32 = (64 << 20) + 4096;
/// The kind of a `Hello`.
pub const KIND_HELLO: u16 = 1;
const MAX_HISTORY: usize = 4096;
const MAX_STRING: usize = 1024;

/// A length for a u32 field of the wire. One too large for it becomes `u32::MAX`,
/// which every reader refuses (past [`MAX_BODY`]): a refused frame, never a
/// truncated length that frames the bytes after it wrongly.
fn wire_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    Magic(u32),
    #[error("protocol version {0}, this host speaks {VERSION}")]
    Version(u16),
    #[error("body of {0} bytes is over the limit")]
    TooLong(u32),
    #[error("unknown message kind {0}")]
    Kind(u16),
    #[error("message ends early (needs {need} more bytes at {at})")]
    Short { at: usize, need: usize },
    #[error("{0} unused bytes after the message")]
    Trailing(usize),
    #[error("{0} is not valid")]
    Field(&'static str),
}

pub use ferry_types::GenId;

/// What each side says when a connection starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    pub volume: String,
    pub host: String,
    pub primary: bool,
    pub size: u64,
    /// The generations the sender's data went through, oldest first.
    pub history: Vec<GenId>,
    /// The sender's data is complete for its last generation (not a cut-off resync).
    pub uptodate: bool,
    /// While not up to date: the primary and generation it was syncing from.
    pub sync_source: Option<GenId>,
    /// The sender's bitmap of blocks the receiver lacks, and the receiver's generation
    /// it is relative to (None: the sender keeps none that is valid).
    pub bitmap_base: Option<GenId>,
    pub bitmap: Vec<u64>,
    /// The sender's activity log: extents with writes that may not have reached peers.
    pub active: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    Write {
        seq: u64,
        gen: GenId,
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    Zero {
        seq: u64,
        gen: GenId,
        offset: u64,
        len: u32,
        trim: bool,
        fua: bool,
    },
    Flush {
        seq: u64,
        gen: GenId,
    },
    Ack {
        seq: u64,
    },
    Nack {
        seq: u64,
        reason: String,
    },
    /// The resync is complete: the secondary is up to date in generation `gen`.
    ResyncDone {
        seq: u64,
        gen: GenId,
    },
    VerifyReq {
        seq: u64,
        offset: u64,
        len: u32,
    },
    VerifyResp {
        seq: u64,
        digest: [u8; 16],
    },
    /// The connection is refused or ended, and why (split brain, stale primary, demote).
    Goodbye {
        reason: String,
    },
}

impl Msg {
    fn kind(&self) -> u16 {
        match self {
            Msg::Hello(_) => KIND_HELLO,
            Msg::Write { .. } => 2,
            Msg::Zero { .. } => 3,
            Msg::Flush { .. } => 4,
            Msg::Ack { .. } => 5,
            Msg::Nack { .. } => 6,
            Msg::ResyncDone { .. } => 7,
            Msg::VerifyReq { .. } => 8,
            Msg::VerifyResp { .. } => 9,
            Msg::Goodbye { .. } => 10,
        }
    }

    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(64));
        w.u32(MAGIC);
        w.u16(VERSION);
        w.u16(self.kind());
        w.u32(0);
        match self {
            Msg::Hello(h) => {
                w.str(&h.volume);
                w.str(&h.host);
                w.u8(h.primary as u8);
                w.u64(h.size);
                w.u32(wire_len(h.history.len()));
                for g in &h.history {
                    w.gen(g);
                }
                w.u8(h.uptodate as u8);
                w.opt_gen(&h.sync_source);
                w.opt_gen(&h.bitmap_base);
                w.words(&h.bitmap);
                w.words(&h.active);
            }
            Msg::Write {
                seq,
                gen,
                offset,
                fua,
                data,
            } => {
                // One encoding of a write: the frame the primary sends.
                return Frame::write(*seq, gen, *offset, *fua, std::sync::Arc::new(data.clone()))
                    .to_bytes();
            }
            Msg::Zero {
                seq,
                gen,
                offset,
                len,
                trim,
                fua,
            } => {
                w.u64(*seq);
                w.gen(gen);
                w.u64(*offset);
                w.u32(*len);
                w.u8(*trim as u8);
                w.u8(*fua as u8);
            }
            Msg::Flush { seq, gen } => {
                w.u64(*seq);
                w.gen(gen);
            }
            Msg::Ack { seq } => w.u64(*seq),
            Msg::Nack { seq, reason } => {
                w.u64(*seq);
                w.str(reason);
            }
            Msg::ResyncDone { seq, gen } => {
                w.u64(*seq);
                w.gen(gen);
            }
            Msg::VerifyReq { seq, offset, len } => {
                w.u64(*seq);
                w.u64(*offset);
                w.u32(*len);
            }
            Msg::VerifyResp { seq, digest } => {
                w.u64(*seq);
                w.0.extend_from_slice(digest);
            }
            Msg::Goodbye { reason } => w.str(reason),
        }
        let len = wire_len(w.0.len() - HEADER_LEN);
        w.0[8..12].copy_from_slice(&len.to_be_bytes());
        w.0
    }
}

/// Checks a frame header; returns (kind, body length).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u16, u32), WireError> {
    let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let len = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    if len > MAX_BODY {
        return Err(WireError::TooLong(len));
    }
    Ok((kind, len))
}

/// Decodes a body of message `kind`.
pub fn decode_body(kind: u16, body: &[u8]) -> Result<Msg, WireError> {
    let mut r = R { b: body, at: 0 };
    let m = match kind {
        1 => {
            let volume = r.str()?;
            let host = r.str()?;
            let primary = r.bool()?;
            let size = r.u64()?;
            let n = r.u32()? as usize;
            if n > MAX_HISTORY {
                return Err(WireError::Field("history"));
            }
            let mut history = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                history.push(r.gen()?);
            }
            Msg::Hello(Hello {
                volume,
                host,
                primary,
                size,
                history,
                uptodate: r.bool()?,
                sync_source: r.opt_gen()?,
                bitmap_base: r.opt_gen()?,
                bitmap: r.words()?,
                active: r.words()?,
            })
        }
        2 => {
            let seq = r.u64()?;
            let gen = r.gen()?;
            let offset = r.u64()?;
            let fua = r.bool()?;
            let n = r.u32()? as usize;
            let data = r.take(n)?.to_vec();
            Msg::Write {
                seq,
                gen,
                offset,
                fua,
                data,
            }
        }
        3 => Msg::Zero {
            seq: r.u64()?,
            gen: r.gen()?,
            offset: r.u64()?,
            len: r.u32()?,
            trim: r.bool()?,
            fua: r.bool()?,
        },
        4 => Msg::Flush {
            seq: r.u64()?,
            gen: r.gen()?,
        },
        5 => Msg::Ack { seq: r.u64()? },
        6 => Msg::Nack {
            seq: r.u64()?,
            reason: r.str()?,
        },
        7 => Msg::ResyncDone {
            seq: r.u64()?,
            gen: r.gen()?,
        },
        8 => Msg::VerifyReq {
            seq: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        9 => Msg::VerifyResp {
            seq: r.u64()?,
            digest: r.take(16)?.try_into().expect("16 bytes"),
        },
        10 => Msg::Goodbye { reason: r.str()? },
        k => return Err(WireError::Kind(k)),
    };
    if r.at != body.len() {
        return Err(WireError::Trailing(body.len() - r.at));
    }
    Ok(m)
}

/// The fields of a write before its data: (seq, generation, offset, fua, data length).
pub fn decode_write_head(b: &[u8]) -> Result<(u64, GenId, u64, bool, usize), WireError> {
    let mut r = R { b, at: 0 };
    let v = (r.u64()?, r.gen()?, r.u64()?, r.bool()?, r.u32()? as usize);
    if r.at != b.len() {
        return Err(WireError::Trailing(b.len() - r.at));
    }
    Ok(v)
}

/// Decodes one whole frame (header and body), as the fuzz target does.
pub fn decode_frame(b: &[u8]) -> Result<Msg, WireError> {
    if b.len() < HEADER_LEN {
        return Err(WireError::Short {
            at: 0,
            need: HEADER_LEN - b.len(),
        });
    }
    let (kind, len) = decode_header(b[..HEADER_LEN].try_into().expect("12 bytes"))?;
    let body = &b[HEADER_LEN..];
    if body.len() != len as usize {
        return Err(WireError::Field("frame length"));
    }
    decode_body(kind, body)
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes())
    }
    fn str(&mut self, s: &str) {
        let s = &s.as_bytes()[..s.len().min(MAX_STRING)];
        self.u16(u16::try_from(s.len()).unwrap_or(u16::MAX)); // at most MAX_STRING
        self.0.extend_from_slice(s);
    }
    fn gen(&mut self, g: &GenId) {
        self.u64(g.n);
        self.str(&g.host);
    }
    fn opt_gen(&mut self, g: &Option<GenId>) {
        match g {
            Some(g) => {
                self.u8(1);
                self.gen(g);
            }
            None => self.u8(0),
        }
    }
    fn words(&mut self, w: &[u64]) {
        self.u32(wire_len(w.len()));
        for x in w {
            self.u64(*x);
        }
    }
}

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let left = self.b.len() - self.at;
        if n > left {
            return Err(WireError::Short {
                at: self.at,
                need: n - left,
            });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Field("flag")),
        }
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > MAX_STRING {
            return Err(WireError::Field("string length"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Field("string"))
    }
    fn gen(&mut self) -> Result<GenId, WireError> {
        Ok(GenId {
            n: self.u64()?,
            host: self.str()?,
        })
    }
    fn opt_gen(&mut self) -> Result<Option<GenId>, WireError> {
        Ok(if self.bool()? {
            Some(self.gen()?)
        } else {
            None
        })
    }
    fn words(&mut self) -> Result<Vec<u64>, WireError> {
        let n = self.u32()? as usize;
        let bytes = self.take(n.checked_mul(8).ok_or(WireError::Field("bitmap"))?)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect())
    }
}

/// A frame to send: its bytes, and a write's data sent after them as they are
/// (no copy into the frame).
#[derive(Debug, Clone)]
pub struct Frame {
    pub head: Vec<u8>,
    pub data: Option<std::sync::Arc<Vec<u8>>>,
}

impl Frame {
    pub fn msg(m: &Msg) -> Frame {
        Frame {
            head: m.encode(),
            data: None,
        }
    }

    /// A write of `data`, which is shared, not copied.
    pub fn write(
        seq: u64,
        gen: &GenId,
        offset: u64,
        fua: bool,
        data: std::sync::Arc<Vec<u8>>,
    ) -> Frame {
        let mut w = W(Vec::with_capacity(64));
        w.u32(MAGIC);
        w.u16(VERSION);
        w.u16(2);
        w.u32(0);
        w.u64(seq);
        w.gen(gen);
        w.u64(offset);
        w.u8(fua as u8);
        w.u32(wire_len(data.len()));
        let len = wire_len(w.0.len() - HEADER_LEN + data.len());
        w.0[8..12].copy_from_slice(&len.to_be_bytes());
        Frame {
            head: w.0,
            data: Some(data),
        }
    }

    /// The whole frame in one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = self.head.clone();
        if let Some(d) = &self.data {
            v.extend_from_slice(d);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(n: u64, h: &str) -> GenId {
        GenId { n, host: h.into() }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            Msg::Hello(Hello {
                volume: "r1/vm-1-disk-0".into(),
                host: "h1".into(),
                primary: true,
                size: 1 << 30,
                history: vec![g(1, "h1"), g(2, "h2")],
                uptodate: true,
                sync_source: Some(g(2, "h2")),
                bitmap_base: None,
                bitmap: vec![1, u64::MAX],
                active: vec![],
            }),
            Msg::Write {
                seq: 9,
                gen: g(3, "h1"),
                offset: 4096,
                fua: true,
                data: vec![7; 512],
            },
            Msg::Zero {
                seq: 1,
                gen: g(3, "h1"),
                offset: 0,
                len: 65536,
                trim: true,
                fua: false,
            },
            Msg::Flush {
                seq: 2,
                gen: g(3, "h1"),
            },
            Msg::Ack { seq: 3 },
            Msg::Nack {
                seq: 4,
                reason: "old generation".into(),
            },
            Msg::ResyncDone {
                seq: 8,
                gen: g(3, "h1"),
            },
            Msg::VerifyReq {
                seq: 5,
                offset: 0,
                len: 1 << 20,
            },
            Msg::VerifyResp {
                seq: 5,
                digest: [1; 16],
            },
            Msg::Goodbye {
                reason: "split brain".into(),
            },
        ];
        for m in msgs {
            let f = m.encode();
            assert_eq!(decode_frame(&f).unwrap(), m);
            if let Msg::Write {
                seq,
                gen,
                offset,
                fua,
                data,
            } = &m
            {
                let fr = Frame::write(*seq, gen, *offset, *fua, std::sync::Arc::new(data.clone()));
                assert_eq!(fr.to_bytes(), f);
            }
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut f = Msg::Ack { seq: 1 }.encode();
        f[5] = 2;
        assert_eq!(decode_frame(&f), Err(WireError::Version(2)));
        let f = Msg::Ack { seq: 1 }.encode();
        assert!(decode_frame(&f[..f.len() - 1]).is_err());
        let mut long = f.clone();
        long.push(0);
        long[11] += 1;
        assert_eq!(decode_frame(&long), Err(WireError::Trailing(1)));
        // a write claiming more data than the frame holds
        let mut w = Msg::Write {
            seq: 1,
            gen: g(1, "a"),
            offset: 0,
            fua: false,
            data: vec![0; 8],
        }
        .encode();
        let n = w.len();
        w[n - 12..n - 8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_frame(&w), Err(WireError::Short { .. })));
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&VERSION.to_be_bytes());
        h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_header(&h), Err(WireError::TooLong(u32::MAX)));
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&b);
            for kind in 0..12u16 {
                let _ = decode_body(kind, &b);
            }
        }
    }
}
