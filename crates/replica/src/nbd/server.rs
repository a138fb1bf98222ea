//! The async side of the NBD server.

use super::proto::{self, Command, ProtoError};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

/// What an export does. Errors are `std::io::Error`s; their errno goes to the client
/// (EIO when there is none).
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// A read-only export: the client is told so, and a write, trim or zeroing it
    /// sends anyway gets EPERM without reaching the backend.
    fn read_only(&self) -> bool {
        false
    }
    /// The largest read it answers (told to the client; a larger one gets EINVAL).
    fn max_read(&self) -> u32 {
        proto::MAX_PAYLOAD
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>>;
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()>;
    async fn flush(&self) -> std::io::Result<()>;
    /// Discard: the range reads as zeroes afterwards (on every replica alike).
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()>;
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()>;
}

/// Finds the export a client names.
pub trait Exports: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Backend>>;
    fn names(&self) -> Vec<String>;
}

/// Requests one connection may have in flight.
const IN_FLIGHT: usize = 128;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O")]
    Io(#[from] std::io::Error),
    #[error("protocol")]
    Proto(#[from] ProtoError),
    #[error("client sent client flags {0:#x} without fixed newstyle")]
    Flags(u32),
}

/// Serves one client connection to its end. Protocol errors close the connection
/// (logged); they never reach the export.
pub async fn serve<S>(stream: S, exports: Arc<dyn Exports>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    match handshake(&mut rd, &mut wr, &*exports).await {
        Ok(Some(backend)) => {
            if let Err(e) = transmission(rd, wr, backend).await {
                tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "NBD client dropped");
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "NBD handshake failed")
        }
    }
}

async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &dyn Exports,
) -> Result<Option<Arc<dyn Backend>>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::greeting()).await?;
    wr.flush().await?;
    let cflags = rd.read_u32().await?;
    if cflags & proto::FLAG_FIXED_NEWSTYLE as u32 == 0 {
        return Err(ConnError::Flags(cflags));
    }
    let no_zeroes = cflags & proto::FLAG_NO_ZEROES as u32 != 0;
    loop {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let (opt, len) = proto::parse_option_header(&h)?;
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match opt {
            proto::OPT_GO | proto::OPT_INFO => {
                let go = match proto::parse_go(&data) {
                    Ok(g) => g,
                    Err(e) => {
                        let msg = e.to_string();
                        wr.write_all(&proto::option_reply(
                            opt,
                            proto::REP_ERR_INVALID,
                            msg.as_bytes(),
                        ))
                        .await?;
                        continue;
                    }
                };
                let Some(b) = exports.lookup(&go.name) else {
                    let msg = format!("no export named {:?}", go.name);
                    wr.write_all(&proto::option_reply(
                        opt,
                        proto::REP_ERR_UNKNOWN,
                        msg.as_bytes(),
                    ))
                    .await?;
                    continue;
                };
                wr.write_all(&proto::option_reply(
                    opt,
                    proto::REP_INFO,
                    &proto::info_export(b.size(), b.read_only()),
                ))
                .await?;
                if go.infos.contains(&proto::INFO_BLOCK_SIZE) {
                    wr.write_all(&proto::option_reply(
                        opt,
                        proto::REP_INFO,
                        &proto::info_block_size(b.max_read()),
                    ))
                    .await?;
                }
                wr.write_all(&proto::option_reply(opt, proto::REP_ACK, &[]))
                    .await?;
                wr.flush().await?;
                if opt == proto::OPT_GO {
                    return Ok(Some(b));
                }
            }
            proto::OPT_EXPORT_NAME => {
                // No reply is possible on error: close.
                let name = String::from_utf8(data).map_err(|_| ProtoError::Name)?;
                let Some(b) = exports.lookup(&name) else {
                    return Ok(None);
                };
                wr.write_all(&b.size().to_be_bytes()).await?;
                wr.write_all(&proto::export_flags(b.read_only()).to_be_bytes())
                    .await?;
                if !no_zeroes {
                    wr.write_all(&[0u8; 124]).await?;
                }
                wr.flush().await?;
                return Ok(Some(b));
            }
            proto::OPT_LIST => {
                for n in exports.names() {
                    let mut d = u32::try_from(n.len())
                        .unwrap_or(u32::MAX)
                        .to_be_bytes()
                        .to_vec();
                    d.extend_from_slice(n.as_bytes());
                    wr.write_all(&proto::option_reply(opt, proto::REP_SERVER, &d))
                        .await?;
                }
                wr.write_all(&proto::option_reply(opt, proto::REP_ACK, &[]))
                    .await?;
                wr.flush().await?;
            }
            proto::OPT_ABORT => {
                let _ = wr
                    .write_all(&proto::option_reply(opt, proto::REP_ACK, &[]))
                    .await;
                let _ = wr.flush().await;
                return Ok(None);
            }
            _ => {
                wr.write_all(&proto::option_reply(opt, proto::REP_ERR_UNSUP, &[]))
                    .await?;
                wr.flush().await?;
            }
        }
    }
}

fn errno(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(n) if n == libc::ENOSPC => proto::ENOSPC,
        Some(n) if n == libc::EINVAL => proto::EINVAL,
        Some(n) if n == libc::ESHUTDOWN => proto::ESHUTDOWN,
        _ => proto::EIO,
    }
}

async fn transmission<R, W>(rd: R, wr: W, backend: Arc<dyn Backend>) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut wr = tokio::io::BufWriter::new(wr);
        while let Some(buf) = rx.recv().await {
            wr.write_all(&buf).await?;
            // Batch replies that are already waiting.
            while let Ok(more) = rx.try_recv() {
                wr.write_all(&more).await?;
            }
            wr.flush().await?;
        }
        let _ = wr.shutdown().await;
        Ok::<_, std::io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let size = backend.size();
    // Requests that arrive together are read with one call.
    let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
    let result = loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        if let Err(e) = rd.read_exact(&mut h).await {
            break Err(e.into());
        }
        let req = match proto::parse_request(&h) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let payload = match crate::conn::read_vec(&mut rd, req.payload() as usize).await {
            Ok(p) => p,
            Err(e) => break Err(e.into()),
        };
        if req.cmd == Command::Disconnect {
            break Ok(());
        }
        let writes = matches!(
            req.cmd,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        let too_long = req.cmd == Command::Read && req.len > backend.max_read();
        if let Some(err) = req
            .check(size)
            .or((writes && backend.read_only()).then_some(proto::EPERM))
            .or(too_long.then_some(proto::EINVAL))
        {
            if tx
                .send(proto::simple_reply(req.cookie, err).to_vec())
                .await
                .is_err()
            {
                break Ok(());
            }
            continue;
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let b = backend.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let fua = req.fua();
            let reply = match req.cmd {
                Command::Read => b.read(req.offset, req.len).await.map(Some),
                Command::Write => b.write(req.offset, payload, fua).await.map(|_| None),
                Command::Flush => b.flush().await.map(|_| None),
                Command::Trim => b.trim(req.offset, req.len, fua).await.map(|_| None),
                Command::WriteZeroes => {
                    b.write_zeroes(req.offset, req.len, fua).await.map(|_| None)
                }
                Command::Disconnect | Command::Other(_) => Ok(None),
            };
            let buf = match reply {
                Ok(data) => {
                    let mut v = proto::simple_reply(req.cookie, 0).to_vec();
                    if let Some(d) = data {
                        v.extend_from_slice(&d);
                    }
                    v
                }
                Err(e) => {
                    tracing::warn!(error = %e, cmd = ?req.cmd, offset = req.offset, "NBD request failed");
                    proto::simple_reply(req.cookie, errno(&e)).to_vec()
                }
            };
            let _ = tx.send(buf).await;
        });
    };
    // Let requests in flight finish and their replies go out.
    let _ = slots
        .acquire_many(u32::try_from(IN_FLIGHT).unwrap_or(u32::MAX))
        .await;
    drop(tx);
    let _ = writer.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A read-only export of 1 MiB of 0x5a; counts what reaches it.
    struct Ro(Mutex<u32>);

    #[async_trait::async_trait]
    impl Backend for Ro {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            true
        }
        async fn read(&self, _: u64, len: u32) -> std::io::Result<Vec<u8>> {
            Ok(vec![0x5a; len as usize])
        }
        async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> std::io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
        async fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }

    struct One(Arc<Ro>);
    impl Exports for One {
        fn lookup(&self, name: &str) -> Option<Arc<dyn Backend>> {
            (name == "disk0").then(|| self.0.clone() as Arc<dyn Backend>)
        }
        fn names(&self) -> Vec<String> {
            vec!["disk0".into()]
        }
    }

    async fn reply(c: &mut tokio::io::DuplexStream) -> (u32, u64) {
        let mut r = [0u8; 16];
        c.read_exact(&mut r).await.unwrap();
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    /// A read-only export says so at `NBD_OPT_GO`, answers reads, and refuses a write,
    /// trim or zeroing a client sends anyway with EPERM: none reaches the backend.
    #[tokio::test]
    async fn a_read_only_export_refuses_writes_before_the_backend() {
        let backend = Arc::new(Ro(Mutex::new(0)));
        let (mut c, s) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(s, Arc::new(One(backend.clone()))));
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        c.write_all(&1u32.to_be_bytes()).await.unwrap();
        let mut go = 5u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk0");
        go.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        opt.extend_from_slice(&u32::try_from(go.len()).unwrap().to_be_bytes());
        opt.extend_from_slice(&go);
        c.write_all(&opt).await.unwrap();
        let mut flags = None;
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).await.unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            c.read_exact(&mut data).await.unwrap();
            if kind == proto::REP_INFO && data[..2] == proto::INFO_EXPORT.to_be_bytes() {
                flags = Some(u16::from_be_bytes(data[10..12].try_into().unwrap()));
            }
            if kind == proto::REP_ACK {
                break;
            }
        }
        let flags = flags.unwrap();
        assert_ne!(flags & proto::TF_READ_ONLY, 0, "{flags:#x}");
        assert_eq!(flags & proto::TF_SEND_TRIM, 0, "{flags:#x}");
        let mut write = request(1, 1, 0, 512);
        write.extend_from_slice(&[0xee; 512]);
        c.write_all(&write).await.unwrap();
        assert_eq!(reply(&mut c).await, (proto::EPERM, 1));
        for (cmd, cookie) in [(4u16, 2u64), (6, 3)] {
            c.write_all(&request(cmd, cookie, 0, 4096)).await.unwrap();
            assert_eq!(reply(&mut c).await, (proto::EPERM, cookie));
        }
        c.write_all(&request(0, 4, 4096, 8)).await.unwrap();
        assert_eq!(reply(&mut c).await, (0, 4));
        let mut data = [0u8; 8];
        c.read_exact(&mut data).await.unwrap();
        assert_eq!(data, [0x5a; 8]);
        assert_eq!(*backend.0.lock().unwrap(), 0, "a write reached the backend");
    }
}
