//! The cluster side's logic on a fake host (`ferry_host::fake::FakeOs`): the HA
//! runner's crash restarts on a lone host, with fake QEMUs. No root, no QEMU, no etcd;
//! seconds. The cluster itself (etcd, several hosts) is proven end to end in
//! `crates/ferry/tests/ha.rs`.

use crate::Cluster;
use ferry_host::fake::FakeOs;
use ferry_migration::Migrations;
use ferry_types::{VmSpec, VmState};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

async fn cluster(dir: &std::path::Path, os: Arc<FakeOs>) -> Cluster {
    let host = ferry_host::fake::open_host(dir, os).await.unwrap();
    Cluster::start(Migrations::open(host).await)
}

fn ha_spec(name: &str, max_restarts: u32) -> VmSpec {
    serde_json::from_value(json!({
        "name": name,
        "memory_mib": 64,
        "nics": [{"bridge": "br0", "mac": "52:54:00:00:01:01"}],
        "ha": {"mode": "restart", "max_restarts": max_restarts},
    }))
    .unwrap()
}

/// The pid of VM `name`'s QEMU once one runs (up to `within`).
async fn running_pid(c: &Cluster, os: &FakeOs, name: &str, within: Duration) -> Option<i32> {
    let (rec, _) = c.record(name).await.unwrap();
    let dir = c.run_paths(rec.id).dir;
    let t = tokio::time::Instant::now();
    while t.elapsed() < within {
        if let Some((pid, q)) = os.qemu(&dir) {
            if q.alive() && c.get_vm(name).await.unwrap().state == VmState::Running {
                return Some(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A crashed HA VM is started again in place, with back-off, until its restarts reach
/// `max_restarts`; then it stays crashed (a lone host has nowhere to move it).
#[tokio::test]
async fn ha_restarts_a_crashed_vm_until_its_limit() {
    let d = tempfile::tempdir().unwrap();
    let os = FakeOs::new(&["br0"]);
    let c = cluster(d.path(), os.clone()).await;
    c.create_vm(ha_spec("a", 2)).await.unwrap();
    c.start_vm("a").await.unwrap();
    let mut pid = running_pid(&c, &os, "a", Duration::from_secs(2))
        .await
        .unwrap();
    for restart in 1..=2 {
        let (rec, _) = c.record("a").await.unwrap();
        os.qemu(&c.run_paths(rec.id).dir).unwrap().1.crash();
        let next = running_pid(&c, &os, "a", Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("restart {restart} did not happen"));
        assert_ne!(next, pid, "restart {restart} is a new QEMU");
        pid = next;
    }
    let (rec, _) = c.record("a").await.unwrap();
    os.qemu(&c.run_paths(rec.id).dir).unwrap().1.crash();
    assert!(
        running_pid(&c, &os, "a", Duration::from_secs(6))
            .await
            .is_none(),
        "a third crash within 10 minutes is not restarted"
    );
    assert_eq!(c.get_vm("a").await.unwrap().state, VmState::Crashed);
    assert_eq!(os.running(), 0);
}

/// A VM a user stopped is never started again by HA, nor one whose HA is off.
#[tokio::test]
async fn ha_leaves_stopped_and_non_ha_vms_alone() {
    let d = tempfile::tempdir().unwrap();
    let os = FakeOs::new(&["br0"]);
    let c = cluster(d.path(), os.clone()).await;
    c.create_vm(ha_spec("a", 3)).await.unwrap();
    let mut b = ha_spec("b", 3);
    b.ha = Default::default();
    b.nics[0].mac = Some("52:54:00:00:01:02".into());
    c.create_vm(b).await.unwrap();
    c.start_vm("a").await.unwrap();
    c.start_vm("b").await.unwrap();
    c.stop_vm("a").await.unwrap();
    let (rec, _) = c.record("b").await.unwrap();
    os.qemu(&c.run_paths(rec.id).dir).unwrap().1.crash();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.get_vm("a").await.unwrap().state, VmState::Stopped);
    assert_eq!(c.get_vm("b").await.unwrap().state, VmState::Crashed);
    assert_eq!(os.running(), 0);
}

/// One host of a simulated cluster: its own runtime (dropping it is the host dying:
/// its tasks stop, its lease is no longer renewed), its own fake machine, and the
/// cluster's store shared with the others.
struct SimHost {
    rt: tokio::runtime::Runtime,
    os: Arc<FakeOs>,
    c: Cluster,
}

fn sim_host(dir: &std::path::Path, root: Arc<dyn ferry_store::Store>, name: &str) -> SimHost {
    let cfg = ferry_types::ClusterConfig {
        name: name.into(),
        address: "127.0.0.1".into(),
        api: "https://127.0.0.1:8470".into(),
        endpoints: vec![],
        managed_etcd: false,
        initial_cluster: String::new(),
        lease_ttl_s: 2,
        ca_fingerprint: String::new(),
    };
    let link = ferry_host::ClusterLink::simulated(cfg, root.clone());
    // One cluster CA, held by h1; the others hold certificates it signed, as after
    // `cluster join` (else every host would sign revocation lists of its own CA).
    let founder = ferry_pki::HostPki::ensure(&dir.join("h1/state/pki"), "h1", &[]).unwrap();
    if name != "h1" {
        let (key, csr) = ferry_pki::new_request(name).unwrap();
        let cert = founder.issue(&csr, name, &[]).unwrap();
        ferry_pki::HostPki::install(
            &dir.join(name).join("state/pki"),
            founder.ca_pem(),
            None,
            &cert,
            &key,
        )
        .unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let os = FakeOs::new(&["br0"]);
    let c = rt.block_on(async {
        use ferry_store::StoreJson;
        root.put_json(
            &ferry_store::keys::cluster::member(name),
            &ferry_types::ClusterHost {
                name: name.into(),
                api: "https://127.0.0.1:8470".into(),
                address: "127.0.0.1".into(),
                cert_serial: None,
                migration_ca: None,
            },
        )
        .await
        .unwrap();
        let host = ferry_host::fake::open_member(&dir.join(name), os.clone(), name, Some(link))
            .await
            .unwrap();
        Cluster::start(Migrations::open(host).await)
    });
    SimHost { rt, os, c }
}

/// The cluster's store, shared by the simulated hosts: SQLite on the test's own
/// runtime (its lease expiry runs there), as etcd outlives any one host.
fn shared_store(dir: &std::path::Path) -> (tokio::runtime::Runtime, Arc<dyn ferry_store::Store>) {
    let test = tokio::runtime::Runtime::new().unwrap();
    let root: Arc<dyn ferry_store::Store> = test.block_on(async {
        Arc::new(ferry_store::SqliteStore::open(&dir.join("cluster.db")).unwrap())
    });
    (test, root)
}

/// Simulated hosts `names`, all on `root`.
fn sim_hosts(
    dir: &std::path::Path,
    root: &Arc<dyn ferry_store::Store>,
    names: &[&str],
) -> Vec<SimHost> {
    names
        .iter()
        .map(|n| sim_host(dir, root.clone(), n))
        .collect()
}

/// A simulated cluster of three hosts sharing one store: when the host running an HA
/// VM dies, the HA manager brings the VM up on another host, once — never two at once.
#[test]
fn a_dead_hosts_ha_vm_comes_up_elsewhere_once() {
    let d = tempfile::tempdir().unwrap();
    // The shared store lives on the test's runtime (its lease expiry runs there), as
    // etcd outlives any one host.
    let (test, root) = shared_store(d.path());
    let hosts = sim_hosts(d.path(), &root, &["h1", "h2", "h3"]);
    wait_alive(&test, &root, &["h1", "h2", "h3"]);
    let h1 = &hosts[0];
    h1.rt.block_on(async {
        h1.c.create_vm(ha_spec("a", 3)).await.unwrap();
        h1.c.start_vm("a").await.unwrap();
    });
    assert_eq!(h1.os.running(), 1);
    // The host dies: its daemon and its QEMU.
    let mut hosts = hosts.into_iter();
    let h1 = hosts.next().unwrap();
    let h1_os = h1.os.clone();
    drop(h1.rt);
    let (dir, _) = {
        let (rec, _) = test
            .block_on(h1.c.record("a"))
            .unwrap_or_else(|e| panic!("{e}"));
        (h1.c.run_paths(rec.id).dir, ())
    };
    h1_os.qemu(&dir).unwrap().1.crash();
    let rest: Vec<SimHost> = hosts.collect();
    let t = std::time::Instant::now();
    let mut most = 0;
    let up_on = loop {
        let running: Vec<usize> = rest.iter().map(|h| h.os.running()).collect();
        most = most.max(running.iter().sum::<usize>());
        if let Some(i) = running.iter().position(|&n| n == 1) {
            break i;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let keys: Vec<String> = test
                .block_on(root.list("/"))
                .unwrap()
                .into_iter()
                .map(|kv| format!("{} = {}", kv.key, String::from_utf8_lossy(&kv.value)))
                .collect();
            let loops: Vec<String> = rest
                .iter()
                .map(|h| {
                    let i = h.rt.block_on(h.c.host_info()).unwrap();
                    format!("{}: {:?}", i.name, i.background)
                })
                .collect();
            let events: Vec<String> = rest
                .iter()
                .flat_map(|h| h.c.events().list(0, None))
                .map(|e| format!("{e:?}"))
                .collect();
            panic!(
                "the VM did not come up elsewhere\n{}\n{}\n{}",
                keys.join("\n"),
                loops.join("\n"),
                events.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let h = &rest[up_on];
    let state = h.rt.block_on(h.c.get_vm("a")).unwrap().state;
    assert!(
        matches!(state, VmState::Running | VmState::Starting),
        "{state}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let total: usize = rest.iter().map(|h| h.os.running()).sum();
    assert_eq!((most, total), (1, 1), "never two instances at once");
}

/// Waits (up to 20 s) until `n` hosts of the simulated cluster hold a lease.
fn wait_alive(test: &tokio::runtime::Runtime, root: &Arc<dyn ferry_store::Store>, names: &[&str]) {
    let t = std::time::Instant::now();
    loop {
        let n = test.block_on(async {
            let mut n = 0;
            for h in names {
                if root
                    .get(&ferry_store::keys::cluster::alive(h))
                    .await
                    .unwrap()
                    .is_some()
                {
                    n += 1;
                }
            }
            n
        });
        if n == names.len() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "hosts never all alive"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A host cut off from the cluster's store while its HA VM runs: it fences itself (kills
/// the VM's QEMU) before the HA manager starts the VM on another host; healed, it runs
/// nothing of the VM again. Never two instances, at any moment.
#[test]
fn a_cut_off_host_fences_before_its_ha_vm_runs_elsewhere() {
    let d = tempfile::tempdir().unwrap();
    let (test, root) = shared_store(d.path());
    let link = ferry_store::partition::Partition::new(root.clone());
    let hosts = [
        sim_host(d.path(), link.clone(), "h1"),
        sim_host(d.path(), root.clone(), "h2"),
        sim_host(d.path(), root.clone(), "h3"),
    ];
    wait_alive(&test, &root, &["h1", "h2", "h3"]);
    let h1 = &hosts[0];
    let dir = h1.rt.block_on(async {
        h1.c.create_vm(ha_spec("a", 3)).await.unwrap();
        h1.c.start_vm("a").await.unwrap();
        let (rec, _) = h1.c.record("a").await.unwrap();
        h1.c.run_paths(rec.id).dir
    });
    let (old, _) = h1.os.qemu(&dir).unwrap();

    link.cut(true);
    let cut_at = std::time::Instant::now();
    let t = std::time::Instant::now();
    let (on, new) = loop {
        let found = hosts[1..].iter().enumerate().find_map(|(i, h)| {
            h.rt.block_on(async {
                let (rec, _) = h.c.record("a").await.ok()?;
                let (pid, q) = h.os.qemu(&h.c.run_paths(rec.id).dir)?;
                q.alive().then_some((i + 1, pid))
            })
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the VM did not come up elsewhere"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = h1
        .os
        .killed_at(old)
        .expect("the cut-off host fenced its HA VM");
    let started = hosts[on].os.started_at(new).unwrap();
    eprintln!(
        "cut off: fenced after {:?}, up on h{} after {:?}",
        killed - cut_at,
        on + 1,
        started - cut_at
    );
    assert!(
        killed < started,
        "fenced {:?} after the cut, started elsewhere {:?} after it",
        killed - cut_at,
        started - cut_at
    );

    link.cut(false);
    wait_alive(&test, &root, &["h1"]);
    std::thread::sleep(Duration::from_secs(3));
    let running: Vec<usize> = hosts.iter().map(|h| h.os.running()).collect();
    assert_eq!(running.iter().sum::<usize>(), 1, "{running:?}");
    assert_eq!(running[0], 0, "the healed host runs nothing of it");
}

/// DRS placement reads the whole simulated cluster from the shared store: a VM of an
/// anti-affinity group goes neither beside its group's running VM nor onto a host in
/// maintenance, and each refused host says why.
#[test]
fn placement_sees_the_cluster_rules_and_maintenance() {
    let d = tempfile::tempdir().unwrap();
    let (test, root) = shared_store(d.path());
    let hosts = sim_hosts(d.path(), &root, &["h1", "h2", "h3"]);
    wait_alive(&test, &root, &["h1", "h2", "h3"]);
    let web = |name: &str, mac: &str| {
        let mut s = ha_spec(name, 3);
        s.ha = Default::default();
        s.nics[0].mac = Some(mac.into());
        s.placement.anti_affinity = vec!["web".into()];
        s
    };
    let (h1, h2) = (&hosts[0], &hosts[1]);
    h1.rt.block_on(async {
        h1.c.create_vm(web("w1", "52:54:00:00:02:01"))
            .await
            .unwrap();
        h1.c.start_vm("w1").await.unwrap();
    });
    h2.rt.block_on(h2.c.set_maintenance()).unwrap();
    let r = h2
        .rt
        .block_on(h2.c.place_spec(&web("w2", "52:54:00:00:02:02")))
        .unwrap();
    assert_eq!(r.host.as_deref(), Some("h3"), "{r:?}");
    let why = |h: &str| {
        r.hosts
            .iter()
            .find(|v| v.host == h)
            .map(|v| v.reasons.join(", "))
            .unwrap_or_default()
    };
    assert!(why("h1").contains("web"), "h1: {}", why("h1"));
    assert!(why("h2").contains("maintenance"), "h2: {}", why("h2"));

    // Out of maintenance, h2 may take it too; h1 still may not.
    h2.rt.block_on(h2.c.activate_host()).unwrap();
    let r = h1
        .rt
        .block_on(h1.c.place_spec(&web("w2", "52:54:00:00:02:02")))
        .unwrap();
    assert!(matches!(r.host.as_deref(), Some("h2" | "h3")), "{r:?}");
}

/// VM names are the cluster's, reserved in the create transaction: three hosts creating
/// one name at the same moment, exactly one wins; a delete frees the name, and a
/// reservation no record backs any more is taken over. MACs come from the VM's id.
#[test]
fn vm_names_are_reserved_in_the_create_transaction() {
    let d = tempfile::tempdir().unwrap();
    let (test, root) = shared_store(d.path());
    let hosts = sim_hosts(d.path(), &root, &["h1", "h2", "h3"]);
    let spec = |name: &str| {
        let mut s = ha_spec(name, 3);
        s.ha = Default::default();
        s.nics[0].mac = None;
        s
    };
    for round in 0..5 {
        let name = format!("race{round}");
        let results: Vec<_> = std::thread::scope(|sc| {
            let joins: Vec<_> = hosts
                .iter()
                .map(|h| {
                    let s = spec(&name);
                    sc.spawn(move || h.rt.block_on(h.c.create_vm(s)))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        let won: Vec<&ferry_types::Vm> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(e.code(), "exists", "{e}");
        }
        let v = won[0];
        let salt = ferry_types::mac_salt(&hosts[0].c.cfg().pki.ca_fingerprint());
        assert_eq!(
            v.spec.nics[0].mac,
            ferry_types::derived_mac(salt, v.id, 0),
            "the MAC comes from the id"
        );
    }
    // Delete frees the name for any host.
    let owner = hosts
        .iter()
        .find(|h| h.rt.block_on(h.c.get_vm("race0")).is_ok())
        .unwrap();
    owner
        .rt
        .block_on(owner.c.delete_vm("race0", Default::default()))
        .unwrap();
    let h3 = &hosts[2];
    h3.rt.block_on(h3.c.create_vm(spec("race0"))).unwrap();
    // A record gone without its reservation (its host removed): the name is free.
    test.block_on(root.delete(&ferry_store::keys::cluster::of_host(
        "h3",
        &ferry_store::keys::host::vm("race0"),
    )))
    .unwrap();
    let h1 = &hosts[0];
    h1.rt.block_on(h1.c.create_vm(spec("race0"))).unwrap();
    let e = hosts[1]
        .rt
        .block_on(hosts[1].c.create_vm(spec("race0")))
        .unwrap_err();
    assert_eq!(e.code(), "exists", "{e}");
}

/// Any host lists the whole cluster's VMs from its cache — filtered, paged by name,
/// states as each host recorded them — sums it up, and refuses a name another host
/// holds; a VM deleted elsewhere leaves its list.
#[test]
fn every_host_lists_the_cluster_from_its_cache() {
    use ferry_types::VmListParams;
    let d = tempfile::tempdir().unwrap();
    let (test, root) = shared_store(d.path());
    let hosts = sim_hosts(d.path(), &root, &["h1", "h2"]);
    wait_alive(&test, &root, &["h1", "h2"]);
    let (h1, h2) = (&hosts[0], &hosts[1]);
    let spec = |name: &str, mac: &str| -> VmSpec {
        let mut s = ha_spec(name, 0);
        s.ha = Default::default();
        s.nics[0].mac = Some(mac.into());
        s
    };
    h1.rt.block_on(async {
        h1.c.create_vm(spec("a1", "52:54:00:00:02:01"))
            .await
            .unwrap();
        h1.c.create_vm(spec("b1", "52:54:00:00:02:02"))
            .await
            .unwrap();
        h1.c.start_vm("a1").await.unwrap();
    });
    h2.rt.block_on(async {
        h2.c.create_vm(spec("a2", "52:54:00:00:02:03"))
            .await
            .unwrap();
    });
    let rows = |h: &SimHost, p: VmListParams| {
        h.rt.block_on(h.c.list_vms_page(&p)).map(|page| {
            let rows: Vec<(String, String, String)> = page
                .vms
                .iter()
                .map(|v| {
                    (
                        v.spec.name.clone(),
                        v.host.clone().unwrap_or_default(),
                        v.state.to_string(),
                    )
                })
                .collect();
            (rows, page.total, page.next_cursor)
        })
    };
    let row = |n: &str, h: &str, s: &str| (n.to_string(), h.to_string(), s.to_string());
    let want = vec![
        row("a1", "h1", "running"),
        row("a2", "h2", "stopped"),
        row("b1", "h1", "stopped"),
    ];
    let t = std::time::Instant::now();
    while rows(h2, VmListParams::default()).unwrap().0 != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "h2 lists {:?}",
            rows(h2, VmListParams::default())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rows(h1, VmListParams::default()).unwrap().0, want);
    // From the cache, not from reading every host's records.
    let link = h2.c.cluster().unwrap();
    let cached = link.synced_cache().expect("h2's cache in sync");
    assert_eq!(cached.vm_host("b1").as_deref(), Some("h1"));
    assert_eq!(cached.vms().len(), 3);
    let (page, total, next) = rows(
        h2,
        VmListParams {
            q: Some("A".into()),
            limit: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((page, total), (vec![row("a1", "h1", "running")], 2));
    let (page, _, last) = rows(
        h2,
        VmListParams {
            q: Some("A".into()),
            limit: Some(1),
            cursor: next,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((page, last), (vec![row("a2", "h2", "stopped")], None));
    let only = |host: &str, state: Option<VmState>| {
        rows(
            h2,
            VmListParams {
                host: Some(host.into()),
                state,
                ..Default::default()
            },
        )
        .unwrap()
        .0
    };
    assert_eq!(
        only("h1", Some(VmState::Running)),
        [row("a1", "h1", "running")]
    );
    assert_eq!(only("h2", None), [row("a2", "h2", "stopped")]);
    assert!(only("h9", None).is_empty());
    let bad = rows(
        h2,
        VmListParams {
            limit: Some(0),
            ..Default::default()
        },
    );
    assert!(bad.is_err());

    let s = h2.rt.block_on(h2.c.cluster_summary()).unwrap();
    assert_eq!(
        (s.hosts, s.hosts_online, s.vms, s.complete),
        (2, 2, 3, true)
    );
    assert_eq!(s.vms_by_state.get("running"), Some(&1));
    assert_eq!(s.vms_by_state.get("stopped"), Some(&2));
    assert_eq!(s.vm_memory_bytes, 64 << 20);

    // A name h1 holds is refused on h2 (from the cache), with the host named.
    let err = h2
        .rt
        .block_on(h2.c.create_vm(spec("b1", "52:54:00:00:02:04")))
        .unwrap_err();
    assert!(err.to_string().contains("h1"), "{err}");

    h1.rt.block_on(async {
        h1.c.delete_vm("b1", Default::default()).await.unwrap();
        h1.c.stop_vm("a1").await.unwrap();
    });
    let t = std::time::Instant::now();
    let want = vec![row("a1", "h1", "stopped"), row("a2", "h2", "stopped")];
    while rows(h2, VmListParams::default()).unwrap().0 != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "b1 deleted, a1 stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
