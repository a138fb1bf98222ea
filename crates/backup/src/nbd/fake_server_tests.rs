//! The client against a scripted fake server on an in-memory pipe: option refusals
//! carry the server's message, contexts not granted are reported, and a server that
//! breaks the protocol (wrong cookie, data beyond the range) leaves the connection
//! broken while a well-formed error leaves it usable.

use super::wire::*;
use super::{NbdClient, NbdError, Op};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: u64 = 1 << 20;

async fn option_reply(s: &mut DuplexStream, opt: u32, kind: u32, data: &[u8]) {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).await.unwrap();
}

/// Reads one option: (option, data).
async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[0..8], &IHAVEOPT.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut d).await.unwrap();
    (opt, d)
}

/// Serves the handshake: structured replies accepted unless `refuse_structured`,
/// the contexts in `grant` granted when asked for, export of [`SIZE`] bytes with
/// 512-byte minimum and 1 MiB maximum block sizes.
async fn serve_handshake(s: &mut DuplexStream, refuse_structured: bool, grant: &[(u32, &str)]) {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).await.unwrap();
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(cf),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
    loop {
        let (opt, data) = read_option(s).await;
        match opt {
            OPT_STRUCTURED_REPLY if refuse_structured => {
                option_reply(s, opt, REP_ERR_BIT + 2, b"structured replies disabled here").await;
            }
            OPT_STRUCTURED_REPLY => option_reply(s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let text = String::from_utf8_lossy(&data).into_owned();
                for (id, name) in grant {
                    if text.contains(name) {
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        option_reply(s, opt, REP_META_CONTEXT, &d).await;
                    }
                }
                option_reply(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&(TF_HAS_FLAGS | TF_READ_ONLY).to_be_bytes());
                option_reply(s, opt, REP_INFO, &d).await;
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [512u32, 4096, 1 << 20] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(s, opt, REP_INFO, &b).await;
                option_reply(s, opt, REP_ACK, &[]).await;
                return;
            }
            OPT_ABORT => return,
            other => panic!("unexpected option {other}"),
        }
    }
}

/// Reads one request: (type, cookie, offset, length).
async fn read_request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
    let mut r = [0u8; REQUEST_LEN];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(&r[0..4], &REQUEST_MAGIC.to_be_bytes());
    (
        u16::from_be_bytes([r[6], r[7]]),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
        u64::from_be_bytes(r[16..24].try_into().unwrap()),
        u32::from_be_bytes(r[24..28].try_into().unwrap()),
    )
}

async fn chunk(s: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    v.extend_from_slice(payload);
    s.write_all(&v).await.unwrap();
}

fn data_payload(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    p
}

#[tokio::test]
async fn handshake_structured_refused_reports_server_message() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move { serve_handshake(&mut s, true, &[]).await });
    let err = NbdClient::handshake(c, "", &[]).await.unwrap_err();
    server.await.unwrap();
    assert!(matches!(
        err,
        NbdError::Refused {
            op: Op::StructuredReply,
            ..
        }
    ));
    let text = err.to_string();
    assert!(text.contains("NBD_REP_ERR_POLICY"), "{text}");
    assert!(text.contains("structured replies disabled here"), "{text}");
}

#[tokio::test]
async fn handshake_context_not_granted_is_reported_missing() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server =
        tokio::spawn(
            async move { serve_handshake(&mut s, false, &[(5, "base:allocation")]).await },
        );
    let client = NbdClient::handshake(c, "", &["base:allocation", "qemu:dirty-bitmap:gone"])
        .await
        .unwrap();
    server.await.unwrap();
    assert_eq!(client.size(), SIZE);
    assert_eq!(client.context_id("base:allocation"), Some(5));
    assert_eq!(client.missing_contexts(), ["qemu:dirty-bitmap:gone"]);
}

#[tokio::test]
async fn read_reply_with_wrong_cookie_breaks_the_connection() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, false, &[]).await;
        let (kind, cookie, offset, len) = read_request(&mut s).await;
        assert_eq!((kind, offset, len), (CMD_READ, 4096, 512));
        let p = data_payload(4096, &[7; 512]);
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie + 1,
            &p,
        )
        .await;
        s
    });
    let mut client = NbdClient::handshake(c, "", &[]).await.unwrap();
    let err = client.read(4096, 512).await.unwrap_err();
    let _s = server.await.unwrap();
    assert!(matches!(
        err,
        NbdError::Protocol {
            op: Op::Read,
            source: ProtoError::WrongCookie { .. }
        }
    ));
    assert!(client.is_broken());
    assert!(matches!(client.read(0, 512).await, Err(NbdError::Broken)));
}

#[tokio::test]
async fn read_data_beyond_the_request_breaks_the_connection() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, false, &[]).await;
        let (_, cookie, _, _) = read_request(&mut s).await;
        let p = data_payload(4096 + 256, &[7; 512]);
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &p).await;
        s
    });
    let mut client = NbdClient::handshake(c, "", &[]).await.unwrap();
    let err = client.read(4096, 512).await.unwrap_err();
    let _s = server.await.unwrap();
    assert!(matches!(
        err,
        NbdError::Protocol {
            source: ProtoError::OutsideRequest { .. },
            ..
        }
    ));
    assert!(err.should_reconnect());
}

#[tokio::test]
async fn server_error_chunk_keeps_the_connection_usable() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, false, &[]).await;
        let (_, cookie, _, _) = read_request(&mut s).await;
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&9u16.to_be_bytes());
        p.extend_from_slice(b"disk gone");
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, &p).await;
        let (_, cookie, offset, len) = read_request(&mut s).await;
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, &p).await;
        let (kind, _, _, _) = read_request(&mut s).await;
        assert_eq!(kind, CMD_DISC);
    });
    let mut client = NbdClient::handshake(c, "", &[]).await.unwrap();
    let err = client.read(0, 512).await.unwrap_err();
    assert!(err.to_string().contains("EIO"), "{err}");
    assert!(err.to_string().contains("disk gone"), "{err}");
    assert!(!client.is_broken());
    assert_eq!(client.read(512, 512).await.unwrap(), vec![0u8; 512]);
    client.disconnect().await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn requests_outside_the_export_are_refused_locally() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, false, &[(1, "base:allocation")]).await;
        s
    });
    let mut client = NbdClient::handshake(c, "", &["base:allocation"])
        .await
        .unwrap();
    let _s = server.await.unwrap();
    assert!(matches!(
        client.read(SIZE - 256, 512).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    assert!(matches!(
        client.read(u64::MAX, 1).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    assert!(matches!(
        client.read(0, 0).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    // over the server's 1 MiB maximum, and not 512-byte aligned
    assert_eq!(client.max_read(), 1 << 20);
    assert!(matches!(
        client.read(0, 2 << 20).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    assert!(matches!(
        client.read(100, 512).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    assert!(matches!(
        client.block_status(0, 1000, 1).await,
        Err(NbdError::InvalidRequest { .. })
    ));
    assert!(matches!(
        client.block_status(0, 4096, 2).await,
        Err(NbdError::UnknownContext(2))
    ));
    assert!(!client.is_broken());
}

/// A server that answers block status with one small extent per request: the range
/// walk asks again until it has covered the whole range and merges equal runs.
#[tokio::test]
async fn status_range_walk_asks_again_until_covered() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, false, &[(3, "base:allocation")]).await;
        let mut asked = Vec::new();
        loop {
            let (kind, cookie, offset, len) = read_request(&mut s).await;
            if kind == CMD_DISC {
                return asked;
            }
            asked.push((offset, len));
            // 64 KiB per answer; flags change every 256 KiB
            let flags = u32::from((offset / (256 << 10)) % 2 == 1);
            let mut p = 3u32.to_be_bytes().to_vec();
            p.extend_from_slice(&(64u32 << 10).min(len).to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
            chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p).await;
        }
    });
    let mut client = NbdClient::handshake(c, "", &["base:allocation"])
        .await
        .unwrap();
    let ext = client.block_status_range(0, SIZE, 3).await.unwrap();
    client.disconnect().await.unwrap();
    let asked = server.await.unwrap();
    assert_eq!(asked.len(), 16);
    assert_eq!(
        asked[1],
        (64 << 10, u32::try_from(SIZE).unwrap() - (64 << 10))
    );
    assert_eq!(ext.len(), 4);
    for (i, e) in ext.iter().enumerate() {
        let i = u64::try_from(i).unwrap();
        assert_eq!(
            (e.offset, e.len, e.flags),
            (i * (256 << 10), 256 << 10, u32::from(i % 2 == 1))
        );
    }
}

/// A chunk as a hostile server might send it, over the wire: any type and flags, the
/// right cookie or not, a length field that matches the payload or not.
fn hostile_chunk() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    (
        prop_oneof![
            Just(REPLY_TYPE_NONE),
            Just(REPLY_TYPE_OFFSET_DATA),
            Just(REPLY_TYPE_OFFSET_HOLE),
            Just(REPLY_TYPE_BLOCK_STATUS),
            Just(REPLY_TYPE_ERROR),
            Just(REPLY_TYPE_ERROR_OFFSET),
            any::<u16>(),
        ],
        0u16..4,
        prop_oneof![Just(1u64), any::<u64>()],
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(any::<u8>(), 0..48),
    )
        .prop_map(|(kind, flags, cookie, len, payload)| {
            let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            let n = len.unwrap_or(u32::try_from(payload.len()).unwrap());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&payload);
            v
        })
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(128))]

    /// Whatever the server answers, a read and a block status end with a value or an
    /// error, never a panic, and a read never returns other than the bytes asked for.
    #[test]
    fn hostile_replies_never_panic_the_client(
        chunks in proptest::collection::vec(hostile_chunk(), 0..6),
        status in proptest::bool::ANY,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (c, mut s) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                serve_handshake(&mut s, false, &[(1, "base:allocation")]).await;
                let _ = read_request(&mut s).await;
                for ch in chunks {
                    if s.write_all(&ch).await.is_err() {
                        break;
                    }
                }
                // dropping `s` ends the stream: the client sees EOF, not a hang
            });
            let mut client = NbdClient::handshake(c, "", &["base:allocation"]).await.unwrap();
            if status {
                if let Ok(ext) = client.block_status(4096, 8192, 1).await {
                    let end = ext.last().map(|e| e.offset + e.len).unwrap_or(4096);
                    assert!(ext.first().is_some_and(|e| e.offset == 4096));
                    assert!(end <= 4096 + 8192);
                }
            } else if let Ok(data) = client.read(4096, 1024).await {
                assert_eq!(data.len(), 1024);
            }
            server.await.unwrap();
        });
    }
}
