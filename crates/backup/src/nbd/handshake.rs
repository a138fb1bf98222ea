//! The client side of the fixed-newstyle handshake over a stream:
//!
//! ```text
//! greeting ──> client flags ──> STRUCTURED_REPLY ──> SET_META_CONTEXT ──> GO ──> transmission
//!                                (ACK required)       (if any asked;       (INFO replies
//!                                                      records ids)         then ACK)
//! ```
//!
//! Structured replies are required (a server refusing them cannot answer block status).
//! A context the server does not grant is no error: it is listed in
//! [`Negotiated::missing`] so the caller can fall back (no dirty bitmap: read all).
//! Parsing is in [`super::wire`]; every reply length is capped before it is read.

use super::error::{NbdError, Op};
use super::wire::{
    self, BlockSize, Info, MetaContext, ProtoError, INFO_BLOCK_SIZE, MAX_OPTION_REPLIES,
    OPTION_REPLY_HEADER_LEN, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_INFO,
    REP_META_CONTEXT,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the export looks like, from `NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`: read-only, can-multi-conn ...).
    pub flags: u16,
    /// Block size constraints, when the server sent them.
    pub block_size: Option<BlockSize>,
}

/// The outcome of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    /// The contexts the server granted, with their ids.
    pub contexts: Vec<MetaContext>,
    /// The contexts asked for that the server did not grant.
    pub missing: Vec<String>,
}

fn io(op: Op) -> impl FnOnce(std::io::Error) -> NbdError {
    move |source| NbdError::Io { op, source }
}

fn proto(op: Op) -> impl FnOnce(ProtoError) -> NbdError {
    move |source| NbdError::Protocol { op, source }
}

/// Runs the handshake on a fresh connection.
pub async fn negotiate<S>(
    s: &mut S,
    export_name: &str,
    contexts: &[&str],
) -> Result<Negotiated, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let op = Op::Handshake;
    let mut greeting = [0u8; wire::GREETING_LEN];
    s.read_exact(&mut greeting).await.map_err(io(op))?;
    let server_flags = wire::parse_greeting(&greeting).map_err(proto(op))?;
    s.write_all(&wire::client_flags(server_flags).to_be_bytes())
        .await
        .map_err(io(op))?;

    let op = Op::StructuredReply;
    send_option(s, op, OPT_STRUCTURED_REPLY, &[]).await?;
    let (h, data) = read_option_reply(s, op, OPT_STRUCTURED_REPLY).await?;
    refused(op, &h, &data)?;
    if h.kind != REP_ACK {
        return Err(unexpected(op, OPT_STRUCTURED_REPLY, h.kind));
    }

    let (granted, missing) = if contexts.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        set_meta_context(s, export_name, contexts).await?
    };

    let export = go(s, export_name).await?;
    Ok(Negotiated {
        export,
        contexts: granted,
        missing,
    })
}

async fn set_meta_context<S>(
    s: &mut S,
    export_name: &str,
    contexts: &[&str],
) -> Result<(Vec<MetaContext>, Vec<String>), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let op = Op::SetMetaContext;
    let data = wire::set_meta_context_data(export_name, contexts)
        .map_err(|source| NbdError::InvalidName { op, source })?;
    send_option(s, op, OPT_SET_META_CONTEXT, &data).await?;
    let mut granted: Vec<MetaContext> = Vec::new();
    for _ in 0..=MAX_OPTION_REPLIES {
        let (h, data) = read_option_reply(s, op, OPT_SET_META_CONTEXT).await?;
        refused(op, &h, &data)?;
        match h.kind {
            REP_META_CONTEXT => {
                let c = wire::parse_meta_context(&data).map_err(proto(op))?;
                if granted.iter().any(|g| g.id == c.id) {
                    return Err(proto(op)(ProtoError::DuplicateContext(c.id)));
                }
                granted.push(c);
            }
            REP_ACK => {
                let missing = contexts
                    .iter()
                    .filter(|want| !granted.iter().any(|g| g.name == **want))
                    .map(|m| m.to_string())
                    .collect();
                return Ok((granted, missing));
            }
            kind => return Err(unexpected(op, OPT_SET_META_CONTEXT, kind)),
        }
    }
    Err(proto(op)(ProtoError::TooManyReplies))
}

async fn go<S>(s: &mut S, export_name: &str) -> Result<ExportInfo, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let op = Op::Go;
    let data = wire::go_data(export_name, &[INFO_BLOCK_SIZE])
        .map_err(|source| NbdError::InvalidName { op, source })?;
    send_option(s, op, OPT_GO, &data).await?;
    let mut size_flags = None;
    let mut block_size = None;
    for _ in 0..=MAX_OPTION_REPLIES {
        let (h, data) = read_option_reply(s, op, OPT_GO).await?;
        refused(op, &h, &data)?;
        match h.kind {
            REP_INFO => match wire::parse_info(&data).map_err(proto(op))? {
                Info::Export { size, flags } => size_flags = Some((size, flags)),
                Info::BlockSize(b) => block_size = Some(b),
                Info::Other(_) => {}
            },
            REP_ACK => {
                let (size, flags) = size_flags.ok_or(proto(op)(ProtoError::NoExportInfo))?;
                return Ok(ExportInfo {
                    size,
                    flags,
                    block_size,
                });
            }
            kind => return Err(unexpected(op, OPT_GO, kind)),
        }
    }
    Err(proto(op)(ProtoError::TooManyReplies))
}

async fn send_option<S>(s: &mut S, op: Op, opt: u32, data: &[u8]) -> Result<(), NbdError>
where
    S: AsyncWrite + Unpin + Send,
{
    s.write_all(&wire::encode_option(opt, data))
        .await
        .map_err(io(op))?;
    s.flush().await.map_err(io(op))
}

/// Reads one option reply to `opt`: header, then its data (capped by the parser).
async fn read_option_reply<S>(
    s: &mut S,
    op: Op,
    opt: u32,
) -> Result<(wire::OptionReplyHeader, Vec<u8>), NbdError>
where
    S: AsyncRead + Unpin + Send,
{
    let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut hdr).await.map_err(io(op))?;
    let h = wire::parse_option_reply_header(&hdr, opt).map_err(proto(op))?;
    let mut data = vec![0u8; usize::try_from(h.len).unwrap_or(0)];
    s.read_exact(&mut data).await.map_err(io(op))?;
    Ok((h, data))
}

fn refused(op: Op, h: &wire::OptionReplyHeader, data: &[u8]) -> Result<(), NbdError> {
    if h.is_error() {
        return Err(NbdError::Refused {
            op,
            reply: h.kind,
            message: wire::error_message(data),
        });
    }
    Ok(())
}

fn unexpected(op: Op, opt: u32, kind: u32) -> NbdError {
    proto(op)(ProtoError::UnexpectedOptionReply { opt, kind })
}
