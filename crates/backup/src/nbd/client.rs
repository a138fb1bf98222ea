//! The transmission phase: one request at a time on one connection, each with its own
//! cookie, the reply checked by the validators of [`super::reply`].
//!
//! A connection is "broken" from the moment a request is sent until its whole reply
//! has been read and found well-formed: an I/O error, a protocol violation or a future
//! dropped half-way leaves it broken, and every later call fails with
//! [`NbdError::Broken`] instead of reading a desynchronised stream. A server error
//! (an error chunk) leaves it usable. Callers wanting parallel reads open several
//! connections; callers wanting deadlines wrap calls in `tokio::time::timeout` (a
//! timed-out connection is broken, as above).

use super::error::{NbdError, Op};
use super::handshake::{self, ExportInfo, Negotiated};
use super::reply::{ContextExtents, Extent, ReadNext, ReadReply, ServerError, StatusReply};
use super::wire::{
    self, MetaContext, ProtoError, ReplyMagic, CHUNK_REST_LEN, CMD_BLOCK_STATUS, CMD_DISC,
    CMD_READ, ESHUTDOWN, OPT_ABORT, SIMPLE_REST_LEN,
};
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Largest read we send when the server states no maximum (QEMU's limit, 32 MiB).
pub const DEFAULT_MAX_READ: u32 = 32 << 20;
/// Longest range one block status request asks about; a walk over a larger range
/// sends several (QEMU's own client stays under 2 GiB too).
pub const MAX_STATUS_REQUEST: u32 = 1 << 30;
/// Most extents [`NbdClient::block_status_range`] collects before giving up (after
/// merging runs of equal flags; 64 MiB of memory).
pub const MAX_RANGE_EXTENTS: usize = 1 << 22;

/// A connected NBD client in the transmission phase.
#[derive(Debug)]
pub struct NbdClient<S> {
    stream: S,
    negotiated: Negotiated,
    next_cookie: u64,
    broken: bool,
}

/// Connects to a unix socket (`qemu-nbd --socket`, QEMU's `nbd-server-start` with a
/// unix address) and runs the handshake.
pub async fn connect_unix(
    path: impl AsRef<Path>,
    export_name: &str,
    contexts: &[&str],
) -> Result<NbdClient<UnixStream>, NbdError> {
    let path = path.as_ref();
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| NbdError::Connect {
            target: path.display().to_string(),
            source,
        })?;
    NbdClient::handshake(stream, export_name, contexts).await
}

/// Connects over TCP and runs the handshake.
pub async fn connect_tcp(
    addr: SocketAddr,
    export_name: &str,
    contexts: &[&str],
) -> Result<NbdClient<TcpStream>, NbdError> {
    let connect_err = |source| NbdError::Connect {
        target: addr.to_string(),
        source,
    };
    let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
    stream.set_nodelay(true).map_err(connect_err)?;
    NbdClient::handshake(stream, export_name, contexts).await
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> NbdClient<S> {
    /// Runs the handshake on `stream`: structured replies (required), the metadata
    /// `contexts` asked for (see [`Self::missing_contexts`] for those not granted),
    /// then `NBD_OPT_GO` on `export_name`.
    pub async fn handshake(
        mut stream: S,
        export_name: &str,
        contexts: &[&str],
    ) -> Result<Self, NbdError> {
        match handshake::negotiate(&mut stream, export_name, contexts).await {
            Ok(negotiated) => {
                tracing::debug!(
                    size = negotiated.export.size,
                    contexts = ?negotiated.contexts,
                    missing = ?negotiated.missing,
                    "NBD export opened"
                );
                Ok(Self {
                    stream,
                    negotiated,
                    next_cookie: 1,
                    broken: false,
                })
            }
            Err(e) => {
                if matches!(e, NbdError::Refused { .. }) {
                    // A soft disconnect, as the spec asks; the reply does not matter.
                    let abort = wire::encode_option(OPT_ABORT, &[]);
                    let _ = stream.write_all(&abort).await;
                    let _ = stream.flush().await;
                }
                Err(e)
            }
        }
    }

    pub fn export(&self) -> &ExportInfo {
        &self.negotiated.export
    }

    pub fn size(&self) -> u64 {
        self.negotiated.export.size
    }

    /// The metadata contexts granted, with the ids block status uses.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.negotiated.contexts
    }

    /// The id of a granted context, by its full name (`base:allocation`,
    /// `qemu:dirty-bitmap:NAME`).
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.negotiated
            .contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }

    /// The contexts asked for that the server did not grant (a missing bitmap).
    pub fn missing_contexts(&self) -> &[String] {
        &self.negotiated.missing
    }

    /// Largest length one [`Self::read`] may ask for.
    pub fn max_read(&self) -> u32 {
        match self.negotiated.export.block_size {
            Some(b) => b.max.min(DEFAULT_MAX_READ),
            None => DEFAULT_MAX_READ,
        }
    }

    /// Whether an earlier failure left the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.check_read(offset, u64::from(len))?;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (holes come back as zeros).
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let op = Op::Read;
        let len64 = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.check_read(offset, len64)?;
        let len = u32::try_from(buf.len()).map_err(|_| invalid(op, offset, len64, "too long"))?;
        let cookie = self.send(op, CMD_READ, offset, len).await?;
        let res = self.read_reply(cookie, offset, len, buf).await;
        self.settle(op, offset, u64::from(len), res)
    }

    /// Asks the status of `len` bytes at `offset` in every negotiated context; each
    /// context's extents start at `offset` and may cover less than `len` (the server
    /// may stop early), never more.
    pub async fn block_status_all(
        &mut self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<ContextExtents>, NbdError> {
        let op = Op::BlockStatus;
        self.check_range(op, offset, u64::from(len))?;
        if self.negotiated.contexts.is_empty() {
            return Err(invalid(op, offset, u64::from(len), "no metadata context"));
        }
        let cookie = self.send(op, CMD_BLOCK_STATUS, offset, len).await?;
        let res = self.status_reply(cookie, offset, len).await;
        self.settle(op, offset, u64::from(len), res)
    }

    /// The extents of one context for `len` bytes at `offset` (one request; they may
    /// cover less than `len`).
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        context_id: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        if !self.negotiated.contexts.iter().any(|c| c.id == context_id) {
            return Err(NbdError::UnknownContext(context_id));
        }
        let all = self.block_status_all(offset, len).await?;
        Ok(all
            .into_iter()
            .find(|c| c.context_id == context_id)
            .map(|c| c.extents)
            .unwrap_or_default())
    }

    /// The extents of one context over the whole of `len` bytes at `offset`, asking
    /// again where the server stopped early; runs of equal flags are merged, so the
    /// result covers the range exactly, in order.
    pub async fn block_status_range(
        &mut self,
        offset: u64,
        len: u64,
        context_id: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        let op = Op::BlockStatus;
        self.check_range(op, offset, len)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = u32::try_from((end - pos).min(u64::from(MAX_STATUS_REQUEST)))
                .unwrap_or(MAX_STATUS_REQUEST);
            let extents = self.block_status(pos, ask, context_id).await?;
            // At least one nonzero extent starting at `pos` (the validator's rule),
            // so every round moves forward.
            for e in extents {
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.offset + last.len == e.offset => {
                        last.len += e.len;
                    }
                    _ => {
                        if out.len() >= MAX_RANGE_EXTENTS {
                            return Err(NbdError::TooManyExtents(MAX_RANGE_EXTENTS));
                        }
                        out.push(e);
                    }
                }
                pos = e.offset + e.len;
            }
        }
        Ok(out)
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`) and closes the stream.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        let op = Op::Disconnect;
        if !self.broken {
            let cookie = self.cookie();
            let req = wire::encode_request(CMD_DISC, cookie, 0, 0);
            self.stream
                .write_all(&req)
                .await
                .map_err(|source| NbdError::Io { op, source })?;
            self.stream
                .flush()
                .await
                .map_err(|source| NbdError::Io { op, source })?;
        }
        self.stream
            .shutdown()
            .await
            .map_err(|source| NbdError::Io { op, source })
    }

    fn check_range(&self, op: Op, offset: u64, len: u64) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        if len == 0 {
            return Err(invalid(op, offset, len, "empty range"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => {}
            _ => return Err(invalid(op, offset, len, "beyond the end of the export")),
        }
        if let Some(b) = self.negotiated.export.block_size {
            let min = u64::from(b.min);
            if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
                return Err(invalid(
                    op,
                    offset,
                    len,
                    "not aligned to the minimum block size",
                ));
            }
        }
        Ok(())
    }

    fn check_read(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_range(Op::Read, offset, len)?;
        if len > u64::from(self.max_read()) {
            return Err(invalid(Op::Read, offset, len, "over the server's maximum"));
        }
        Ok(())
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// Sends a request; the connection counts as broken until its reply is settled.
    async fn send(&mut self, op: Op, kind: u16, offset: u64, len: u32) -> Result<u64, NbdError> {
        let cookie = self.cookie();
        self.broken = true;
        let req = wire::encode_request(kind, cookie, offset, len);
        self.stream
            .write_all(&req)
            .await
            .map_err(|source| NbdError::Io { op, source })?;
        self.stream
            .flush()
            .await
            .map_err(|source| NbdError::Io { op, source })?;
        Ok(cookie)
    }

    /// Turns a reply's outcome into the call's result; a well-framed reply (success
    /// or server error) leaves the connection usable, unless the server shuts down.
    fn settle<T>(
        &mut self,
        op: Op,
        offset: u64,
        len: u64,
        res: Result<Result<T, ServerError>, Failure>,
    ) -> Result<T, NbdError> {
        match res {
            Ok(Ok(v)) => {
                self.broken = false;
                Ok(v)
            }
            Ok(Err(e)) => {
                self.broken = e.errno == ESHUTDOWN;
                Err(NbdError::Server {
                    op,
                    offset: e.offset.unwrap_or(offset),
                    len,
                    errno: e.errno,
                    message: e.message,
                })
            }
            Err(Failure::Io(source)) => Err(NbdError::Io { op, source }),
            Err(Failure::Proto(source)) => Err(NbdError::Protocol { op, source }),
        }
    }

    /// Reads the next reply header, which must carry `cookie`.
    async fn reply_header(&mut self, cookie: u64) -> Result<Header, Failure> {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).await?;
        match wire::parse_reply_magic(magic)? {
            ReplyMagic::Simple => {
                let mut rest = [0u8; SIMPLE_REST_LEN];
                self.stream.read_exact(&mut rest).await?;
                let r = wire::parse_simple_reply(&rest);
                wire::check_cookie(cookie, r.cookie)?;
                Ok(Header::Simple(r.error))
            }
            ReplyMagic::Structured => {
                let mut rest = [0u8; CHUNK_REST_LEN];
                self.stream.read_exact(&mut rest).await?;
                let h = wire::parse_chunk_header(&rest);
                wire::check_cookie(cookie, h.cookie)?;
                Ok(Header::Chunk(h))
            }
        }
    }

    async fn read_reply(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u32,
        buf: &mut [u8],
    ) -> Result<Result<(), ServerError>, Failure> {
        let mut reply = ReadReply::new(offset, len);
        loop {
            let h = match self.reply_header(cookie).await? {
                Header::Simple(0) => {
                    // Not allowed once structured replies are on, but unambiguous:
                    // exactly the requested bytes follow.
                    self.stream.read_exact(buf).await?;
                    return Ok(Ok(()));
                }
                Header::Simple(errno) => return Ok(Err(simple_error(errno))),
                Header::Chunk(h) => h,
            };
            match reply.on_header(&h)? {
                ReadNext::DataOffset => {
                    let mut at = [0u8; 8];
                    self.stream.read_exact(&mut at).await?;
                    let r = reply.on_data_offset(&h, at)?;
                    let dst = buf.get_mut(r).ok_or(ProtoError::Incomplete {
                        got: 0,
                        want: u64::from(len),
                    })?;
                    self.stream.read_exact(dst).await?;
                }
                ReadNext::Payload(n) => {
                    let payload = self.payload(n).await?;
                    reply.on_payload(&h, &payload, buf)?;
                }
            }
            if h.done() {
                return Ok(reply.finish()?);
            }
        }
    }

    async fn status_reply(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> Result<Result<Vec<ContextExtents>, ServerError>, Failure> {
        let ids: Vec<u32> = self.negotiated.contexts.iter().map(|c| c.id).collect();
        let mut reply = StatusReply::new(offset, len, &ids);
        loop {
            let h = match self.reply_header(cookie).await? {
                Header::Simple(0) => return Err(ProtoError::SimpleSuccess.into()),
                Header::Simple(errno) => return Ok(Err(simple_error(errno))),
                Header::Chunk(h) => h,
            };
            let n = reply.on_header(&h)?;
            let payload = self.payload(n).await?;
            reply.on_payload(&h, &payload)?;
            if h.done() {
                return Ok(reply.finish()?);
            }
        }
    }

    /// Reads `n` payload bytes; `n` was checked against the request and the caps.
    async fn payload(&mut self, n: usize) -> Result<Vec<u8>, Failure> {
        let mut v = vec![0u8; n];
        self.stream.read_exact(&mut v).await?;
        Ok(v)
    }
}

fn invalid(op: Op, offset: u64, len: u64, reason: &'static str) -> NbdError {
    NbdError::InvalidRequest {
        op,
        offset,
        len,
        reason,
    }
}

fn simple_error(errno: u32) -> ServerError {
    ServerError {
        errno,
        message: String::new(),
        offset: None,
    }
}

/// A reply header: a simple reply's error value, or a chunk header.
enum Header {
    Simple(u32),
    Chunk(wire::ChunkHeader),
}

/// Why a reply could not be read: the connection is lost either way.
enum Failure {
    Io(std::io::Error),
    Proto(ProtoError),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<ProtoError> for Failure {
    fn from(e: ProtoError) -> Self {
        Failure::Proto(e)
    }
}
