//! The runtime's logic on a fake host ([`crate::fake::FakeOs`]): fake QEMUs speaking
//! QMP, taps in a table, images by the fake `qemu-img`, a real SQLite store. No root, no QEMU; each
//! test takes well under a second. The same behaviour is proven against real QEMU by
//! the end-to-end tests in `crates/ferry/tests/`.

use crate::error::AgentError;
use crate::fake::FakeOs;
use crate::Host;
use ferry_types::{DeleteVmParams, VmSpec, VmState};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Lab {
    dir: tempfile::TempDir,
    os: Arc<FakeOs>,
}

impl Lab {
    fn new() -> Lab {
        Lab {
            dir: tempfile::tempdir().unwrap(),
            os: FakeOs::new(&["br0"]),
        }
    }

    async fn host(&self) -> Host {
        crate::fake::open_host(self.dir.path(), self.os.clone())
            .await
            .unwrap()
    }

    /// The fake QEMU of VM `name`.
    async fn qemu(&self, h: &Host, name: &str) -> ferry_qmp::fake::FakeQemu {
        let (rec, _) = h.record(name).await.unwrap();
        self.os.qemu(&h.run_paths(rec.id).dir).unwrap().1
    }
}

/// A VM with one NIC on br0, its MAC from its name's first letter.
fn spec(name: &str) -> VmSpec {
    let mac = format!("52:54:00:00:00:{:02x}", name.as_bytes()[0]);
    serde_json::from_value(json!({
        "name": name,
        "memory_mib": 64,
        "nics": [{"bridge": "br0", "mac": mac}],
    }))
    .unwrap()
}

/// Waits (up to 5 s) until VM `name` is in state `want`.
async fn until(h: &Host, name: &str, want: VmState) {
    for _ in 0..250 {
        if h.get_vm(name).await.unwrap().state == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{name} is {} after 5 s, not {want}",
        h.get_vm(name).await.unwrap().state
    );
}

fn code(e: &AgentError) -> &str {
    e.code()
}

/// A VM's life on the runtime: start makes its tap on the bridge with the NIC's MAC and
/// a QEMU; pause and resume follow QEMU; an ACPI shutdown ends QEMU and removes the tap.
#[tokio::test]
async fn start_pause_resume_and_shutdown_follow_qemu() {
    let lab = Lab::new();
    let h = lab.host().await;
    h.create_vm(spec("a")).await.unwrap();
    h.start_vm("a").await.unwrap();
    assert_eq!(h.get_vm("a").await.unwrap().state, VmState::Running);
    let q = lab.qemu(&h, "a").await;
    assert!(q.running());
    let taps = lab.os.taps();
    let tap = taps.values().next().unwrap();
    assert_eq!(
        (tap.mac.as_str(), tap.bridge.as_deref()),
        ("52:54:00:00:00:61", Some("br0"))
    );

    h.pause_vm("a").await.unwrap();
    assert_eq!(h.get_vm("a").await.unwrap().state, VmState::Paused);
    assert!(!q.running());
    h.resume_vm("a").await.unwrap();
    assert_eq!(h.get_vm("a").await.unwrap().state, VmState::Running);
    assert!(q.running());

    assert!(h.shutdown_vm("a", None).await.unwrap());
    until(&h, "a", VmState::Stopped).await;
    assert!(!q.alive());
    assert!(lab.os.taps().is_empty(), "{:?}", lab.os.taps());
    assert_eq!(lab.os.running(), 0);
}

/// QEMU ending unasked is a crash (with the reason kept); a guest powering itself off
/// is a stop; a hard stop is a stop. Each run gets a QEMU of its own.
#[tokio::test]
async fn how_qemu_ends_decides_the_state() {
    let lab = Lab::new();
    let h = lab.host().await;
    h.create_vm(spec("a")).await.unwrap();

    h.start_vm("a").await.unwrap();
    lab.qemu(&h, "a").await.crash();
    until(&h, "a", VmState::Crashed).await;
    assert!(h.get_vm("a").await.unwrap().last_exit.is_some());

    h.start_vm("a").await.unwrap();
    lab.qemu(&h, "a").await.guest_poweroff();
    until(&h, "a", VmState::Stopped).await;

    h.start_vm("a").await.unwrap();
    lab.qemu(&h, "a").await.panic();
    until(&h, "a", VmState::Crashed).await;
    let why = h.get_vm("a").await.unwrap().last_exit.unwrap_or_default();
    assert!(why.contains("panic"), "{why}");

    h.start_vm("a").await.unwrap();
    let q = lab.qemu(&h, "a").await;
    h.stop_vm("a").await.unwrap();
    assert_eq!(h.get_vm("a").await.unwrap().state, VmState::Stopped);
    assert!(!q.alive());
    assert_eq!(lab.os.running(), 0);
}

/// Refusals say why with their code and change nothing: a NIC on a bridge the host
/// lacks, a second start, deleting a running VM, starting a template, starting in
/// maintenance.
#[tokio::test]
async fn refusals_have_codes_and_change_nothing() {
    let lab = Lab::new();
    let h = lab.host().await;
    let mut bad = spec("b");
    bad.nics[0].bridge = "br9".into();
    assert!(h.create_vm(bad).await.is_err());
    assert!(h.get_vm("b").await.is_err(), "no half-created VM");

    h.create_vm(spec("a")).await.unwrap();
    h.start_vm("a").await.unwrap();
    let e = h.start_vm("a").await.unwrap_err();
    assert_eq!(code(&e), "invalid_state", "{e}");
    let e = h
        .delete_vm("a", DeleteVmParams::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), "running", "{e}");
    assert_eq!(lab.os.running(), 1);
    h.stop_vm("a").await.unwrap();

    h.make_template("a").await.unwrap();
    let e = h.start_vm("a").await.unwrap_err();
    assert_eq!(code(&e), "template", "{e}");

    h.create_vm(spec("c")).await.unwrap();
    h.set_maintenance().await.unwrap();
    let e = h.start_vm("c").await.unwrap_err();
    assert_eq!(code(&e), "maintenance", "{e}");
    assert_eq!(h.get_vm("c").await.unwrap().state, VmState::Stopped);
    h.activate_host().await.unwrap();
    h.start_vm("c").await.unwrap();
    assert_eq!(lab.os.running(), 1);
    h.stop_vm("c").await.unwrap();
}

/// Deleting a stopped VM removes its record, run dir and taps; `force` kills a
/// running one first.
#[tokio::test]
async fn delete_removes_everything_and_force_kills_first() {
    let lab = Lab::new();
    let h = lab.host().await;
    h.create_vm(spec("a")).await.unwrap();
    h.start_vm("a").await.unwrap();
    let (rec, _) = h.record("a").await.unwrap();
    let run = h.run_paths(rec.id).dir;
    let params = DeleteVmParams {
        force: true,
        ..Default::default()
    };
    h.delete_vm("a", params).await.unwrap();
    assert!(h.get_vm("a").await.is_err());
    assert!(!run.exists());
    assert_eq!(lab.os.running(), 0);
    assert!(lab.os.taps().is_empty());
}

/// A daemon restart: QEMUs run on; the new runtime re-adopts the running VM (same
/// QEMU, no new one), and a VM whose QEMU died while no daemon ran is crashed.
#[test]
fn a_restarted_host_re_adopts_its_qemus() {
    let lab = Lab::new();
    let first = tokio::runtime::Runtime::new().unwrap();
    let b_run = first.block_on(async {
        let h = lab.host().await;
        h.create_vm(spec("a")).await.unwrap();
        h.create_vm(spec("b")).await.unwrap();
        h.start_vm("a").await.unwrap();
        h.start_vm("b").await.unwrap();
        let (rec, _) = h.record("b").await.unwrap();
        h.run_paths(rec.id).dir
    });
    // The daemon goes away (its tasks with it); its QEMUs do not.
    drop(first);
    assert_eq!(lab.os.running(), 2);
    let (_, b_qemu) = lab.os.qemu(&b_run).unwrap();
    b_qemu.crash();

    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let h = lab.host().await;
        assert_eq!(h.get_vm("a").await.unwrap().state, VmState::Running);
        assert_eq!(h.get_vm("b").await.unwrap().state, VmState::Crashed);
        assert_eq!(lab.os.running(), 1, "a re-adopted, not started again");
        let q = lab.qemu(&h, "a").await;
        h.pause_vm("a").await.unwrap();
        assert!(!q.running(), "the adopted QEMU is the one driven");
        h.stop_vm("a").await.unwrap();
        assert!(!q.alive());
    });
}

/// Disks over the fake `qemu-img`: a VM's new disk, a linked clone over a template's
/// disk, an offline snapshot; a disk `qemu-img` fails to make leaves no VM and no
/// volume, and a clone whose overlay fails leaves nothing either.
#[tokio::test]
async fn disks_clones_and_failed_images_leave_nothing_half_made() {
    let lab = Lab::new();
    let h = lab.host().await;
    h.ensure_default_pool().await.unwrap();
    let mut t = spec("t");
    t.disks = serde_json::from_value(json!([{"pool": "local", "size": "1G"}])).unwrap();
    h.create_vm(t.clone()).await.unwrap();
    let vols = |h: Host| async move {
        let mut v: Vec<String> = h
            .list_volumes("local")
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(vols(h.clone()).await.len(), 1);
    let disk = h.get_vm("t").await.unwrap().spec.disks[0]
        .volume
        .clone()
        .unwrap();

    lab.os.images.fail_next("create", "No space left on device");
    let mut u = t.clone();
    u.name = "u".into();
    u.nics[0].mac = Some("52:54:00:00:00:99".into());
    let e = h.create_vm(u.clone()).await.unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert!(h.get_vm("u").await.is_err(), "no half-created VM");
    assert_eq!(vols(h.clone()).await, vec![disk.clone()]);

    h.make_template("t").await.unwrap();
    let linked = |name: &str| ferry_types::CloneRequest {
        name: name.into(),
        linked: true,
    };
    lab.os.images.fail_next("create", "Permission denied");
    assert!(h.clone_vm("t", linked("c1"), None).await.is_err());
    assert!(h.get_vm("c1").await.is_err());
    assert_eq!(vols(h.clone()).await, vec![disk.clone()]);

    h.clone_vm("t", linked("c2"), None).await.unwrap();
    let c2 = h.get_vm("c2").await.unwrap().spec.disks[0]
        .volume
        .clone()
        .unwrap();
    let pool = h.dir_pool("local").await.unwrap();
    let chain = pool.chain(&c2).unwrap();
    assert_eq!(
        chain.len(),
        1,
        "a linked clone is an overlay on the template's disk"
    );
    assert_eq!(chain[0].path, pool.volume_path(&disk).unwrap());

    let snap = ferry_types::SnapshotCreate {
        name: "s1".into(),
        with_memory: false,
        description: String::new(),
    };
    h.create_snapshot("c2", snap, None).await.unwrap();
    let info = ferry_storage::image_info(pool.tool(), &pool.volume_path(&c2).unwrap(), "qcow2")
        .await
        .unwrap();
    assert_eq!(info.snapshots.len(), 1);
    assert_eq!(info.snapshots[0].name, "s1");
}

/// In a cluster a host's events and tasks live in its own `local.db`: an older
/// version's, left in the cluster store, move there once — what the host's store holds
/// already is kept, nothing else of the cluster store is touched.
#[tokio::test]
async fn events_and_tasks_move_to_the_hosts_own_store_once() {
    use ferry_store::{SqliteStore, Store};
    let d = tempfile::tempdir().unwrap();
    let cluster: Arc<dyn Store> = Arc::new(SqliteStore::open(&d.path().join("c.db")).unwrap());
    for (k, v) in [
        ("/events/0000000000000001", "e1"),
        ("/events/0000000000000002", "e2"),
        ("/tasks/t1", "t1"),
        ("/vms/x", "x"),
    ] {
        cluster.put(k, v.as_bytes().to_vec(), None).await.unwrap();
    }
    // A crash after an earlier copy: the host's store has one of them already.
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    SqliteStore::open(&state.join("local.db"))
        .unwrap()
        .put("/events/0000000000000001", b"kept".to_vec(), None)
        .await
        .unwrap();
    let local = crate::local_store(&state, &cluster, true).await.unwrap();
    let values = |kvs: Vec<ferry_store::KeyValue>| -> Vec<(String, String)> {
        kvs.into_iter()
            .map(|kv| (kv.key, String::from_utf8(kv.value).unwrap()))
            .collect()
    };
    assert_eq!(
        values(local.list("/").await.unwrap()),
        [
            ("/events/0000000000000001".into(), "kept".into()),
            ("/events/0000000000000002".into(), "e2".into()),
            ("/tasks/t1".into(), "t1".into()),
        ]
    );
    assert_eq!(
        values(cluster.list("/").await.unwrap()),
        [("/vms/x".into(), "x".into())]
    );
    // Again: nothing to move, nothing changes.
    let again = crate::local_store(&state, &cluster, true).await.unwrap();
    assert_eq!(again.list("/").await.unwrap().len(), 3);
    // Alone, the host's one store is used.
    let alone = crate::local_store(&state, &cluster, false).await.unwrap();
    assert_eq!(alone.list("/").await.unwrap().len(), 1);
}
