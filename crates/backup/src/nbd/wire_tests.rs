//! Tests of the handshake and header parsers in [`super::wire`]: what QEMU sends is
//! accepted, what a hostile server could send is refused, random bytes never panic.

use super::wire::*;
use proptest::prelude::*;

fn greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&flags.to_be_bytes());
    g
}

fn option_reply_header(opt: u32, kind: u32, len: u32) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    h[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&kind.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

#[test]
fn greeting_fixed_newstyle_gives_flags() {
    let flags = parse_greeting(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).unwrap();
    assert_eq!(
        client_flags(flags),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
}

#[test]
fn greeting_without_no_zeroes_client_does_not_set_it() {
    let flags = parse_greeting(&greeting(FLAG_FIXED_NEWSTYLE)).unwrap();
    assert_eq!(client_flags(flags), FLAG_C_FIXED_NEWSTYLE);
}

#[test]
fn greeting_oldstyle_or_unfixed_is_refused() {
    let mut old = greeting(0);
    old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    assert!(matches!(
        parse_greeting(&old),
        Err(ProtoError::Magic {
            what: "newstyle",
            ..
        })
    ));
    assert_eq!(
        parse_greeting(&greeting(FLAG_NO_ZEROES)),
        Err(ProtoError::NotFixedNewstyle(FLAG_NO_ZEROES))
    );
    let mut bad = greeting(1);
    bad[0] = b'X';
    assert!(matches!(
        parse_greeting(&bad),
        Err(ProtoError::Magic {
            what: "greeting",
            ..
        })
    ));
}

#[test]
fn set_meta_context_data_layout() {
    let d = set_meta_context_data("vol", &["base:allocation", "qemu:dirty-bitmap:b"]).unwrap();
    let mut want = 3u32.to_be_bytes().to_vec();
    want.extend_from_slice(b"vol");
    want.extend_from_slice(&2u32.to_be_bytes());
    want.extend_from_slice(&15u32.to_be_bytes());
    want.extend_from_slice(b"base:allocation");
    want.extend_from_slice(&19u32.to_be_bytes());
    want.extend_from_slice(b"qemu:dirty-bitmap:b");
    assert_eq!(d, want);
}

#[test]
fn names_too_long_or_with_nul_are_refused() {
    let long = "x".repeat(MAX_STRING + 1);
    assert_eq!(
        set_meta_context_data(&long, &["base:allocation"]),
        Err(NameError::TooLong("export name"))
    );
    assert_eq!(
        set_meta_context_data("", &["a\0b"]),
        Err(NameError::Nul("context name"))
    );
    assert_eq!(set_meta_context_data("", &[]), Err(NameError::NoContexts));
    assert_eq!(go_data(&long, &[]), Err(NameError::TooLong("export name")));
}

#[test]
fn go_data_layout() {
    let d = go_data("", &[INFO_BLOCK_SIZE]).unwrap();
    assert_eq!(d, vec![0, 0, 0, 0, 0, 1, 0, 3]);
    let o = encode_option(OPT_GO, &d);
    assert_eq!(&o[0..8], &IHAVEOPT.to_be_bytes());
    assert_eq!(&o[8..12], &OPT_GO.to_be_bytes());
    assert_eq!(&o[12..16], &8u32.to_be_bytes());
    assert_eq!(&o[16..], &d[..]);
}

#[test]
fn option_reply_header_checks_magic_option_and_cap() {
    let h = parse_option_reply_header(&option_reply_header(OPT_GO, REP_INFO, 12), OPT_GO).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            kind: REP_INFO,
            len: 12
        }
    );
    assert_eq!(
        parse_option_reply_header(&option_reply_header(OPT_ABORT, REP_ACK, 0), OPT_GO),
        Err(ProtoError::WrongOption {
            sent: OPT_GO,
            got: OPT_ABORT
        })
    );
    assert!(matches!(
        parse_option_reply_header(
            &option_reply_header(OPT_GO, REP_INFO, MAX_OPTION_REPLY + 1),
            OPT_GO
        ),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(matches!(
        parse_option_reply_header(&option_reply_header(OPT_GO, REP_INFO, u32::MAX), OPT_GO),
        Err(ProtoError::TooLong { .. })
    ));
    let mut bad = option_reply_header(OPT_GO, REP_ACK, 0);
    bad[7] ^= 1;
    assert!(matches!(
        parse_option_reply_header(&bad, OPT_GO),
        Err(ProtoError::Magic { .. })
    ));
}

#[test]
fn option_error_reply_is_an_error_with_its_name() {
    let h = parse_option_reply_header(&option_reply_header(OPT_GO, REP_ERR_BIT + 6, 0), OPT_GO)
        .unwrap();
    assert!(h.is_error());
    assert_eq!(rep_err_name(h.kind), "NBD_REP_ERR_UNKNOWN");
    assert_eq!(
        error_message(b"no such export \xff"),
        "no such export \u{fffd}"
    );
}

#[test]
fn meta_context_reply_parses_id_and_name() {
    let mut d = 7u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"qemu:dirty-bitmap:b0");
    assert_eq!(
        parse_meta_context(&d).unwrap(),
        MetaContext {
            id: 7,
            name: "qemu:dirty-bitmap:b0".into()
        }
    );
    assert!(parse_meta_context(&[0, 0, 1]).is_err());
    let mut bad = 1u32.to_be_bytes().to_vec();
    bad.push(0xff);
    assert_eq!(parse_meta_context(&bad), Err(ProtoError::ContextName));
}

#[test]
fn info_export_and_block_size_are_checked() {
    let mut e = INFO_EXPORT.to_be_bytes().to_vec();
    e.extend_from_slice(&(64u64 << 20).to_be_bytes());
    e.extend_from_slice(&(TF_HAS_FLAGS | TF_READ_ONLY).to_be_bytes());
    assert_eq!(
        parse_info(&e).unwrap(),
        Info::Export {
            size: 64 << 20,
            flags: TF_HAS_FLAGS | TF_READ_ONLY
        }
    );
    let mut huge = INFO_EXPORT.to_be_bytes().to_vec();
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    huge.extend_from_slice(&1u16.to_be_bytes());
    assert_eq!(parse_info(&huge), Err(ProtoError::ExportSize(u64::MAX)));
    assert!(parse_info(&e[..11]).is_err());

    let bs = |min: u32, pref: u32, max: u32| {
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        parse_info(&b)
    };
    assert_eq!(
        bs(1, 4096, 32 << 20).unwrap(),
        Info::BlockSize(BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20
        })
    );
    assert!(matches!(
        bs(0, 4096, 1 << 20),
        Err(ProtoError::BlockSize { .. })
    ));
    assert!(matches!(
        bs(512, 256, 1 << 20),
        Err(ProtoError::BlockSize { .. })
    ));
    assert!(matches!(
        bs(512, 4096, 1024),
        Err(ProtoError::BlockSize { .. })
    ));
    assert_eq!(parse_info(&[0, 1, b'n']).unwrap(), Info::Other(1));
}

#[test]
fn request_layout() {
    let r = encode_request(CMD_BLOCK_STATUS, 9, 4096, 512);
    assert_eq!(&r[0..4], &REQUEST_MAGIC.to_be_bytes());
    assert_eq!(&r[4..6], &[0, 0]);
    assert_eq!(&r[6..8], &CMD_BLOCK_STATUS.to_be_bytes());
    assert_eq!(&r[8..16], &9u64.to_be_bytes());
    assert_eq!(&r[16..24], &4096u64.to_be_bytes());
    assert_eq!(&r[24..28], &512u32.to_be_bytes());
}

#[test]
fn reply_headers_parse_and_wrong_cookie_is_refused() {
    assert_eq!(
        parse_reply_magic(STRUCTURED_REPLY_MAGIC.to_be_bytes()).unwrap(),
        ReplyMagic::Structured
    );
    assert_eq!(
        parse_reply_magic(SIMPLE_REPLY_MAGIC.to_be_bytes()).unwrap(),
        ReplyMagic::Simple
    );
    // the extended-header magic is never negotiated, so it is garbage here
    assert!(parse_reply_magic(0x6e8a_278cu32.to_be_bytes()).is_err());

    let mut rest = [0u8; CHUNK_REST_LEN];
    rest[0..2].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    rest[2..4].copy_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
    rest[4..12].copy_from_slice(&5u64.to_be_bytes());
    rest[12..16].copy_from_slice(&20u32.to_be_bytes());
    let h = parse_chunk_header(&rest);
    assert!(h.done());
    assert_eq!((h.kind, h.cookie, h.len), (REPLY_TYPE_BLOCK_STATUS, 5, 20));
    assert_eq!(
        check_cookie(6, h.cookie),
        Err(ProtoError::WrongCookie {
            expected: 6,
            got: 5
        })
    );

    let mut simple = [0u8; SIMPLE_REST_LEN];
    simple[0..4].copy_from_slice(&22u32.to_be_bytes());
    simple[4..12].copy_from_slice(&3u64.to_be_bytes());
    assert_eq!(
        parse_simple_reply(&simple),
        SimpleReply {
            error: 22,
            cookie: 3
        }
    );
}

proptest! {
    #[test]
    fn random_bytes_never_panic_the_handshake_parsers(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        opt in any::<u32>(),
    ) {
        let mut g = [0u8; GREETING_LEN];
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        for (i, b) in bytes.iter().enumerate() {
            if let Some(x) = g.get_mut(i) { *x = *b; }
            if let Some(x) = h.get_mut(i) { *x = *b; }
        }
        let _ = parse_greeting(&g);
        if let Ok(r) = parse_option_reply_header(&h, opt) {
            prop_assert!(r.len <= MAX_OPTION_REPLY);
        }
        let _ = parse_meta_context(&bytes);
        if let Ok(Info::Export { size, .. }) = parse_info(&bytes) {
            prop_assert!(size <= MAX_EXPORT_SIZE);
        }
        let _ = error_message(&bytes);
        let mut m = [0u8; 4];
        m.copy_from_slice(&g[..4]);
        let _ = parse_reply_magic(m);
    }
}
