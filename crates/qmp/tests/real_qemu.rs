//! The client against a real QEMU (no guest: `-machine none`), started and ended by the test.

use ferry_qmp::Qmp;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Qemu(std::process::Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn real_qemu_status_events_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let _q = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/setup.sh installs it)"),
    );
    let q = Qmp::connect_retry(&sock, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(q.greeting()["version"]["qemu"]["major"].as_u64().unwrap() >= 7);
    let v = q.execute("query-version", None).await.unwrap();
    assert!(v["qemu"]["major"].is_u64());
    let mut ev = q.events();
    q.execute("stop", None).await.unwrap();
    let s = q.execute("query-status", None).await.unwrap();
    assert_eq!(s["status"], "paused");
    let e = tokio::time::timeout(Duration::from_secs(5), ev.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.name, "STOP");
    q.execute("cont", None).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), ev.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.name, "RESUME");
    // A file handed over by descriptor: QEMU holds it under its name (closefd finds it
    // once, and only after it was sent).
    let e = q
        .execute("closefd", Some(serde_json::json!({"fdname": "f1"})))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("f1"), "{e}");
    let f = std::fs::File::open("/dev/null").unwrap();
    q.send_fd("f1", std::os::fd::AsFd::as_fd(&f)).await.unwrap();
    q.execute("closefd", Some(serde_json::json!({"fdname": "f1"})))
        .await
        .unwrap();
    let err = q.execute("no-such-command", None).await.unwrap_err();
    assert!(err.to_string().contains("CommandNotFound"), "{err}");
    // quit: SHUTDOWN arrives before (or with) the reply; then the socket closes.
    q.execute("quit", None).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), ev.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.name, "SHUTDOWN");
    tokio::time::timeout(Duration::from_secs(5), q.closed())
        .await
        .unwrap();
}
