//! One suite of store tests, run against every backend: SQLite in a temp dir and a real
//! etcd member started for the test.

use crate::member::{self, MemberConfig};
use crate::StoreJson;
use crate::*;

/// Lease timings per backend (etcd's lease TTL has a floor of about 2 s).
#[derive(Clone, Copy)]
struct LeaseTimes {
    short: Duration,
    kept: Duration,
    tick: Duration,
    rounds: u32,
}

macro_rules! suite {
    ($backend:ident, $open:ident, $lease:expr) => {
        mod $backend {
            use super::*;
            #[tokio::test]
            async fn put_get_list_delete_revisions() {
                let (_g, s) = $open().await;
                super::put_get_list_delete_revisions(&*s).await
            }
            #[tokio::test]
            async fn txn_compare_and_swap_only_one_winner() {
                let (_g, s) = $open().await;
                super::txn_compare_and_swap_only_one_winner(&*s).await
            }
            #[tokio::test]
            async fn txn_failure_branch_and_gets() {
                let (_g, s) = $open().await;
                super::txn_failure_branch_and_gets(&*s).await
            }
            #[tokio::test]
            async fn lease_expiry_deletes_keys_and_keepalive_extends() {
                let (_g, s) = $open().await;
                super::lease_expiry_deletes_keys_and_keepalive_extends(&*s, $lease).await
            }
            #[tokio::test]
            async fn watch_replays_history_then_live_events() {
                let (_g, s) = $open().await;
                super::watch_replays_history_then_live_events(&*s).await
            }
            #[tokio::test]
            async fn listing_is_paged_and_a_mirror_follows() {
                let (_g, s) = $open().await;
                super::listing_is_paged_and_a_mirror_follows(std::sync::Arc::from(s)).await
            }
            #[tokio::test]
            async fn failed_txn_op_rolls_back_everything() {
                let (_g, s) = $open().await;
                super::failed_txn_op_rolls_back_everything(&*s).await
            }
        }
    };
}

suite!(
    sqlite,
    open_sqlite,
    LeaseTimes {
        short: Duration::from_millis(300),
        kept: Duration::from_millis(600),
        tick: Duration::from_millis(150),
        rounds: 8,
    }
);
suite!(
    prefixed,
    open_prefixed,
    LeaseTimes {
        short: Duration::from_millis(300),
        kept: Duration::from_millis(600),
        tick: Duration::from_millis(150),
        rounds: 8,
    }
);
suite!(
    etcd,
    open_etcd,
    LeaseTimes {
        short: Duration::from_secs(2),
        kept: Duration::from_secs(3),
        tick: Duration::from_millis(500),
        rounds: 9,
    }
);

async fn open_sqlite() -> (tempfile::TempDir, Box<dyn Store>) {
    let d = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&d.path().join("s.db")).unwrap();
    (d, Box::new(s))
}

/// A host's subtree of a SQLite store with a neighbour's keys beside it.
async fn open_prefixed() -> (tempfile::TempDir, Box<dyn Store>) {
    let d = tempfile::tempdir().unwrap();
    let s: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(SqliteStore::open(&d.path().join("s.db")).unwrap());
    s.put("/hosts/h10/a", b"neighbour".to_vec(), None)
        .await
        .unwrap();
    s.put("/hosts/h1", b"the prefix itself".to_vec(), None)
        .await
        .unwrap();
    (d, Box::new(crate::Prefixed::new(s, "/hosts/h1")))
}

/// A real etcd member on loopback, killed (by pid) when dropped.
pub(crate) struct TestEtcd {
    _dir: tempfile::TempDir,
    pub url: String,
    pub tls: crate::EtcdTls,
    pid: i32,
    cfg: MemberConfig,
}

/// A host's certificate files under `dir` (its own CA), as etcd and its clients use them.
pub fn test_pki(dir: &std::path::Path) -> (member::MemberTls, crate::EtcdTls) {
    let pki =
        ferry_pki::HostPki::ensure(&dir.join("pki"), "t", &["127.0.0.1".parse().unwrap()]).unwrap();
    // An empty revocation list, as a cluster's founder makes one.
    if pki.crl().is_none() {
        pki.install_crl(&pki.sign_crl(1, &Default::default()).unwrap())
            .unwrap();
    }
    let files = member::MemberTls {
        ca: pki.ca_path(),
        cert: pki.cert_path(),
        key: pki.key_path(),
        crl: pki.crl_path(),
    };
    let tls = crate::EtcdTls {
        ca_pem: pki.ca_pem().to_string(),
        cert_pem: pki.cert_pem().to_string(),
        key_pem: pki.key_pem().to_string(),
    };
    (files, tls)
}

impl TestEtcd {
    pub async fn start() -> TestEtcd {
        TestEtcd::with_quota(crate::health::QUOTA_BYTES).await
    }

    /// A member whose database may grow to `quota_bytes`.
    pub async fn with_quota(quota_bytes: u64) -> TestEtcd {
        let dir = tempfile::tempdir().unwrap();
        let port = |_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (c, p) = (port(0), port(1));
        let (files, tls) = test_pki(dir.path());
        let cfg = MemberConfig {
            name: "t".into(),
            data_dir: dir.path().join("data"),
            client_url: format!("https://127.0.0.1:{c}"),
            peer_url: format!("https://127.0.0.1:{p}"),
            initial_cluster: format!("t=https://127.0.0.1:{p}"),
            new_cluster: true,
            heartbeat_ms: 100,
            election_ms: 1000,
            quota_bytes,
            tls: Some(files),
        };
        let log = dir.path().join("etcd.log");
        let pid = member::spawn("etcd", &cfg, &log, &dir.path().join("pid"))
            .await
            .unwrap();
        let e = TestEtcd {
            _dir: dir,
            url: cfg.client_url.clone(),
            tls,
            pid,
            cfg: cfg.clone(),
        };
        member::wait_healthy("t", &e.url, Some(&e.tls), &log, Duration::from_secs(20))
            .await
            .unwrap();
        e
    }
}

impl TestEtcd {
    /// Another member of this one's cluster (same certificates), added as a voter or a
    /// learner through `via` and started; it is not waited for.
    pub async fn join(&self, via: &etcd_client::Client, name: &str, learner: bool) -> TestEtcd {
        let dir = tempfile::tempdir().unwrap();
        let port = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (c, p) = (port(), port());
        let peer = format!("https://127.0.0.1:{p}");
        let added = crate::membership::while_unhealthy(|| {
            let (mut c, peer) = (via.clone(), peer.clone());
            let opts = learner.then(|| etcd_client::MemberAddOptions::new().with_is_learner());
            async move { c.member_add([peer.as_str()], opts).await }
        })
        .await
        .unwrap();
        let initial: Vec<String> = added
            .member_list()
            .iter()
            .map(|m| {
                let n = if m.peer_urls().contains(&peer) {
                    name
                } else {
                    m.name()
                };
                format!("{n}={}", m.peer_urls()[0])
            })
            .collect();
        let cfg = MemberConfig {
            name: name.into(),
            data_dir: dir.path().join("data"),
            client_url: format!("https://127.0.0.1:{c}"),
            peer_url: peer,
            initial_cluster: initial.join(","),
            new_cluster: false,
            ..self.cfg.clone()
        };
        let pid = member::spawn(
            "etcd",
            &cfg,
            &dir.path().join("etcd.log"),
            &dir.path().join("pid"),
        )
        .await
        .unwrap();
        TestEtcd {
            _dir: dir,
            url: cfg.client_url.clone(),
            tls: self.tls.clone(),
            pid,
            cfg,
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

async fn open_etcd() -> (TestEtcd, Box<dyn Store>) {
    let e = TestEtcd::start().await;
    let s = EtcdStore::connect(std::slice::from_ref(&e.url), "/test/", Some(e.tls.clone()))
        .await
        .unwrap();
    (e, Box::new(s))
}

#[tokio::test]
async fn etcd_prefixes_keep_hosts_apart() {
    let (_e, s) = open_etcd().await;
    let s = s.as_ref();
    s.put("/vms/a", b"1".to_vec(), None).await.unwrap();
    let e = EtcdStore::connect(
        std::slice::from_ref(&_e.url),
        "/other/",
        Some(_e.tls.clone()),
    )
    .await
    .unwrap();
    assert!(e.get("/vms/a").await.unwrap().is_none());
    e.put("/vms/b", b"2".to_vec(), None).await.unwrap();
    let keys: Vec<_> = s
        .list("/vms/")
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(keys, ["/vms/a"]);
    let scoped = e.scoped("/test/");
    assert_eq!(scoped.get("/vms/a").await.unwrap().unwrap().value, b"1");
}

async fn put_get_list_delete_revisions(s: &dyn Store) {
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

async fn txn_compare_and_swap_only_one_winner(s: &dyn Store) {
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

async fn txn_failure_branch_and_gets(s: &dyn Store) {
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

async fn lease_expiry_deletes_keys_and_keepalive_extends(s: &dyn Store, l: LeaseTimes) {
    let short = s.grant_lease(l.short).await.unwrap();
    let kept = s.grant_lease(l.kept).await.unwrap();
    s.put("/hosts/a", b"up".to_vec(), Some(short))
        .await
        .unwrap();
    s.put("/hosts/b", b"up".to_vec(), Some(kept)).await.unwrap();
    for _ in 0..l.rounds {
        tokio::time::sleep(l.tick).await;
        s.keep_alive(kept).await.unwrap();
    }
    assert!(
        s.get("/hosts/a").await.unwrap().is_none(),
        "expired lease's key survived"
    );
    assert!(s.get("/hosts/b").await.unwrap().is_some());
    let r = s.keep_alive(short).await;
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
    assert!(matches!(
        s.put("x", vec![], Some(short)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

async fn watch_replays_history_then_live_events(s: &dyn Store) {
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

/// More keys than one page of an etcd listing, then a mirror listing and following.
async fn listing_is_paged_and_a_mirror_follows(s: std::sync::Arc<dyn Store>) {
    for chunk in (0..1234).collect::<Vec<u32>>().chunks(100) {
        let success = chunk
            .iter()
            .map(|i| Op::Put {
                key: format!("/big/{i:05}"),
                value: i.to_string().into_bytes(),
                lease: None,
            })
            .collect();
        assert!(
            s.txn(Txn {
                success,
                ..Txn::default()
            })
            .await
            .unwrap()
            .succeeded
        );
    }
    let (kvs, rev) = s.list_at("/big/").await.unwrap();
    assert_eq!(rev, s.revision().await.unwrap());
    let keys: Vec<String> = kvs.into_iter().map(|kv| kv.key).collect();
    let want: Vec<String> = (0..1234).map(|i| format!("/big/{i:05}")).collect();
    assert_eq!(keys, want);

    s.put("/m/a", b"1".to_vec(), None).await.unwrap();
    s.put("/m/bad", b"not a number".to_vec(), None)
        .await
        .unwrap();
    s.put("/n/a", b"9".to_vec(), None).await.unwrap();
    let m = mirror::Mirror::start(s.clone(), "/m/", |_, v| {
        std::str::from_utf8(v).ok()?.parse::<i64>().ok()
    });
    assert!(m.wait_synced(Duration::from_secs(10)).await);
    let now = |m: &mirror::Mirror<i64>| {
        m.read(|e| {
            e.map
                .iter()
                .map(|(k, (v, _))| (k.clone(), *v))
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(now(&m), [("a".to_string(), 1)]);
    let mut changed = m.subscribe();
    let mut keys = m.changes();
    s.put("/m/b", b"2".to_vec(), None).await.unwrap();
    s.delete("/m/a").await.unwrap();
    s.put("/m/bad", b"3".to_vec(), None).await.unwrap();
    s.put("/n/b", b"9".to_vec(), None).await.unwrap();
    let want = [("b".to_string(), 2), ("bad".to_string(), 3)];
    let t = std::time::Instant::now();
    while now(&m) != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "mirror holds {:?}",
            now(&m)
        );
        let _ = tokio::time::timeout(Duration::from_millis(500), changed.changed()).await;
    }
    assert!(m.synced());
    // Followers hear each key that changed (not the other prefix's).
    let mut heard = vec![];
    while heard.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), keys.recv()).await {
            Ok(Ok(mirror::Change::Key(k))) => heard.push(k),
            other => panic!("{other:?} after {heard:?}"),
        }
    }
    assert_eq!(heard, ["b", "a", "bad"]);
}

/// A watch from a revision etcd compacted away is refused at once (etcd itself answers
/// "created" first and cancels later), so a mirror resuming from it lists again
/// instead of resuming forever.
#[tokio::test]
async fn a_watch_from_compacted_history_is_refused_at_once() {
    let (e, s) = open_etcd().await;
    let r = s.put("/m/a", b"1".to_vec(), None).await.unwrap();
    s.put("/m/b", b"2".to_vec(), None).await.unwrap();
    s.delete("/m/a").await.unwrap();
    let now = s.revision().await.unwrap();
    let mut c = etcd_client::Client::connect([e.url.as_str()], Some(tls_opts(&e.tls)))
        .await
        .unwrap();
    c.compact(now, None).await.unwrap();
    assert!(matches!(
        s.watch("/m/", Some(r)).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(s.watch("/m/", Some(now)).await.is_ok());
    // A mirror started now lists what is left.
    let m = mirror::Mirror::start(std::sync::Arc::from(s), "/m/", |_, v| Some(v.to_vec()));
    assert!(m.wait_synced(Duration::from_secs(10)).await);
    assert_eq!(m.read(|e| e.map.keys().cloned().collect::<Vec<_>>()), ["b"]);
}

#[tokio::test]
async fn sqlite_reopen_keeps_data_and_revision() {
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

async fn failed_txn_op_rolls_back_everything(s: &dyn Store) {
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

/// etcd lets in only clients with a certificate of the cluster CA: none, or one of
/// another CA, gets nothing (the hole of issue 17: `etcdctl get --prefix /ferry` from
/// anywhere).
#[tokio::test]
async fn etcd_refuses_clients_without_a_cluster_certificate() {
    let (e, s) = open_etcd().await;
    s.put("/secret", b"1".to_vec(), None).await.unwrap();
    // No certificate at all (the server's checked against the right CA).
    let anon = ec_client(&e.url, |o| {
        o.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&e.tls.ca_pem)),
        )
    })
    .await;
    assert!(anon.is_err(), "a client without a certificate read etcd");
    // A certificate of another CA.
    let other = tempfile::tempdir().unwrap();
    let (_, mut wrong) = test_pki(other.path());
    wrong.ca_pem = e.tls.ca_pem.clone();
    let w = ec_client(&e.url, |o| wrong.apply(o)).await;
    assert!(w.is_err(), "a client of another CA read etcd");
    // Plain HTTP to the TLS port.
    let plain = ec_client(&e.url.replace("https://", "http://"), |o| o).await;
    assert!(plain.is_err(), "plain HTTP read etcd");
}

/// Connects and reads a key: the error, if any.
async fn ec_client(
    url: &str,
    f: impl FnOnce(etcd_client::ConnectOptions) -> etcd_client::ConnectOptions,
) -> Result<(), String> {
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(2))
        .with_connect_timeout(Duration::from_secs(2));
    let mut c = etcd_client::Client::connect([url], Some(f(opts)))
        .await
        .map_err(|e| e.to_string())?;
    c.get("/test/secret", None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn tls_opts(t: &crate::EtcdTls) -> etcd_client::ConnectOptions {
    t.apply(
        etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(3))
            .with_connect_timeout(Duration::from_secs(2)),
    )
}

/// Turns etcd's auth on (user `t` for the test's own certificate) and writes `/k`.
async fn auth_on(e: &TestEtcd) -> etcd_client::Client {
    let mut c = etcd_client::Client::connect([&e.url], Some(tls_opts(&e.tls)))
        .await
        .unwrap();
    member::access::enable(&mut c, "t").await.unwrap();
    c.put("/k", "v", None).await.unwrap();
    c
}

/// Reads `/k` over a new connection with the certificate in `t`: the error, if any.
async fn read_k(url: &str, t: crate::EtcdTls) -> Result<(), String> {
    let mut c = etcd_client::Client::connect([url], Some(tls_opts(&t)))
        .await
        .map_err(|e| e.to_string())?;
    c.get("/k", None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// With auth on, etcd lets in a certificate only if its CN has a user: another host's
/// certificate from the same CA gets nothing until it is admitted, and nothing again
/// once revoked.
#[tokio::test]
async fn etcd_admits_only_hosts_with_a_user() {
    let e = TestEtcd::start().await;
    let mut c = auth_on(&e).await;
    // h9: a certificate of the same CA, no user.
    let ca = ferry_pki::HostPki::load(&e._dir.path().join("pki")).unwrap();
    let (key, csr) = ferry_pki::new_request("h9").unwrap();
    let cert = ca.issue(&csr, "h9", &[]).unwrap();
    let h9 = crate::EtcdTls {
        ca_pem: ca.ca_pem().to_string(),
        cert_pem: cert,
        key_pem: key,
    };
    let read = |t: crate::EtcdTls| read_k(&e.url, t);
    assert!(
        read(h9.clone()).await.is_err(),
        "h9 read etcd without a user"
    );
    member::access::admit(&mut c, "h9").await.unwrap();
    read(h9.clone()).await.unwrap();
    member::access::revoke(&mut c, "h9").await.unwrap();
    assert!(
        read(h9).await.is_err(),
        "h9 still reads etcd after its revocation"
    );
}

/// etcd reads the revocation list at every handshake: a certificate it names gets
/// nothing from the next connection on, though its CN still has a user (a host that
/// rejoined under its old name), while the new certificate of that name works.
#[tokio::test]
async fn etcd_refuses_a_revoked_certificate_of_a_name_it_knows() {
    let e = TestEtcd::start().await;
    let mut c = auth_on(&e).await;
    let ca = ferry_pki::HostPki::load(&e._dir.path().join("pki")).unwrap();
    let issue = || {
        let (key, csr) = ferry_pki::new_request("h9").unwrap();
        let cert = ca.issue(&csr, "h9", &[]).unwrap();
        let serial = ferry_pki::serial_pem(&cert).unwrap();
        (
            crate::EtcdTls {
                ca_pem: ca.ca_pem().to_string(),
                cert_pem: cert,
                key_pem: key,
            },
            serial,
        )
    };
    let (old, old_serial) = issue();
    let read = |t: crate::EtcdTls| read_k(&e.url, t);
    member::access::admit(&mut c, "h9").await.unwrap();
    read(old.clone()).await.unwrap();
    // h9 left and came back: its old certificate is listed, a new one issued.
    let listed = [old_serial].into();
    ca.install_crl(&ca.sign_crl(2, &listed).unwrap()).unwrap();
    let (new, _) = issue();
    assert!(read(old).await.is_err(), "etcd took a revoked certificate");
    read(new).await.unwrap();
    read(e.tls.clone()).await.unwrap();
}

/// Membership as ferry reads it: the one member by name, its URLs, leading; a client
/// of the listed URLs reaches it; removing a member that is not there is an error and
/// changes nothing.
#[tokio::test]
async fn membership_lists_the_member_and_refuses_unknown_removals() {
    let e = TestEtcd::start().await;
    let c = crate::membership::connect(std::slice::from_ref(&e.url), Some(&e.tls))
        .await
        .unwrap();
    let list = crate::membership::list(&c).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let m = &list[0];
    assert_eq!((m.name.as_str(), m.learner), ("t", false));
    assert_eq!(m.client_urls, vec![e.url.clone()]);
    assert_eq!(crate::membership::leader(&c).await, m.id);
    let other = crate::membership::connect(&m.client_urls, Some(&e.tls))
        .await
        .unwrap();
    assert_eq!(crate::membership::list(&other).await.unwrap(), list);
    assert!(crate::membership::remove(&c, m.id ^ 1).await.is_err());
    assert_eq!(crate::membership::list(&c).await.unwrap(), list);
}

/// With auth on, a follower forwards a promotion to the leader without the caller's
/// identity and the leader refuses it (etcd issue #20757): ferry's promotion asks the
/// leader itself, so a learner is promoted whichever member the caller is connected to.
#[tokio::test]
async fn a_learner_is_promoted_through_a_follower_with_auth_on() {
    let a = TestEtcd::start().await;
    let mut c = auth_on(&a).await;
    let b = a.join(&c, "b", false).await;
    member::wait_healthy(
        "b",
        &b.url,
        Some(&b.tls),
        &b._dir.path().join("etcd.log"),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let learner = a.join(&c, "l", true).await;
    let list = crate::membership::list(&c).await.unwrap();
    let id = list.iter().find(|m| m.learner).expect("the learner").id;
    // A client of the follower (the member that does not lead).
    let leader = crate::membership::leader(&c).await;
    let follower = list
        .iter()
        .find(|m| !m.learner && m.id != leader)
        .expect("a follower");
    let fc = crate::membership::connect(&follower.client_urls, Some(&a.tls))
        .await
        .unwrap();
    // The learner needs a moment to catch up: etcd refuses until then.
    let t = std::time::Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(30) {
        match crate::membership::promote(&fc, id, Some(&a.tls)).await {
            Ok(()) => {
                last.clear();
                break;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(last.is_empty(), "not promoted: {last}");
    let list = crate::membership::list(&c).await.unwrap();
    assert_eq!(list.iter().filter(|m| !m.learner).count(), 3, "{list:?}");
    c.put("/after", "3 voters", None).await.unwrap();
    drop(learner);
}

/// Two hosts' subtrees of one store: each sees, lists, watches and deletes only its
/// own keys, with its own names for them; the store holds both under their prefixes.
#[tokio::test]
async fn prefixed_subtrees_keep_hosts_apart() {
    let d = tempfile::tempdir().unwrap();
    let s: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(SqliteStore::open(&d.path().join("s.db")).unwrap());
    let h1 = crate::Prefixed::new(s.clone(), "/hosts/h1");
    let h10 = crate::Prefixed::new(s.clone(), "/hosts/h10");
    let keys = |v: Vec<KeyValue>| v.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    let mut w1 = h1.watch("", None).await.unwrap();
    h1.put("/vms/a", b"1".to_vec(), None).await.unwrap();
    h10.put("/vms/a", b"10".to_vec(), None).await.unwrap();
    h10.put("/vms/b", b"10".to_vec(), None).await.unwrap();
    assert_eq!(h1.get("/vms/a").await.unwrap().unwrap().value, b"1");
    // "" reaches h10's keys in the store ("/hosts/h1" is a prefix of "/hosts/h10"):
    // the subtree still gives back only its own.
    assert_eq!(keys(h1.list("").await.unwrap()), ["/vms/a"]);
    assert_eq!(keys(h1.list("/vms/").await.unwrap()), ["/vms/a"]);
    assert_eq!(keys(h10.list("/vms/").await.unwrap()), ["/vms/a", "/vms/b"]);
    assert_eq!(
        keys(s.list("/hosts/").await.unwrap()),
        ["/hosts/h1/vms/a", "/hosts/h10/vms/a", "/hosts/h10/vms/b"]
    );
    let ev = tokio::time::timeout(Duration::from_secs(2), w1.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.key.as_str(), ev.value.as_slice()),
        ("/vms/a", &b"1"[..])
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w1.recv())
            .await
            .is_err(),
        "h1's watch saw h10's keys"
    );
    let r = h1
        .txn(Txn {
            compare: vec![Compare::Version("/vms/a".into(), Cmp::Equal, 1)],
            success: vec![Op::DeletePrefix("/vms/".into()), Op::Get("/vms/a".into())],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.gets, vec![None]);
    assert!(h1.list("/vms/").await.unwrap().is_empty());
    assert_eq!(
        h10.list("/vms/").await.unwrap().len(),
        2,
        "h10 kept its keys"
    );
    // Emptying h1's whole subtree leaves h10's alone.
    h1.put("/x", b"1".to_vec(), None).await.unwrap();
    let r = h1
        .txn(Txn {
            compare: vec![],
            success: vec![Op::DeletePrefix(String::new())],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(r.succeeded);
    assert!(h1.list("").await.unwrap().is_empty());
    assert_eq!(h10.list("").await.unwrap().len(), 2, "h10 kept its keys");
}

/// A real etcd with a small quota, filled by history until it raises NOSPACE and
/// refuses writes: the survey sees the alarm, the plan's steps (compact, defragment,
/// disarm) free the space, and writes go through again.
#[tokio::test]
async fn a_full_etcd_is_freed_and_disarmed() {
    use crate::health::{self, AlarmKind, Policy, Step};
    let e = TestEtcd::with_quota(16 << 20).await;
    let client = crate::membership::connect(std::slice::from_ref(&e.url), Some(&e.tls))
        .await
        .unwrap();
    let mut c = client.clone();
    // One key rewritten: the data is small, the history is what fills the file.
    let value = vec![7u8; 512 << 10];
    let mut refused = None;
    for i in 0..400 {
        if let Err(err) = c.put("/test/big", value.clone(), None).await {
            refused = Some((i, err.to_string()));
            break;
        }
    }
    let (after, why) = refused.expect("etcd never refused a write");
    assert!(why.contains("space"), "{why}");
    eprintln!("etcd refused the write after {after} puts: {why}");
    let members = crate::membership::list(&client).await.unwrap();
    let s = health::survey(&client, &members, Some(&e.tls)).await;
    assert!(
        s.alarms.iter().any(|a| a.kind == AlarmKind::NoSpace),
        "{s:?}"
    );
    let p = Policy {
        quota_bytes: 16 << 20,
        ..Policy::default()
    };
    let steps = health::plan(&s, &p, &Default::default());
    assert!(matches!(steps[0], Step::Compact(_)), "{steps:?}");
    let done = health::carry_out(&client, &s, &steps, Some(&e.tls)).await;
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    let s2 = health::survey(&client, &members, Some(&e.tls)).await;
    assert!(s2.alarms.is_empty(), "{s2:?}");
    assert!(
        s2.members[0].db_size < s.members[0].db_size / 2,
        "{} → {}",
        s.members[0].db_size,
        s2.members[0].db_size
    );
    c.put("/test/after", "ok", None).await.unwrap();
    assert!(health::plan(&s2, &p, &Default::default()).is_empty());
}

/// A member started with other flags than ferry wants now (an older ferry's quota or
/// compaction) is found out by its command line; one started with them is not.
#[tokio::test]
async fn a_member_with_outdated_flags_is_found_out() {
    let e = TestEtcd::with_quota(64 << 20).await;
    assert!(member::outdated_flags(e.pid, &e.cfg).is_empty());
    let wanted = MemberConfig {
        quota_bytes: crate::health::QUOTA_BYTES,
        ..e.cfg.clone()
    };
    assert_eq!(
        member::outdated_flags(e.pid, &wanted),
        vec![format!(
            "--quota-backend-bytes={}",
            crate::health::QUOTA_BYTES
        )]
    );
}
