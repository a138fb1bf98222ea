use super::*;
use crate::proto::{Op, Request};

fn tree(root: &Path) -> Vec<Disk> {
    vec![
        Disk {
            name: "disk0".into(),
            size: 64 << 20,
            volumes: vec![
                Volume {
                    name: "p1".into(),
                    size: 60 << 20,
                    fs: Some("ext4".into()),
                    mount: Ok(root.to_path_buf()),
                },
                Volume {
                    name: "p2".into(),
                    size: 1 << 20,
                    fs: None,
                    mount: Err("no filesystem recognised".into()),
                },
            ],
        },
        Disk {
            name: "disk1".into(),
            size: 1 << 20,
            volumes: vec![],
        },
    ]
}

fn ask(disks: &[Disk], op: Op) -> (Reply, Vec<u8>, bool) {
    let mut out = Vec::new();
    // garbage before the marker (an earlier answer's tail) is skipped
    out.extend_from_slice(b"\x02\x00\x00\x00\x05tail!");
    let req = Request { id: 77, op };
    answer(disks, &req, &mut out).unwrap();
    parse_answer(&out, 77).unwrap()
}

fn listing(r: Reply) -> Vec<Entry> {
    match r {
        Reply::Listing { entries, .. } => entries,
        other => panic!("{other:?}"),
    }
}

fn error(r: Reply) -> (ErrorKind, String) {
    match r {
        Reply::Error { kind, message } => (kind, message),
        other => panic!("{other:?}"),
    }
}

fn fixture() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    std::fs::create_dir_all(r.join("etc/deep")).unwrap();
    std::fs::write(r.join("etc/hostname"), b"guest\n").unwrap();
    std::fs::write(r.join("etc/deep/big"), vec![7u8; 600_000]).unwrap();
    std::os::unix::fs::symlink("/etc", r.join("hostetc")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", r.join("etc/passwd-link")).unwrap();
    d
}

#[test]
fn root_disks_and_volumes() {
    let f = fixture();
    let t = tree(f.path());
    let e = listing(ask(&t, Op::List { path: "/".into() }).0);
    assert_eq!(
        e.iter()
            .map(|e| (e.name.as_str(), e.kind))
            .collect::<Vec<_>>(),
        [("disk0", EntryKind::Disk), ("disk1", EntryKind::Disk)]
    );
    let v = listing(
        ask(
            &t,
            Op::List {
                path: "/disk0".into(),
            },
        )
        .0,
    );
    assert_eq!(v[0].fs.as_deref(), Some("ext4"));
    assert_eq!(v[1].error.as_deref(), Some("no filesystem recognised"));
    let (k, m) = error(
        ask(
            &t,
            Op::List {
                path: "/disk0/p2/x".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::Unreadable, "{m}");
    let (k, _) = error(
        ask(
            &t,
            Op::List {
                path: "/disk9".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::NotFound);
    let (k, _) = error(
        ask(
            &t,
            Op::Read {
                path: "/disk0".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::WrongKind);
}

#[test]
fn folders_list_without_following_links() {
    let f = fixture();
    let t = tree(f.path());
    let e = listing(
        ask(
            &t,
            Op::List {
                path: "/disk0/p1".into(),
            },
        )
        .0,
    );
    let link = e.iter().find(|e| e.name == "hostetc").unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.target.as_deref(), Some("/etc"));
    let e = listing(
        ask(
            &t,
            Op::List {
                path: "/disk0/p1/etc".into(),
            },
        )
        .0,
    );
    let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["deep", "hostname", "passwd-link"]);
    assert_eq!(e[1].size, 6);
    // a link on the way, or as the folder listed, is not followed
    let (k, m) = error(
        ask(
            &t,
            Op::List {
                path: "/disk0/p1/hostetc".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::WrongKind, "{m}");
    let (k, m) = error(
        ask(
            &t,
            Op::Read {
                path: "/disk0/p1/hostetc/passwd".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::WrongKind, "{m}");
    assert!(m.contains("link"), "{m}");
    let (k, _) = error(
        ask(
            &t,
            Op::Read {
                path: "/disk0/p1/etc/passwd-link".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::WrongKind);
    let (k, _) = error(
        ask(
            &t,
            Op::Read {
                path: "/disk0/p1/../../etc/passwd".into(),
            },
        )
        .0,
    );
    assert_eq!(k, ErrorKind::Invalid);
}

#[test]
fn files_read_whole_in_bounded_frames() {
    let f = fixture();
    let t = tree(f.path());
    let (r, data, complete) = ask(
        &t,
        Op::Read {
            path: "/disk0/p1/etc/deep/big".into(),
        },
    );
    assert_eq!(
        r,
        Reply::Data {
            size: Some(600_000),
            archive: false
        }
    );
    assert!(complete);
    assert_eq!(data, vec![7u8; 600_000]);
}

#[test]
fn folders_archive_with_links_as_links() {
    let f = fixture();
    let t = tree(f.path());
    let (r, data, complete) = ask(
        &t,
        Op::Read {
            path: "/disk0/p1".into(),
        },
    );
    assert_eq!(
        r,
        Reply::Data {
            size: None,
            archive: true
        }
    );
    assert!(complete);
    let mut a = tar::Archive::new(&data[..]);
    let mut seen = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let kind = e.header().entry_type();
        if p.ends_with("hostetc") {
            assert!(kind.is_symlink());
            assert_eq!(e.link_name().unwrap().unwrap().to_str(), Some("/etc"));
        }
        if p.ends_with("big") {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            assert_eq!(v.len(), 600_000);
        }
        seen.push(p);
    }
    let root = f.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(seen.contains(&format!("{root}/etc/hostname")), "{seen:?}");
    // nothing of the host's /etc came in through the link
    assert!(!seen.iter().any(|p| p.contains("hostetc/")), "{seen:?}");
}

#[test]
fn huge_folders_are_cut_short() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..MAX_ENTRIES + 3 {
        std::fs::write(d.path().join(format!("f{i}")), b"").unwrap();
    }
    let t = tree(d.path());
    match ask(
        &t,
        Op::List {
            path: "/disk0/p1".into(),
        },
    )
    .0
    {
        Reply::Listing { entries, truncated } => {
            assert!(truncated);
            assert_eq!(entries.len(), MAX_ENTRIES);
        }
        other => panic!("{other:?}"),
    }
}
