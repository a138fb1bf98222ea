//! A fake QEMU for fast tests of code that drives QEMU (feature `fake`): a QMP server
//! and a serial console on unix sockets, and a guest that runs, pauses, resets, shuts
//! down when asked through ACPI, ends at `quit`, or crashes when the test says so.
//!
//! It speaks the QMP that ferry's runtime uses for a VM's life — `qmp_capabilities`,
//! `query-status`, `cont`, `stop`, `system_reset`, `system_powerdown`, `quit`,
//! `query-block`, `query-jobs` — with QEMU's events (`STOP`, `RESUME`, `RESET`, `POWERDOWN`,
//! `SHUTDOWN`, `GUEST_PANICKED`), and answers any other command with QEMU's
//! `CommandNotFound`, so code relying on more fails loudly instead of passing.

use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, watch};

/// A running fake QEMU. Dropping the handle does not end it; [`FakeQemu::crash`] or a
/// `quit` does.
#[derive(Clone)]
pub struct FakeQemu {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Events for every connected QMP client.
    events: broadcast::Sender<Value>,
    /// True once QEMU has ended: every socket closes.
    ended: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    running: bool,
    /// Every command received, in order (for tests to check what was asked).
    commands: Vec<String>,
}

impl FakeQemu {
    /// Serves QMP on `qmp` and the serial console on `serial`; the guest starts
    /// running unless `paused` (QEMU's `-S`).
    pub fn start(qmp: &Path, serial: &Path, paused: bool) -> std::io::Result<FakeQemu> {
        for p in [qmp, serial] {
            let _ = std::fs::remove_file(p);
        }
        let qmp_l = UnixListener::bind(qmp)?;
        let serial_l = UnixListener::bind(serial)?;
        let (events, _) = broadcast::channel(64);
        let (ended, _) = watch::channel(false);
        let f = FakeQemu {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    running: !paused,
                    commands: vec![],
                }),
                events,
                ended,
            }),
        };
        tokio::spawn(f.clone().serve_qmp(qmp_l));
        tokio::spawn(f.clone().serve_serial(serial_l));
        Ok(f)
    }

    /// Whether QEMU still runs.
    pub fn alive(&self) -> bool {
        !*self.inner.ended.borrow()
    }

    /// Whether the guest runs (not paused).
    pub fn running(&self) -> bool {
        self.state(|s| s.running)
    }

    /// The commands received so far.
    pub fn commands(&self) -> Vec<String> {
        self.state(|s| s.commands.clone())
    }

    /// QEMU dies at once (killed, or crashed): no event, every socket closes.
    pub fn crash(&self) {
        self.end();
    }

    /// The guest panics (`GUEST_PANICKED`); QEMU then ends, as with `-action panic=exit`.
    pub fn panic(&self) {
        self.event("GUEST_PANICKED", json!({"action": "poweroff"}));
        self.event("SHUTDOWN", json!({"guest": true, "reason": "guest-panic"}));
        self.end();
    }

    /// The guest powers itself off (`poweroff` inside it).
    pub fn guest_poweroff(&self) {
        self.event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
        );
        self.end();
    }

    /// Waits until QEMU has ended.
    pub async fn ended(&self) {
        wait_end(&mut self.inner.ended.subscribe()).await;
    }

    fn state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.inner.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn event(&self, name: &str, data: Value) {
        let _ = self.inner.events.send(json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": 0, "microseconds": 0},
        }));
    }

    fn end(&self) {
        self.inner.ended.send_replace(true);
    }

    async fn serve_qmp(self, l: UnixListener) {
        let mut ended = self.inner.ended.subscribe();
        loop {
            tokio::select! {
                c = l.accept() => match c {
                    Ok((s, _)) => {
                        tokio::spawn(self.clone().qmp_connection(s));
                    }
                    Err(_) => return,
                },
                _ = wait_end(&mut ended) => return,
            }
        }
    }

    async fn qmp_connection(self, s: tokio::net::UnixStream) {
        let (rd, mut wr) = s.into_split();
        let mut ended = self.inner.ended.subscribe();
        let mut events = self.inner.events.subscribe();
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}}, "capabilities": []}});
        if wr.write_all(line(&greeting).as_bytes()).await.is_err() {
            return;
        }
        let mut lines = BufReader::new(rd).lines();
        loop {
            tokio::select! {
                l = lines.next_line() => {
                    let Ok(Some(l)) = l else { return };
                    let Ok(cmd) = serde_json::from_str::<Value>(&l) else { continue };
                    let reply = self.answer(&cmd);
                    if wr.write_all(line(&reply).as_bytes()).await.is_err() {
                        return;
                    }
                    self.after(&cmd).await;
                }
                ev = events.recv() => {
                    if let Ok(ev) = ev {
                        if wr.write_all(line(&ev).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
                _ = wait_end(&mut ended) => {
                    // Events sent just before the end still go out.
                    while let Ok(ev) = events.try_recv() {
                        let _ = wr.write_all(line(&ev).as_bytes()).await;
                    }
                    return;
                }
            }
        }
    }

    /// The reply to `cmd` (state changes and their events happen here, before it).
    fn answer(&self, cmd: &Value) -> Value {
        let name = cmd["execute"].as_str().unwrap_or_default().to_string();
        self.state(|s| s.commands.push(name.clone()));
        let ok = |v: Value| json!({"return": v, "id": cmd["id"]});
        match name.as_str() {
            "qmp_capabilities" | "system_powerdown" | "quit" => ok(json!({})),
            "query-status" => {
                let running = self.running();
                ok(json!({
                    "status": if running { "running" } else { "paused" },
                    "running": running,
                    "singlestep": false,
                }))
            }
            "cont" => {
                self.state(|s| s.running = true);
                self.event("RESUME", json!({}));
                ok(json!({}))
            }
            "stop" => {
                self.state(|s| s.running = false);
                self.event("STOP", json!({}));
                ok(json!({}))
            }
            "system_reset" => {
                self.event(
                    "RESET",
                    json!({"guest": false, "reason": "host-qmp-system-reset"}),
                );
                ok(json!({}))
            }
            "query-block" | "query-jobs" => ok(json!([])),
            _ => json!({
                "error": {
                    "class": "CommandNotFound",
                    "desc": format!("The command {name} has not been found"),
                },
                "id": cmd["id"],
            }),
        }
    }

    /// What happens after the reply went out.
    async fn after(&self, cmd: &Value) {
        match cmd["execute"].as_str() {
            Some("quit") => {
                self.event(
                    "SHUTDOWN",
                    json!({"guest": false, "reason": "host-qmp-quit"}),
                );
                self.end();
            }
            Some("system_powerdown") => {
                // The guest's ACPI daemon takes a moment, then powers off.
                self.event("POWERDOWN", json!({}));
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    me.guest_poweroff();
                });
            }
            _ => {}
        }
    }

    async fn serve_serial(self, l: UnixListener) {
        let mut ended = self.inner.ended.subscribe();
        loop {
            tokio::select! {
                c = l.accept() => match c {
                    Ok((mut s, _)) => {
                        let mut ended = self.inner.ended.subscribe();
                        tokio::spawn(async move {
                            let _ = s.write_all(b"fake guest ready\r\n").await;
                            wait_end(&mut ended).await;
                        });
                    }
                    Err(_) => return,
                },
                _ = wait_end(&mut ended) => return,
            }
        }
    }
}

async fn wait_end(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|e| *e).await;
}

fn line(v: &Value) -> String {
    format!("{v}\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Qmp;

    /// The fake answers like QEMU, sends its events, and ends at `quit` with every
    /// socket closed.
    #[tokio::test]
    async fn runs_pauses_and_quits_like_qemu() {
        let d = tempfile::tempdir().unwrap();
        let (qp, sp) = (d.path().join("qmp.sock"), d.path().join("serial.sock"));
        let f = FakeQemu::start(&qp, &sp, true).unwrap();
        let q = Qmp::connect(&qp).await.unwrap();
        let mut ev = q.events();
        assert_eq!(
            q.execute("query-status", None).await.unwrap()["running"],
            false
        );
        q.execute("cont", None).await.unwrap();
        assert_eq!(ev.recv().await.unwrap().name, "RESUME");
        assert!(f.running());
        assert!(
            q.execute("migrate", None).await.is_err(),
            "unknown commands fail"
        );
        let _ = q.execute("quit", None).await;
        let e = ev.recv().await.unwrap();
        assert_eq!(
            (e.name.as_str(), &e.data["guest"]),
            ("SHUTDOWN", &json!(false))
        );
        q.closed().await;
        assert!(!f.alive());
        assert!(tokio::net::UnixStream::connect(&qp).await.is_err() || !f.alive());
        assert_eq!(
            f.commands(),
            [
                "qmp_capabilities",
                "query-status",
                "cont",
                "migrate",
                "quit"
            ]
        );
    }

    /// ACPI power-off: POWERDOWN, then the guest's own SHUTDOWN, then the end.
    #[tokio::test]
    async fn powerdown_ends_with_a_guest_shutdown() {
        let d = tempfile::tempdir().unwrap();
        let (qp, sp) = (d.path().join("qmp.sock"), d.path().join("serial.sock"));
        let f = FakeQemu::start(&qp, &sp, false).unwrap();
        let q = Qmp::connect(&qp).await.unwrap();
        let mut ev = q.events();
        q.execute("system_powerdown", None).await.unwrap();
        assert_eq!(ev.recv().await.unwrap().name, "POWERDOWN");
        let e = ev.recv().await.unwrap();
        assert_eq!(
            (e.name.as_str(), &e.data["guest"]),
            ("SHUTDOWN", &json!(true))
        );
        f.ended().await;
        q.closed().await;
    }
}
