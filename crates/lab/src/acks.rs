//! The acknowledgement watcher: polls `http://ADDR/seq` (the record writer's last
//! fsynced record, served by the guest) from a namespace, keeping the highest number
//! seen. Whatever it saw was acknowledged to the guest's writer, so the disk must hold
//! it after any failover: [`AckWatcher::stop`] gives the number to check against.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct AckWatcher {
    stop: Arc<AtomicBool>,
    highest: Arc<AtomicI64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AckWatcher {
    /// Starts polling from namespace `ns` every 200 ms.
    pub fn start(ns: &str, addr: &str) -> AckWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let highest = Arc::new(AtomicI64::new(-1));
        let (s, h, ns, url) = (
            stop.clone(),
            highest.clone(),
            ns.to_string(),
            format!("http://{addr}/seq"),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns, "curl", "-s", "-f", "-m", "0.5", &url])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output();
                if let Ok(o) = out {
                    if let Ok(n) = String::from_utf8_lossy(&o.stdout).trim().parse::<i64>() {
                        h.fetch_max(n, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        AckWatcher {
            stop,
            highest,
            thread: Some(thread),
        }
    }

    /// The highest acknowledged record seen so far.
    pub fn highest(&self) -> Option<u64> {
        u64::try_from(self.highest.load(Ordering::Relaxed)).ok()
    }

    /// Stops polling; returns the highest acknowledged record seen.
    pub fn stop(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.highest()
    }
}

impl Drop for AckWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
