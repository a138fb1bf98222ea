//! Two replication services on loopback, real `qemu-io` writing through the NBD
//! export: synchronous copies, degraded writes and bitmap resync, split brain.

use crate::{Cluster, Report, Service};
use ferry_types::{GenId, PeerState};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The cluster as the engine sees it: the outdated set and the reports, in memory
/// (the agent keeps them in etcd; its lab test covers that).
#[derive(Default)]
struct TestCluster {
    addrs: Mutex<BTreeMap<String, SocketAddr>>,
    outdated: Mutex<BTreeSet<String>>,
    reports: Mutex<Vec<Report>>,
    /// The cluster cannot be reached (a partitioned primary).
    unreachable: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Cluster for TestCluster {
    async fn outdate(&self, _v: &str, peer: &str) -> Result<(), String> {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("etcd unreachable".into());
        }
        self.outdated.lock().unwrap().insert(peer.into());
        Ok(())
    }
    async fn up_to_date(&self, _v: &str, peer: &str) -> Result<(), String> {
        self.outdated.lock().unwrap().remove(peer);
        Ok(())
    }
    async fn peer_addr(&self, host: &str) -> Option<SocketAddr> {
        self.addrs.lock().unwrap().get(host).copied()
    }
    fn report(&self, _v: &str, r: Report) {
        self.reports.lock().unwrap().push(r);
    }
}

const KEY: &str = "p/v";
const SIZE: u64 = 32 << 20;

fn g(n: u64, h: &str) -> GenId {
    GenId { n, host: h.into() }
}

struct Host {
    svc: Arc<Service>,
    dir: PathBuf,
}

async fn host(name: &str, root: &Path, cluster: &Arc<TestCluster>) -> Host {
    host_with(name, root, cluster, cluster.clone()).await
}

/// A host whose service sees the cluster through `seen` (e.g. with its certificates).
async fn host_with(
    name: &str,
    root: &Path,
    cluster: &Arc<TestCluster>,
    seen: Arc<dyn Cluster>,
) -> Host {
    let dir = root.join(name);
    let svc = Service::new(name, &dir.join("run"), seen).unwrap();
    let addr = svc.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    cluster.addrs.lock().unwrap().insert(name.into(), addr);
    svc.open(KEY, &dir.join("pool"), "v", Some((SIZE, Some(g(1, "a")))))
        .unwrap();
    Host { svc, dir }
}

impl Host {
    fn data(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("pool/v.raw")).unwrap()
    }

    /// Runs qemu-io commands against this host's NBD export.
    async fn qemu_io(&self, cmds: &[&str]) -> String {
        let sock = self.svc.socket_path(KEY);
        let mut c = tokio::process::Command::new("qemu-io");
        c.arg("--image-opts").arg(format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={KEY}",
            sock.display()
        ));
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        let out = c.output().await.expect("run qemu-io");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
        assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
        text
    }

    async fn wait_peer(&self, peer: &str, want: PeerState) {
        for _ in 0..200 {
            let st = self.svc.status(KEY).unwrap();
            if st.peers.iter().any(|p| p.host == peer && p.state == want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "peer {peer} never {want:?}: {:?}",
            self.svc.status(KEY).unwrap()
        );
    }
}

/// Hosts a and b with copies of the volume, a primary of generation 2 and b up to date.
async fn pair() -> (tempfile::TempDir, Arc<TestCluster>, Host, Host, [String; 2]) {
    let root = tempfile::tempdir().unwrap();
    let cluster = Arc::new(TestCluster::default());
    let a = host("a", root.path(), &cluster).await;
    let b = host("b", root.path(), &cluster).await;
    let peers = ["a".to_string(), "b".to_string()];
    a.svc
        .promote(KEY, g(2, "a"), &peers, &BTreeSet::new(), false)
        .unwrap();
    a.wait_peer("b", PeerState::UpToDate).await;
    (root, cluster, a, b, peers)
}

/// Reads until the other side closes; false if it stays open for 10 s.
async fn closes<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_both_copies_and_a_returning_peer_gets_only_what_it_missed() {
    let (root, cluster, a, b, peers) = pair().await;

    a.qemu_io(&[
        "write -P 0xaa 0 4M",
        "write -z 1M 64k",
        "write -P 0x11 -f 5M 4k",
        "flush",
    ])
    .await;
    assert_eq!(a.data(), b.data(), "synchronous copy differs");
    assert!(a.data()[..1 << 20].iter().all(|x| *x == 0xaa));
    assert_eq!(b.svc.status(KEY).unwrap().generation, Some(g(2, "a")));
    // a copy that is not primary refuses writes (after waiting for a promotion)
    // and may not be promoted twice
    assert!(a
        .svc
        .promote(KEY, g(3, "a"), &peers, &BTreeSet::new(), false)
        .is_err());

    // b goes away: writes go on, b is outdated in the cluster, its regions recorded
    b.svc.close(KEY, false).await.unwrap();
    a.qemu_io(&["write -P 0xbb 8M 1M"]).await;
    assert!(cluster.outdated.lock().unwrap().contains("b"));
    let st = a.svc.status(KEY).unwrap();
    assert_eq!(st.peers[0].out_of_sync_bytes, 1 << 20, "{st:?}");

    // b returns: bitmap resync (not a full one), then identical again
    b.svc.open(KEY, &b.dir.join("pool"), "v", None).unwrap();
    a.wait_peer("b", PeerState::UpToDate).await;
    assert!(!cluster.outdated.lock().unwrap().contains("b"));
    let resynced = cluster
        .reports
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|r| match r {
            Report::Resynced { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .unwrap();
    assert!(
        (1 << 20..SIZE).contains(&resynced),
        "resynced {resynced} bytes"
    );
    assert_eq!(a.data(), b.data(), "copies differ after the resync");
    let v = a.svc.verify(KEY).await.unwrap();
    assert_eq!(v[0].bytes_compared, SIZE);
    assert!(v[0].differing.is_empty());

    // a brand-new volume never adopts files left behind
    let other = Service::new("x", &root.path().join("x/run"), cluster.clone()).unwrap();
    let err = other
        .open(KEY, &a.dir.join("pool"), "v", Some((SIZE, Some(g(1, "x")))))
        .err()
        .expect("opened leftover files as a new volume");
    assert!(err.to_string().contains("open the copy"), "{err}");
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("already holds a copy named v"),
        "{err:?}"
    );

    // verify finds a difference made behind replication's back
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.dir.join("pool/v.raw"))
            .unwrap();
        f.write_all_at(b"corrupt", 20 << 20).unwrap();
    }
    let v = a.svc.verify(KEY).await.unwrap();
    assert_eq!(v[0].differing, vec![20 << 20]);
    a.svc.demote(KEY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_is_reported_and_resolved_by_the_admin() {
    let (_root, cluster, a, b, peers) = pair().await;
    a.qemu_io(&["write -P 0x01 0 1M"]).await;

    // partition: a writes alone, then b is forced to primary and writes too
    a.svc.set_standalone(KEY, true).unwrap();
    a.wait_peer("b", PeerState::StandAlone).await;
    a.qemu_io(&["write -P 0xaa 2M 1M"]).await;
    a.svc.demote(KEY).await.unwrap();
    a.svc.set_standalone(KEY, false).unwrap();
    // without force an outdated copy... is the caller's check (the record); the
    // engine refuses a copy that is not up to date, b is; force it
    b.svc
        .promote(
            KEY,
            g(3, "b"),
            &peers,
            &cluster.outdated.lock().unwrap(),
            true,
        )
        .unwrap();
    b.qemu_io(&["write -P 0xbb 4M 1M"]).await;
    b.wait_peer("a", PeerState::Refused).await;
    let st = b.svc.status(KEY).unwrap();
    assert!(
        st.peers[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("wrote in generation 2@a"),
        "{st:?}"
    );
    assert!(cluster
        .reports
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, Report::SplitBrain { .. })));
    // nothing was discarded
    assert!(a.data()[2 << 20..3 << 20].iter().all(|x| *x == 0xaa));
    assert!(b.data()[4 << 20..5 << 20].iter().all(|x| *x == 0xbb));
    assert!(b.data()[2 << 20..3 << 20].iter().all(|x| *x == 0));

    // the admin keeps a: b's copy is kept aside, b is synced in full from a
    b.svc.demote(KEY).await.unwrap();
    let saved = b.svc.discard(KEY).unwrap();
    assert!(std::fs::read(&saved).unwrap()[4 << 20..5 << 20]
        .iter()
        .all(|x| *x == 0xbb));
    a.svc
        .promote(
            KEY,
            g(4, "a"),
            &peers,
            &BTreeSet::from(["b".to_string()]),
            false,
        )
        .unwrap();
    a.wait_peer("b", PeerState::UpToDate).await;
    assert_eq!(a.data(), b.data());
    a.svc.demote(KEY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_primary_is_refused() {
    let (_root, cluster, a, b, peers) = pair().await;
    a.qemu_io(&["write -P 0x22 0 64k"]).await;
    // a is cut off without writing; b takes over (as HA does) and writes
    a.svc.set_standalone(KEY, true).unwrap();
    a.wait_peer("b", PeerState::StandAlone).await;
    b.svc
        .promote(KEY, g(3, "b"), &peers, &BTreeSet::new(), false)
        .unwrap();
    b.qemu_io(&["write -P 0x33 64k 64k"]).await;
    // a comes back still thinking it is primary of generation 2: refused
    a.svc.set_standalone(KEY, false).unwrap();
    a.wait_peer("b", PeerState::Refused).await;
    let st = a.svc.status(KEY).unwrap();
    assert!(
        st.peers[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("newer generation 3@b"),
        "{st:?}"
    );
    assert!(cluster
        .reports
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, Report::Stale { .. })));
    // it steps down and follows b, which brings it up to date
    a.svc.demote(KEY).await.unwrap();
    b.wait_peer("a", PeerState::UpToDate).await;
    assert_eq!(a.data(), b.data());
    assert!(a.data()[64 << 10..128 << 10].iter().all(|x| *x == 0x33));
    assert_eq!(a.svc.status(KEY).unwrap().generation, Some(g(3, "b")));
    b.svc.demote(KEY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_while_the_cluster_cannot_be_told_and_are_then_not_a_split_brain() {
    let (_root, cluster, a, b, peers) = pair().await;
    // a is cut off from b and from the cluster: its write is not acknowledged
    cluster
        .unreachable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    b.svc.close(KEY, false).await.unwrap();
    let sock = a.svc.socket_path(KEY);
    let mut io = tokio::process::Command::new("qemu-io")
        .arg("--image-opts")
        .arg(format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={KEY}",
            sock.display()
        ))
        .args(["-c", "write -P 0xee 0 64k"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        io.try_wait().unwrap().is_none(),
        "the write was acknowledged"
    );
    // a's term ends (fenced): the write fails, it was never acknowledged
    a.svc.demote(KEY).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), io.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{out:?}"
    );
    assert!(cluster.outdated.lock().unwrap().is_empty());
    // b takes over (not outdated); a comes back and is resynced, no split brain
    cluster
        .unreachable
        .store(false, std::sync::atomic::Ordering::SeqCst);
    b.svc.open(KEY, &b.dir.join("pool"), "v", None).unwrap();
    b.svc
        .promote(KEY, g(3, "b"), &peers, &BTreeSet::new(), false)
        .unwrap();
    b.wait_peer("a", PeerState::UpToDate).await;
    assert_eq!(a.data(), b.data());
    assert!(!cluster
        .reports
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, Report::SplitBrain { .. })));
    b.svc.demote(KEY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_peer_missed_survives_a_primary_restart() {
    let (_root, cluster, a, b, peers) = pair().await;
    b.svc.close(KEY, false).await.unwrap();
    a.qemu_io(&["write -P 0x5a 8M 1M"]).await;
    // a's daemon restarts: its copy is opened again and promoted as the last primary
    a.svc.close(KEY, false).await.unwrap();
    a.svc.open(KEY, &a.dir.join("pool"), "v", None).unwrap();
    let outdated = cluster.outdated.lock().unwrap().clone();
    assert!(outdated.contains("b"));
    a.svc
        .promote(KEY, g(3, "a"), &peers, &outdated, false)
        .unwrap();
    assert_eq!(
        a.svc.status(KEY).unwrap().peers[0].out_of_sync_bytes,
        1 << 20
    );
    b.svc.open(KEY, &b.dir.join("pool"), "v", None).unwrap();
    a.wait_peer("b", PeerState::UpToDate).await;
    assert_eq!(a.data(), b.data());
    let last = cluster
        .reports
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|r| match r {
            Report::Resynced { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .unwrap();
    assert!(last < SIZE, "a full resync ({last} bytes)");
    a.svc.demote(KEY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_from_peers_and_nbd_clients_is_refused_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_root, cluster, a, b, _) = pair().await;
    a.qemu_io(&["write -P 0x42 0 64k"]).await;
    let before = b.data();
    let b_addr = cluster.addrs.lock().unwrap()["b"];
    let hello = |volume: &str, primary: bool, history: Vec<GenId>, size: u64| {
        hello_from("a", volume, primary, history, size)
    };
    let mut write_old_gen = hello(KEY, true, vec![g(1, "a"), g(2, "c")], SIZE);
    write_old_gen.extend(
        crate::wire::Frame::write(1, &g(1, "a"), 0, false, Arc::new(vec![0xff; 4096])).to_bytes(),
    );
    let mut bad_version = crate::wire::Msg::Ack { seq: 1 }.encode();
    bad_version[5] = 9;
    let junk: Vec<Vec<u8>> = vec![
        // a host the cluster does not know
        hello_from("mallory", KEY, true, vec![g(1, "a"), g(3, "a")], SIZE),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        bad_version,
        vec![0x46, 0x52, 0x59, 0x31, 0, 1, 0, 2, 0xff, 0xff, 0xff, 0xff],
        hello("p/nope", true, vec![g(1, "a")], SIZE),
        hello(KEY, false, vec![g(1, "a")], SIZE),
        hello(KEY, true, vec![g(1, "a")], SIZE + 1),
        // b follows a's generation 2; a "primary" whose history diverged (a split
        // brain) is refused, and its write never lands
        write_old_gen,
    ];
    for j in junk {
        let mut s = tokio::net::TcpStream::connect(b_addr).await.unwrap();
        let _ = s.write_all(&j).await;
        // the peer ends the connection (after a Hello or Goodbye at most)
        assert!(closes(&mut s).await, "connection with junk {j:?} left open");
    }
    // NBD: bad magic, an oversized write, a request past the end
    let sock = a.svc.socket_path(KEY);
    for junk in [vec![0u8; 64], {
        let mut v = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        v.extend_from_slice(&7u32.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        v
    }] {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(&1u32.to_be_bytes()).await.unwrap();
        let _ = s.write_all(&junk).await;
        assert!(closes(&mut s).await, "NBD connection with junk left open");
    }
    let out = a.qemu_io(&["read -P 0x42 0 64k"]).await;
    assert!(out.contains("read 65536/65536"), "{out}");
    assert_eq!(b.data(), before, "junk changed the peer's copy");
    a.wait_peer("b", PeerState::UpToDate).await;
    let st = b.svc.status(KEY).unwrap();
    assert_eq!(st.generation, Some(g(2, "a")));
    a.svc.demote(KEY).await.unwrap();
}

/// A replication Hello from `host`.
fn hello_from(host: &str, volume: &str, primary: bool, history: Vec<GenId>, size: u64) -> Vec<u8> {
    crate::wire::Msg::Hello(crate::wire::Hello {
        volume: volume.into(),
        host: host.into(),
        primary,
        size,
        history,
        uptodate: true,
        ..Default::default()
    })
    .encode()
}

/// One host's view of the test cluster, with its certificate: mutual TLS.
struct TlsCluster {
    inner: Arc<TestCluster>,
    pki: ferry_pki::HostPki,
}

#[async_trait::async_trait]
impl Cluster for TlsCluster {
    async fn outdate(&self, v: &str, peer: &str) -> Result<(), String> {
        self.inner.outdate(v, peer).await
    }
    async fn up_to_date(&self, v: &str, peer: &str) -> Result<(), String> {
        self.inner.up_to_date(v, peer).await
    }
    async fn peer_addr(&self, host: &str) -> Option<SocketAddr> {
        self.inner.peer_addr(host).await
    }
    fn report(&self, v: &str, r: Report) {
        self.inner.report(v, r)
    }
    fn client_tls(&self, host: &str) -> Option<Arc<rustls::ClientConfig>> {
        Some(Arc::new(
            self.pki
                .client_config(ferry_pki::Expect::Host(host.to_string())),
        ))
    }
    fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        Some(self.pki.server_config(true))
    }
}

/// A host certificate from `ca` for `name`, in `dir`.
fn issued(ca: &ferry_pki::HostPki, dir: &Path, name: &str) -> ferry_pki::HostPki {
    let (key, csr) = ferry_pki::new_request(name).unwrap();
    let cert = ca
        .issue(&csr, name, &["127.0.0.1".parse().unwrap()])
        .unwrap();
    ferry_pki::HostPki::install(dir, ca.ca_pem(), None, &cert, &key).unwrap();
    ferry_pki::HostPki::load(dir).unwrap()
}

/// With certificates the copies travel over mutual TLS; a connection without a
/// certificate of the cluster, or whose certificate names another host than its Hello,
/// never reaches a copy — even from the listed address (every test runs on loopback).
#[tokio::test]
async fn copies_travel_over_mutual_tls_and_strangers_are_refused() {
    use tokio::io::AsyncWriteExt;
    let root = tempfile::tempdir().unwrap();
    let cluster = Arc::new(TestCluster::default());
    let pa = ferry_pki::HostPki::ensure(
        &root.path().join("pki-a"),
        "a",
        &["127.0.0.1".parse().unwrap()],
    )
    .unwrap();
    let pb = issued(&pa, &root.path().join("pki-b"), "b");
    let pc = issued(&pa, &root.path().join("pki-c"), "c");
    let seen = |pki: &ferry_pki::HostPki| -> Arc<dyn Cluster> {
        Arc::new(TlsCluster {
            inner: cluster.clone(),
            pki: pki.clone(),
        })
    };
    let a = host_with("a", root.path(), &cluster, seen(&pa)).await;
    let b = host_with("b", root.path(), &cluster, seen(&pb)).await;
    let peers = ["a".to_string(), "b".to_string()];
    a.svc
        .promote(KEY, g(2, "a"), &peers, &BTreeSet::new(), false)
        .unwrap();
    a.wait_peer("b", PeerState::UpToDate).await;
    a.qemu_io(&["write -P 0x5a 0 64k", "flush"]).await;
    assert!(
        b.data()[..65536].iter().all(|x| *x == 0x5a),
        "b lacks the write"
    );
    let before = b.data();
    let b_addr = cluster.peer_addr("b").await.unwrap();
    let hello_a = hello_from("a", KEY, true, vec![g(1, "a"), g(9, "a")], SIZE);
    // Plain TCP with a Hello claiming to be a: the TLS handshake fails, nothing lands.
    let mut s = tokio::net::TcpStream::connect(b_addr).await.unwrap();
    let _ = s.write_all(&hello_a).await;
    assert!(closes(&mut s).await, "plain TCP left open");
    // TLS with c's certificate (a host of the cluster) but a's name in the Hello.
    let tcp = tokio::net::TcpStream::connect(b_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        pc.client_config(ferry_pki::Expect::Host("b".into())),
    ))
    .connect(
        rustls::pki_types::ServerName::IpAddress(b_addr.ip().into()),
        tcp,
    )
    .await
    .unwrap();
    let mut tls = tls;
    tls.write_all(&hello_a).await.unwrap();
    let mut buf = vec![];
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&buf).contains("not a host of this cluster"),
        "an impostor was not told off: {buf:?}"
    );
    // A certificate of another CA: no handshake.
    let other = ferry_pki::HostPki::ensure(&root.path().join("pki-x"), "a", &[]).unwrap();
    let tcp = tokio::net::TcpStream::connect(b_addr).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(Arc::new(
        other.client_config(ferry_pki::Expect::AnyMember),
    ))
    .connect(
        rustls::pki_types::ServerName::IpAddress(b_addr.ip().into()),
        tcp,
    )
    .await;
    if let Ok(mut t) = r {
        // TLS 1.3: the server's refusal of the client certificate arrives on first read.
        let _ = t.write_all(&hello_a).await;
        let mut buf = vec![];
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut t, &mut buf),
        )
        .await;
        assert!(
            !matches!(got, Ok(Ok(n)) if n > 0),
            "a foreign CA's certificate got an answer: {buf:?}"
        );
    }
    assert_eq!(b.data(), before, "a stranger changed b's copy");
    a.wait_peer("b", PeerState::UpToDate).await;
    a.svc.demote(KEY).await.unwrap();
}

/// The fuzz targets' corpora through the same entry points, on stable.
#[test]
fn fuzz_corpora_decode_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut n = 0;
    for (target, f) in [
        ("nbd_request", crate::fuzz_nbd as fn(&[u8])),
        ("wire_frame", crate::fuzz_wire),
    ] {
        for e in std::fs::read_dir(root.join(target)).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            f(&data);
            // and every prefix, as a peer that stops mid-message sends
            for i in 0..data.len() {
                f(&data[..i]);
            }
            n += 1;
        }
    }
    assert!(n >= 15, "corpus has {n} files");
    // The streaming reader (writes' data read straight into their buffer) agrees with
    // the frame decoder on every seed and prefix: same message, or both refuse.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for e in std::fs::read_dir(root.join("wire_frame")).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        for i in 0..=data.len() {
            let mut r = &data[..i];
            let streamed = rt.block_on(crate::conn::read_msg(&mut r));
            match crate::wire::decode_frame(&data[..i]) {
                Ok(m) => assert_eq!(streamed.unwrap(), m),
                Err(e) => assert!(streamed.is_err(), "{e} but read {streamed:?}"),
            }
        }
    }
    // the valid seeds decode
    let hello = std::fs::read(root.join("wire_frame/hello")).unwrap();
    assert!(matches!(
        crate::wire::decode_frame(&hello),
        Ok(crate::wire::Msg::Hello(_))
    ));
    let w = std::fs::read(root.join("wire_frame/write_short")).unwrap();
    assert!(crate::wire::decode_frame(&w).is_err());
}
