use super::*;
use crate::StoreJson;

fn open() -> (tempfile::TempDir, SqliteStore) {
    let d = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&d.path().join("s.db")).unwrap();
    (d, s)
}

#[tokio::test]
async fn put_get_list_delete_revisions() {
    let (_d, s) = open();
    let r1 = s.put("/vms/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/vms/b", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/vms/a", b"3".to_vec(), None).await.unwrap();
    s.put("/vmsx", b"no".to_vec(), None).await.unwrap();
    assert!(r1 < r2 && r2 < r3);
    let a = s.get("/vms/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_rev, a.mod_rev, a.version),
        (&b"3"[..], r1, r3, 2)
    );
    let l = s.list("/vms/").await.unwrap();
    assert_eq!(
        l.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["/vms/a", "/vms/b"]
    );
    assert!(s.delete("/vms/a").await.unwrap());
    assert!(!s.delete("/vms/a").await.unwrap());
    assert!(s.get("/vms/a").await.unwrap().is_none());
}

#[tokio::test]
async fn txn_compare_and_swap_only_one_winner() {
    let (_d, s) = open();
    assert!(s.create_json("/owner/vm1", &"host1").await.unwrap());
    assert!(!s.create_json("/owner/vm1", &"host2").await.unwrap());
    let (_, kv) = s.get_json::<String>("/owner/vm1").await.unwrap().unwrap();
    assert!(s
        .cas_json("/owner/vm1", kv.mod_rev, &"host2")
        .await
        .unwrap());
    // The old revision no longer matches.
    assert!(!s
        .cas_json("/owner/vm1", kv.mod_rev, &"host3")
        .await
        .unwrap());
    let (v, _) = s.get_json::<String>("/owner/vm1").await.unwrap().unwrap();
    assert_eq!(v, "host2");
}

#[tokio::test]
async fn txn_failure_branch_and_gets() {
    let (_d, s) = open();
    s.put("k", b"v".to_vec(), None).await.unwrap();
    let r = s
        .txn(Txn {
            compare: vec![Compare::Value("k".into(), Cmp::Equal, b"other".to_vec())],
            success: vec![Op::Delete("k".into())],
            failure: vec![
                Op::Get("k".into()),
                Op::Put {
                    key: "f".into(),
                    value: b"1".to_vec(),
                    lease: None,
                },
            ],
        })
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.gets[0].as_ref().unwrap().value, b"v");
    assert!(s.get("f").await.unwrap().is_some());
}

#[tokio::test]
async fn lease_expiry_deletes_keys_and_keepalive_extends() {
    let (_d, s) = open();
    let short = s.grant_lease(Duration::from_millis(300)).await.unwrap();
    let kept = s.grant_lease(Duration::from_millis(600)).await.unwrap();
    s.put("/hosts/a", b"up".to_vec(), Some(short))
        .await
        .unwrap();
    s.put("/hosts/b", b"up".to_vec(), Some(kept)).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.keep_alive(kept).await.unwrap();
    }
    assert!(
        s.get("/hosts/a").await.unwrap().is_none(),
        "expired lease's key survived"
    );
    assert!(s.get("/hosts/b").await.unwrap().is_some());
    assert!(matches!(
        s.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        s.put("x", vec![], Some(short)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[tokio::test]
async fn watch_replays_history_then_live_events() {
    let (_d, s) = open();
    let r1 = s.put("/vms/a", b"1".to_vec(), None).await.unwrap();
    s.put("/other", b"x".to_vec(), None).await.unwrap();
    s.put("/vms/b", b"2".to_vec(), None).await.unwrap();
    let mut w = s.watch("/vms/", Some(r1 - 1)).await.unwrap();
    s.delete("/vms/a").await.unwrap();
    let mut got = vec![];
    for _ in 0..3 {
        let e = tokio::time::timeout(Duration::from_secs(2), w.recv())
            .await
            .unwrap()
            .unwrap();
        got.push((e.key, e.kind));
    }
    assert_eq!(
        got,
        [
            ("/vms/a".into(), EventKind::Put),
            ("/vms/b".into(), EventKind::Put),
            ("/vms/a".into(), EventKind::Delete)
        ]
    );
}

#[tokio::test]
async fn reopen_keeps_data_and_revision() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.db");
    let rev = {
        let s = SqliteStore::open(&p).unwrap();
        s.put("a", b"1".to_vec(), None).await.unwrap()
    };
    let s = SqliteStore::open(&p).unwrap();
    assert_eq!(s.revision().await.unwrap(), rev);
    assert_eq!(s.get("a").await.unwrap().unwrap().value, b"1");
}

#[tokio::test]
async fn failed_txn_op_rolls_back_everything() {
    let (_d, s) = open();
    let before = s.revision().await.unwrap();
    let r = s
        .txn(Txn {
            compare: vec![],
            success: vec![
                Op::Put {
                    key: "a".into(),
                    value: b"1".to_vec(),
                    lease: None,
                },
                Op::Put {
                    key: "b".into(),
                    value: b"1".to_vec(),
                    lease: Some(999),
                },
            ],
            failure: vec![],
        })
        .await;
    assert!(r.is_err());
    assert!(s.get("a").await.unwrap().is_none());
    assert_eq!(s.revision().await.unwrap(), before);
}
