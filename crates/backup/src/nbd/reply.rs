//! Validation of one request's reply, sans-IO: the structured reply chunks of a read
//! ([`ReadReply`]) and of a block status query ([`StatusReply`]).
//!
//! The connection reads a chunk header, asks the validator how many payload bytes it
//! may read (never more than the request or a fixed cap allows), reads them and hands
//! them back. The validator enforces what the NBD spec requires of a server: content
//! chunks inside the requested range and not overlapping, data covering the whole
//! range when no error was reported, `NBD_REPLY_TYPE_NONE` only as the final empty
//! chunk, block status once per negotiated context with nonzero extents starting inside
//! the range (only the last one may run past its end; it is clamped). A violation is a
//! [`ProtoError`]: the stream cannot be trusted and the connection is dropped. A
//! well-formed error chunk is a [`ServerError`]: the request failed, the connection
//! stays usable.

use super::wire::{
    be_u16, be_u32, be_u64, ChunkHeader, ProtoError, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
};
use std::collections::BTreeMap;
use std::ops::Range;

/// Largest error chunk: error, message length, a 64 KiB message, an offset.
pub const MAX_ERROR_PAYLOAD: u32 = 6 + 65_535 + 8;
/// Most error chunks in one reply (one per content chunk is legitimate; a stream of
/// them without end is not).
pub const MAX_ERROR_CHUNKS: u32 = 4096;
/// Most separate pieces a read reply may be in at once (adjacent chunks merge).
pub const MAX_READ_FRAGMENTS: usize = 1 << 17;
/// Most extents in one block status chunk (QEMU sends at most 128 Ki).
pub const MAX_STATUS_EXTENTS: u32 = 1 << 18;

/// An error the server reported for a request, with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The NBD error value (errno-like: 5 EIO, 22 EINVAL, 108 ESHUTDOWN ...).
    pub errno: u32,
    pub message: String,
    /// Where the error happened, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// The name of an NBD error value.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// One run of blocks with the same status, as a metadata context describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// Context-defined: `base:allocation` has HOLE (1) and ZERO (2), a QEMU dirty
    /// bitmap has DIRTY (1).
    pub flags: u32,
}

/// The extents one context reported for a block status request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExtents {
    pub context_id: u32,
    pub extents: Vec<Extent>,
}

fn malformed(what: &'static str, len: usize) -> ProtoError {
    ProtoError::Malformed { what, len }
}

/// Parses an error chunk (`kind` has bit 15 set). `range` is the request's byte range;
/// an `NBD_REPLY_TYPE_ERROR_OFFSET` offset must lie inside it. Unknown error types are
/// accepted as errors when their message fits, as the spec asks.
pub fn parse_error_chunk(
    kind: u16,
    payload: &[u8],
    range: Range<u64>,
) -> Result<ServerError, ProtoError> {
    let errno = be_u32(payload, 0).ok_or(malformed("error chunk", payload.len()))?;
    let msg_len = be_u16(payload, 4).ok_or(malformed("error chunk", payload.len()))?;
    if errno == 0 {
        return Err(ProtoError::ZeroError);
    }
    let msg_end = 6 + usize::from(msg_len);
    let message = payload
        .get(6..msg_end)
        .ok_or(malformed("error chunk message", payload.len()))?;
    let message = String::from_utf8_lossy(message).into_owned();
    let offset = match kind {
        REPLY_TYPE_ERROR if payload.len() == msg_end => None,
        REPLY_TYPE_ERROR_OFFSET if payload.len() == msg_end + 8 => {
            let at = be_u64(payload, msg_end).unwrap_or_default();
            if !range.contains(&at) {
                return Err(ProtoError::OutsideRequest {
                    offset: at,
                    len: 1,
                    req_offset: range.start,
                    req_len: range.end - range.start,
                });
            }
            Some(at)
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            return Err(malformed("error chunk", payload.len()))
        }
        _ => None,
    };
    Ok(ServerError {
        errno,
        message,
        offset,
    })
}

/// How many payload bytes an error or `NONE` chunk may carry, shared by both replies.
fn common_payload_len(h: &ChunkHeader) -> Result<usize, ProtoError> {
    let len = usize::try_from(h.len).unwrap_or(usize::MAX);
    if h.kind == REPLY_TYPE_NONE {
        if h.len != 0 || !h.done() {
            return Err(ProtoError::UnexpectedChunk {
                kind: h.kind,
                len: h.len,
            });
        }
        return Ok(0);
    }
    if h.kind & REPLY_TYPE_ERROR_BIT != 0 {
        if h.len < 6 {
            return Err(malformed("error chunk", len));
        }
        if h.len > MAX_ERROR_PAYLOAD {
            return Err(ProtoError::TooLong {
                what: "error chunk",
                len: u64::from(h.len),
                max: u64::from(MAX_ERROR_PAYLOAD),
            });
        }
        return Ok(len);
    }
    Err(ProtoError::UnexpectedChunk {
        kind: h.kind,
        len: h.len,
    })
}

/// Keeps the first error of a reply and counts them.
#[derive(Debug, Default)]
struct Errors {
    first: Option<ServerError>,
    count: u32,
}

impl Errors {
    fn record(&mut self, e: ServerError) -> Result<(), ProtoError> {
        self.count += 1;
        if self.count > MAX_ERROR_CHUNKS {
            return Err(ProtoError::TooManyErrors);
        }
        self.first.get_or_insert(e);
        Ok(())
    }
}

/// What to read after a read reply's chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadNext {
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: read the 8-byte offset, then call
    /// [`ReadReply::on_data_offset`] to learn where the data goes.
    DataOffset,
    /// Read this many bytes and pass them to [`ReadReply::on_payload`].
    Payload(usize),
}

/// The reply to one `NBD_CMD_READ` of `len` bytes at `offset`, assembled into the
/// caller's buffer.
#[derive(Debug)]
pub struct ReadReply {
    offset: u64,
    len: u64,
    /// Content received so far: start -> end, never overlapping.
    covered: BTreeMap<u64, u64>,
    filled: u64,
    errors: Errors,
}

impl ReadReply {
    pub fn new(offset: u64, len: u32) -> Self {
        Self {
            offset,
            len: u64::from(len),
            covered: BTreeMap::new(),
            filled: 0,
            errors: Errors::default(),
        }
    }

    fn range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(self.len)
    }

    pub fn on_header(&mut self, h: &ChunkHeader) -> Result<ReadNext, ProtoError> {
        match h.kind {
            REPLY_TYPE_OFFSET_DATA => {
                if h.len < 9 {
                    return Err(malformed(
                        "NBD_REPLY_TYPE_OFFSET_DATA",
                        usize::try_from(h.len).unwrap_or(usize::MAX),
                    ));
                }
                if u64::from(h.len - 8) > self.len {
                    return Err(ProtoError::TooLong {
                        what: "data chunk",
                        len: u64::from(h.len - 8),
                        max: self.len,
                    });
                }
                Ok(ReadNext::DataOffset)
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if h.len != 12 {
                    return Err(malformed(
                        "NBD_REPLY_TYPE_OFFSET_HOLE",
                        usize::try_from(h.len).unwrap_or(usize::MAX),
                    ));
                }
                Ok(ReadNext::Payload(12))
            }
            _ => common_payload_len(h).map(ReadNext::Payload),
        }
    }

    /// Where in the caller's buffer the data of an `OFFSET_DATA` chunk goes, after
    /// checking it lies inside the request and overlaps nothing received before.
    pub fn on_data_offset(
        &mut self,
        h: &ChunkHeader,
        offset: [u8; 8],
    ) -> Result<Range<usize>, ProtoError> {
        let n = u64::from(h.len.saturating_sub(8));
        self.place(u64::from_be_bytes(offset), n)
    }

    /// Handles the payload of a chunk that is not `OFFSET_DATA`; a hole is zeroed in
    /// `buf` (the request's buffer).
    pub fn on_payload(
        &mut self,
        h: &ChunkHeader,
        payload: &[u8],
        buf: &mut [u8],
    ) -> Result<(), ProtoError> {
        match h.kind {
            REPLY_TYPE_OFFSET_HOLE => {
                let at = be_u64(payload, 0).ok_or(malformed("hole", payload.len()))?;
                let size = be_u32(payload, 8).ok_or(malformed("hole", payload.len()))?;
                if size == 0 {
                    return Err(ProtoError::ZeroLength("hole"));
                }
                let r = self.place(at, u64::from(size))?;
                buf.get_mut(r)
                    .ok_or(ProtoError::Incomplete {
                        got: 0,
                        want: self.len,
                    })?
                    .fill(0);
                Ok(())
            }
            REPLY_TYPE_NONE => Ok(()),
            kind => {
                let e = parse_error_chunk(kind, payload, self.range())?;
                self.errors.record(e)
            }
        }
    }

    /// Records `n` bytes of content at `at`; returns their place in the buffer.
    fn place(&mut self, at: u64, n: u64) -> Result<Range<usize>, ProtoError> {
        let outside = ProtoError::OutsideRequest {
            offset: at,
            len: n,
            req_offset: self.offset,
            req_len: self.len,
        };
        let end = at.checked_add(n).ok_or_else(|| outside.clone())?;
        if at < self.offset || end > self.range().end {
            return Err(outside);
        }
        if let Some((_, &prev_end)) = self.covered.range(..end).next_back() {
            if prev_end > at {
                return Err(ProtoError::Overlap { offset: at, len: n });
            }
        }
        // Adjacent pieces are merged, so an in-order reply is one entry however many
        // chunks it has; a server scattering tiny chunks hits the cap instead of
        // growing the map without bound.
        let mut start = at;
        let mut stop = end;
        if let Some((&prev_start, &prev_end)) = self.covered.range(..=at).next_back() {
            if prev_end == at {
                start = prev_start;
            }
        }
        if let Some(next_end) = self.covered.remove(&end) {
            stop = next_end;
        }
        self.covered.insert(start, stop);
        if self.covered.len() > MAX_READ_FRAGMENTS {
            return Err(ProtoError::TooFragmented);
        }
        self.filled += n;
        let rel = |x: u64| usize::try_from(x - self.offset).map_err(|_| outside.clone());
        Ok(rel(at)?..rel(end)?)
    }

    /// After the chunk flagged done: the server's error if it reported one, else the
    /// data must cover the whole request.
    pub fn finish(self) -> Result<Result<(), ServerError>, ProtoError> {
        if let Some(e) = self.errors.first {
            return Ok(Err(e));
        }
        if self.filled != self.len {
            return Err(ProtoError::Incomplete {
                got: self.filled,
                want: self.len,
            });
        }
        Ok(Ok(()))
    }
}

/// The reply to one `NBD_CMD_BLOCK_STATUS` of `len` bytes at `offset`, for the
/// contexts negotiated on the connection.
#[derive(Debug)]
pub struct StatusReply<'a> {
    offset: u64,
    len: u64,
    granted: &'a [u32],
    got: Vec<ContextExtents>,
    errors: Errors,
}

impl<'a> StatusReply<'a> {
    pub fn new(offset: u64, len: u32, granted: &'a [u32]) -> Self {
        Self {
            offset,
            len: u64::from(len),
            granted,
            got: Vec::new(),
            errors: Errors::default(),
        }
    }

    fn range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(self.len)
    }

    /// How many payload bytes to read for this chunk.
    pub fn on_header(&self, h: &ChunkHeader) -> Result<usize, ProtoError> {
        if h.kind != REPLY_TYPE_BLOCK_STATUS {
            return common_payload_len(h);
        }
        let len = usize::try_from(h.len).unwrap_or(usize::MAX);
        if h.len < 12 || !(h.len - 4).is_multiple_of(8) {
            return Err(malformed("NBD_REPLY_TYPE_BLOCK_STATUS", len));
        }
        if (h.len - 4) / 8 > MAX_STATUS_EXTENTS {
            return Err(ProtoError::TooLong {
                what: "block status chunk",
                len: u64::from(h.len),
                max: 4 + 8 * u64::from(MAX_STATUS_EXTENTS),
            });
        }
        Ok(len)
    }

    pub fn on_payload(&mut self, h: &ChunkHeader, payload: &[u8]) -> Result<(), ProtoError> {
        match h.kind {
            REPLY_TYPE_BLOCK_STATUS => {
                let id = be_u32(payload, 0).ok_or(malformed("block status", payload.len()))?;
                if !self.granted.contains(&id) {
                    return Err(ProtoError::UnknownContext(id));
                }
                if self.got.iter().any(|c| c.context_id == id) {
                    return Err(ProtoError::RepeatedContext(id));
                }
                let extents = parse_extents(self.range(), payload.get(4..).unwrap_or_default())?;
                self.got.push(ContextExtents {
                    context_id: id,
                    extents,
                });
                Ok(())
            }
            REPLY_TYPE_NONE => Ok(()),
            kind => {
                let e = parse_error_chunk(kind, payload, self.range())?;
                self.errors.record(e)
            }
        }
    }

    /// After the chunk flagged done: the server's error if it reported one, else the
    /// extents of every negotiated context.
    pub fn finish(self) -> Result<Result<Vec<ContextExtents>, ServerError>, ProtoError> {
        if let Some(e) = self.errors.first {
            return Ok(Err(e));
        }
        if let Some(&id) = self
            .granted
            .iter()
            .find(|id| !self.got.iter().any(|c| c.context_id == **id))
        {
            return Err(ProtoError::MissingContext(id));
        }
        Ok(Ok(self.got))
    }
}

/// Parses block status descriptors (32-bit length, 32-bit flags) for `range`. Each
/// must be nonzero and start inside the range; the last may run past its end (the
/// spec lets a server say the status goes on) and is clamped to it.
pub fn parse_extents(range: Range<u64>, descriptors: &[u8]) -> Result<Vec<Extent>, ProtoError> {
    if descriptors.is_empty() || !descriptors.len().is_multiple_of(8) {
        return Err(malformed("block status descriptors", descriptors.len()));
    }
    let mut out = Vec::with_capacity(descriptors.len() / 8);
    // `claimed` is where the server says the next extent starts, `pos` the same
    // clamped to the range.
    let mut pos = range.start;
    let mut claimed = range.start;
    for d in descriptors.chunks_exact(8) {
        let len = u64::from(be_u32(d, 0).unwrap_or_default());
        let flags = be_u32(d, 4).unwrap_or_default();
        if len == 0 {
            return Err(ProtoError::ZeroLength("extent"));
        }
        if pos >= range.end {
            return Err(ProtoError::ExtentBeyondRequest {
                offset: claimed,
                end: range.end,
            });
        }
        let take = len.min(range.end - pos);
        out.push(Extent {
            offset: pos,
            len: take,
            flags,
        });
        pos += take;
        claimed = claimed.saturating_add(len);
    }
    Ok(out)
}
