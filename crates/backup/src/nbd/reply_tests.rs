//! Tests of the reply validators in [`super::reply`] with crafted chunks: what QEMU
//! sends assembles, what a hostile server could send (data beyond the range, overlaps,
//! short replies, oversized lengths, extents past the request, unknown contexts) is a
//! protocol error, and random chunk streams never panic.

use super::reply::*;
use super::wire::*;
use proptest::prelude::*;

fn hdr(kind: u16, len: u32, done: bool) -> ChunkHeader {
    ChunkHeader {
        flags: if done { REPLY_FLAG_DONE } else { 0 },
        kind,
        cookie: 1,
        len,
    }
}

/// Feeds one chunk (header and whole payload) to a read reply, like the connection.
fn feed_read(
    r: &mut ReadReply,
    h: ChunkHeader,
    payload: &[u8],
    buf: &mut [u8],
) -> Result<(), ProtoError> {
    match r.on_header(&h)? {
        ReadNext::DataOffset => {
            let mut at = [0u8; 8];
            at.copy_from_slice(payload.get(..8).ok_or(ProtoError::ZeroError)?);
            let range = r.on_data_offset(&h, at)?;
            buf[range].copy_from_slice(&payload[8..]);
            Ok(())
        }
        ReadNext::Payload(n) => {
            assert_eq!(n, payload.len(), "test payload must match header");
            r.on_payload(&h, payload, buf)
        }
    }
}

fn data(offset: u64, bytes: &[u8]) -> (ChunkHeader, Vec<u8>) {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    (
        hdr(
            REPLY_TYPE_OFFSET_DATA,
            u32::try_from(p.len()).unwrap(),
            false,
        ),
        p,
    )
}

fn hole(offset: u64, size: u32) -> (ChunkHeader, Vec<u8>) {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    (hdr(REPLY_TYPE_OFFSET_HOLE, 12, false), p)
}

fn error_chunk(kind: u16, errno: u32, msg: &str, offset: Option<u64>) -> (ChunkHeader, Vec<u8>) {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&u16::try_from(msg.len()).unwrap().to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    (hdr(kind, u32::try_from(p.len()).unwrap(), false), p)
}

fn status(id: u32, extents: &[(u32, u32)]) -> (ChunkHeader, Vec<u8>) {
    let mut p = id.to_be_bytes().to_vec();
    for (len, flags) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    (
        hdr(
            REPLY_TYPE_BLOCK_STATUS,
            u32::try_from(p.len()).unwrap(),
            false,
        ),
        p,
    )
}

fn none() -> (ChunkHeader, Vec<u8>) {
    (hdr(REPLY_TYPE_NONE, 0, true), Vec::new())
}

#[test]
fn read_data_and_hole_in_any_order_assemble() {
    let mut buf = vec![0xeeu8; 4096];
    let mut r = ReadReply::new(8192, 4096);
    let (h, p) = data(8192 + 1024, &[0xab; 1024]);
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    let (h, p) = hole(8192, 1024);
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    let (h, p) = data(8192 + 2048, &[0xcd; 2048]);
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    let (h, p) = none();
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    assert_eq!(r.finish().unwrap(), Ok(()));
    assert!(buf[..1024].iter().all(|b| *b == 0));
    assert!(buf[1024..2048].iter().all(|b| *b == 0xab));
    assert!(buf[2048..].iter().all(|b| *b == 0xcd));
}

#[test]
fn read_data_beyond_range_is_refused() {
    let mut buf = vec![0u8; 512];
    let mut r = ReadReply::new(4096, 512);
    let (h, p) = data(4096 + 256, &[1; 512]);
    assert!(matches!(
        feed_read(&mut r, h, &p, &mut buf),
        Err(ProtoError::OutsideRequest { .. })
    ));
    let mut r = ReadReply::new(4096, 512);
    let (h, p) = data(0, &[1; 16]);
    assert!(matches!(
        feed_read(&mut r, h, &p, &mut buf),
        Err(ProtoError::OutsideRequest { .. })
    ));
    // an offset near u64::MAX must not wrap around into the range
    let mut r = ReadReply::new(4096, 512);
    let (h, p) = hole(u64::MAX - 10, 100);
    assert!(matches!(
        feed_read(&mut r, h, &p, &mut buf),
        Err(ProtoError::OutsideRequest { .. })
    ));
}

#[test]
fn read_chunk_longer_than_request_is_refused_before_reading() {
    let mut r = ReadReply::new(0, 512);
    // a data chunk claiming 4 GiB: refused from the header alone
    assert!(matches!(
        r.on_header(&hdr(REPLY_TYPE_OFFSET_DATA, u32::MAX, false)),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(matches!(
        r.on_header(&hdr(REPLY_TYPE_OFFSET_DATA, 8, false)),
        Err(ProtoError::Malformed { .. })
    ));
    assert!(matches!(
        r.on_header(&hdr(REPLY_TYPE_OFFSET_HOLE, 13, false)),
        Err(ProtoError::Malformed { .. })
    ));
    assert!(matches!(
        r.on_header(&hdr(REPLY_TYPE_ERROR, MAX_ERROR_PAYLOAD + 1, false)),
        Err(ProtoError::TooLong { .. })
    ));
    // block status chunks have no place in a read reply
    assert!(matches!(
        r.on_header(&hdr(REPLY_TYPE_BLOCK_STATUS, 12, true)),
        Err(ProtoError::UnexpectedChunk { .. })
    ));
    // NONE must be empty and final
    assert!(r.on_header(&hdr(REPLY_TYPE_NONE, 0, false)).is_err());
    assert!(r.on_header(&hdr(REPLY_TYPE_NONE, 4, true)).is_err());
}

#[test]
fn read_overlapping_chunks_are_refused() {
    let mut buf = vec![0u8; 1024];
    let mut r = ReadReply::new(0, 1024);
    let (h, p) = data(512, &[1; 512]);
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    let (h, p) = hole(0, 513);
    assert_eq!(
        feed_read(&mut r, h, &p, &mut buf),
        Err(ProtoError::Overlap {
            offset: 0,
            len: 513
        })
    );
    let (h, p) = data(1000, &[1; 24]);
    assert!(matches!(
        feed_read(&mut r, h, &p, &mut buf),
        Err(ProtoError::Overlap { .. })
    ));
}

#[test]
fn read_many_adjacent_chunks_merge_scattered_ones_hit_the_cap() {
    let n = u32::try_from(2 * MAX_READ_FRAGMENTS + 4).unwrap();
    let mut buf = vec![0u8; usize::try_from(n).unwrap()];
    // one-byte chunks in order: fine, they merge as they come
    let mut r = ReadReply::new(0, n);
    for i in 0..u64::from(n) {
        let (h, p) = data(i, &[1]);
        feed_read(&mut r, h, &p, &mut buf).unwrap();
    }
    assert_eq!(r.finish().unwrap(), Ok(()));
    // every other byte first: the pieces pile up until the cap
    let mut r = ReadReply::new(0, n);
    let mut res = Ok(());
    for i in (0..u64::from(n)).step_by(2) {
        let (h, p) = hole(i, 1);
        res = feed_read(&mut r, h, &p, &mut buf);
        if res.is_err() {
            break;
        }
    }
    assert_eq!(res, Err(ProtoError::TooFragmented));
}

#[test]
fn read_short_reply_is_refused() {
    let mut buf = vec![0u8; 1024];
    let mut r = ReadReply::new(0, 1024);
    let (h, p) = data(0, &[1; 1000]);
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    assert_eq!(
        r.finish(),
        Err(ProtoError::Incomplete {
            got: 1000,
            want: 1024
        })
    );
}

#[test]
fn read_zero_hole_is_refused() {
    let mut buf = vec![0u8; 1024];
    let mut r = ReadReply::new(0, 1024);
    let (h, p) = hole(0, 0);
    assert_eq!(
        feed_read(&mut r, h, &p, &mut buf),
        Err(ProtoError::ZeroLength("hole"))
    );
}

#[test]
fn read_error_chunk_is_the_server_error() {
    let mut buf = vec![0u8; 1024];
    let mut r = ReadReply::new(4096, 1024);
    let (h, p) = error_chunk(REPLY_TYPE_ERROR_OFFSET, 5, "bad sector", Some(4096 + 512));
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    let (h, p) = none();
    feed_read(&mut r, h, &p, &mut buf).unwrap();
    assert_eq!(
        r.finish().unwrap(),
        Err(ServerError {
            errno: 5,
            message: "bad sector".into(),
            offset: Some(4096 + 512)
        })
    );
}

#[test]
fn error_chunks_malformed_are_refused() {
    // message length past the payload
    let (h, mut p) = error_chunk(REPLY_TYPE_ERROR, 5, "abc", None);
    p[5] = 200;
    assert!(parse_error_chunk(h.kind, &p, 0..10).is_err());
    // error value 0
    let (h, p) = error_chunk(REPLY_TYPE_ERROR, 0, "", None);
    assert_eq!(
        parse_error_chunk(h.kind, &p, 0..10),
        Err(ProtoError::ZeroError)
    );
    // offset outside the request
    let (h, p) = error_chunk(REPLY_TYPE_ERROR_OFFSET, 5, "", Some(10));
    assert!(matches!(
        parse_error_chunk(h.kind, &p, 0..10),
        Err(ProtoError::OutsideRequest { .. })
    ));
    // an unknown error type still counts as an error, as the spec asks
    let (_, p) = error_chunk(REPLY_TYPE_ERROR_BIT + 77, 22, "new", None);
    assert_eq!(
        parse_error_chunk(REPLY_TYPE_ERROR_BIT + 77, &p, 0..10)
            .unwrap()
            .errno,
        22
    );
}

#[test]
fn status_reply_for_every_context_is_returned() {
    let ids = [1, 2];
    let mut r = StatusReply::new(0, 4 << 20, &ids);
    for (h, p) in [
        status(1, &[(1 << 20, 0), (3 << 20, STATE_HOLE_ZERO)]),
        status(2, &[(4 << 20, 1)]),
    ] {
        assert_eq!(r.on_header(&h).unwrap(), p.len());
        r.on_payload(&h, &p).unwrap();
    }
    let out = r.finish().unwrap().unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].extents,
        vec![
            Extent {
                offset: 0,
                len: 1 << 20,
                flags: 0
            },
            Extent {
                offset: 1 << 20,
                len: 3 << 20,
                flags: STATE_HOLE_ZERO
            }
        ]
    );
}

const STATE_HOLE_ZERO: u32 = 3;

#[test]
fn status_last_extent_past_the_end_is_clamped_earlier_ones_refused() {
    let ext = parse_extents(100..200, &[0, 0, 0, 50, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]).unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                offset: 100,
                len: 50,
                flags: 0
            },
            Extent {
                offset: 150,
                len: 50,
                flags: 1
            }
        ]
    );
    // a first extent covering the range, then another one beyond it
    let bad = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
    assert_eq!(
        parse_extents(100..200, &bad),
        Err(ProtoError::ExtentBeyondRequest {
            offset: 356,
            end: 200
        })
    );
    assert_eq!(
        parse_extents(0..10, &[0, 0, 0, 0, 0, 0, 0, 1]),
        Err(ProtoError::ZeroLength("extent"))
    );
    assert!(parse_extents(0..10, &[]).is_err());
    assert!(parse_extents(0..10, &[0, 0, 0, 1]).is_err());
}

#[test]
fn status_unknown_repeated_or_missing_context_is_refused() {
    let ids = [1, 2];
    let mut r = StatusReply::new(0, 4096, &ids);
    let (h, p) = status(9, &[(4096, 0)]);
    assert_eq!(r.on_payload(&h, &p), Err(ProtoError::UnknownContext(9)));
    let (h, p) = status(1, &[(4096, 0)]);
    r.on_payload(&h, &p).unwrap();
    assert_eq!(r.on_payload(&h, &p), Err(ProtoError::RepeatedContext(1)));
    assert_eq!(r.finish(), Err(ProtoError::MissingContext(2)));
}

#[test]
fn status_oversized_or_malformed_chunk_is_refused_from_the_header() {
    let ids = [1];
    let r = StatusReply::new(0, 4096, &ids);
    assert!(matches!(
        r.on_header(&hdr(REPLY_TYPE_BLOCK_STATUS, u32::MAX - 3, true)),
        Err(ProtoError::TooLong { .. }) | Err(ProtoError::Malformed { .. })
    ));
    assert!(matches!(
        r.on_header(&hdr(
            REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * (MAX_STATUS_EXTENTS + 1),
            true
        )),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(r.on_header(&hdr(REPLY_TYPE_BLOCK_STATUS, 4, true)).is_err());
    assert!(r
        .on_header(&hdr(REPLY_TYPE_BLOCK_STATUS, 13, true))
        .is_err());
    assert!(r
        .on_header(&hdr(REPLY_TYPE_OFFSET_DATA, 100, true))
        .is_err());
}

#[test]
fn status_error_chunk_is_the_server_error() {
    let ids = [1];
    let mut r = StatusReply::new(0, 4096, &ids);
    let (h, p) = error_chunk(REPLY_TYPE_ERROR, 22, "beyond end", None);
    r.on_payload(&h, &p).unwrap();
    assert_eq!(r.finish().unwrap().unwrap_err().errno, 22);
}

/// A chunk as a hostile server might send it: any type, flags, length and payload.
fn any_chunk() -> impl Strategy<Value = (u16, u16, Vec<u8>)> {
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
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..80),
    )
}

proptest! {
    #[test]
    fn random_read_chunks_never_panic_nor_escape_the_buffer(
        offset in 0u64..4096,
        len in 1u32..256,
        chunks in proptest::collection::vec(any_chunk(), 0..12),
    ) {
        let mut buf = vec![0u8; usize::try_from(len).unwrap()];
        let mut r = ReadReply::new(offset, len);
        for (kind, flags, payload) in chunks {
            let h = ChunkHeader { flags, kind, cookie: 1, len: u32::try_from(payload.len()).unwrap() };
            let step = match r.on_header(&h) {
                Ok(s) => s,
                Err(_) => break,
            };
            let ok = match step {
                ReadNext::DataOffset => {
                    let mut at = [0u8; 8];
                    at.copy_from_slice(&payload[..8]);
                    match r.on_data_offset(&h, at) {
                        Ok(range) => {
                            prop_assert!(range.end <= buf.len());
                            prop_assert_eq!(range.len(), payload.len() - 8);
                            true
                        }
                        Err(_) => false,
                    }
                }
                ReadNext::Payload(n) => {
                    prop_assert_eq!(n, payload.len());
                    r.on_payload(&h, &payload, &mut buf).is_ok()
                }
            };
            if !ok || h.done() {
                break;
            }
        }
        let _ = r.finish();
    }

    #[test]
    fn random_status_chunks_never_panic_and_extents_stay_in_range(
        offset in 0u64..1 << 40,
        len in 1u32..,
        chunks in proptest::collection::vec(any_chunk(), 0..8),
    ) {
        let ids = [0u32, 1, 7];
        let mut r = StatusReply::new(offset, len, &ids);
        for (kind, flags, payload) in chunks {
            let h = ChunkHeader { flags, kind, cookie: 1, len: u32::try_from(payload.len()).unwrap() };
            let Ok(n) = r.on_header(&h) else { break };
            prop_assert_eq!(n, payload.len());
            if r.on_payload(&h, &payload).is_err() || h.done() {
                break;
            }
        }
        if let Ok(Ok(all)) = r.finish() {
            for c in all {
                let mut pos = offset;
                for e in c.extents {
                    prop_assert_eq!(e.offset, pos);
                    prop_assert!(e.len > 0);
                    pos += e.len;
                }
                prop_assert!(pos <= offset + u64::from(len));
            }
        }
    }

    /// A valid reply split into data and hole chunks sent in any order assembles to
    /// the original bytes.
    #[test]
    fn valid_chunks_in_any_order_assemble(
        content in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 1..512),
        cuts in proptest::collection::vec(1usize..64, 0..16),
        order in any::<u64>(),
    ) {
        let len = content.len();
        let mut pieces = Vec::new();
        let mut pos = 0;
        for c in cuts.into_iter().chain(std::iter::once(usize::MAX)) {
            if pos >= len { break; }
            let end = pos.saturating_add(c).min(len);
            pieces.push(pos..end);
            pos = end;
        }
        let n = pieces.len();
        let rot = usize::try_from(order % u64::try_from(n).unwrap()).unwrap();
        pieces.rotate_left(rot);
        let base = 1 << 20;
        let mut r = ReadReply::new(base, u32::try_from(len).unwrap());
        let mut buf = vec![0x55u8; len];
        for p in pieces {
            let at = base + u64::try_from(p.start).unwrap();
            let (h, payload) = if content[p.clone()].iter().all(|b| *b == 0) {
                hole(at, u32::try_from(p.len()).unwrap())
            } else {
                data(at, &content[p])
            };
            feed_read(&mut r, h, &payload, &mut buf).unwrap();
        }
        prop_assert_eq!(r.finish().unwrap(), Ok(()));
        prop_assert_eq!(buf, content);
    }
}
