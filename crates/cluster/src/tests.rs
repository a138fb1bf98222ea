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
