//! The ping recorder: `ping -D` from a namespace at a fixed interval (down to 1 ms),
//! replies collected with their kernel timestamps. [`PingReport`] says how many pings
//! were lost and the longest gap between two replies — what a LAN client saw of a
//! migration or a failover.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running recorder; [`PingRecorder::stop`] ends it and reports.
pub struct PingRecorder {
    child: Child,
    replies: Arc<Mutex<Vec<(u64, f64)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PingReport {
    /// Pings between the first and the last reply.
    pub sent: u64,
    pub received: u64,
    /// Pings without a reply between the first and the last reply.
    pub lost: u64,
    /// Longest time between two consecutive replies.
    pub longest_gap: Duration,
    pub interval: Duration,
}

impl std::fmt::Display for PingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pings at {:?}: {} lost, longest gap {:.1} ms",
            self.sent,
            self.interval,
            self.lost,
            self.longest_gap.as_secs_f64() * 1000.0
        )
    }
}

impl PingRecorder {
    /// Starts pinging `addr` from namespace `ns` every `interval` (≥ 1 ms).
    pub fn start(ns: &str, addr: &str, interval: Duration) -> Result<PingRecorder> {
        if interval < Duration::from_millis(1) {
            bail!("ping interval below 1 ms");
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-D", "-n", "-W", "1", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg(addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start ping")?;
        let out = child.stdout.take().context("ping stdout")?;
        let replies = Arc::new(Mutex::new(Vec::new()));
        let r2 = replies.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Some(r) = parse_reply(&line) {
                    r2.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                }
            }
        });
        Ok(PingRecorder {
            child,
            replies,
            reader: Some(reader),
            interval,
        })
    }

    /// Replies so far.
    pub fn received(&self) -> usize {
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops pinging and reports.
    pub fn stop(mut self) -> PingReport {
        self.end();
        let replies = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        report(&replies, self.interval)
    }

    fn end(&mut self) {
        // `ip netns exec` execs ping: this pid is ping's, started by us.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGINT,
        );
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for PingRecorder {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.end();
        }
    }
}

/// `[1700000000.123456] 64 bytes from 10.0.0.1: icmp_seq=5 ttl=64 time=0.5 ms` →
/// (seq, time in s).
fn parse_reply(line: &str) -> Option<(u64, f64)> {
    let ts = line.strip_prefix('[')?.split(']').next()?.parse().ok()?;
    if !line.contains("bytes from") {
        return None;
    }
    let seq = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("icmp_seq="))?
        .parse()
        .ok()?;
    Some((seq, ts))
}

fn report(replies: &[(u64, f64)], interval: Duration) -> PingReport {
    let mut seqs: Vec<u64> = replies.iter().map(|r| r.0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let sent = match (seqs.first(), seqs.last()) {
        (Some(a), Some(b)) => b - a + 1,
        _ => 0,
    };
    let mut times: Vec<f64> = replies.iter().map(|r| r.1).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    PingReport {
        sent,
        received: seqs.len() as u64,
        lost: sent - seqs.len() as u64,
        longest_gap: Duration::from_secs_f64(gap),
        interval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_and_ignores_other_lines() {
        let l = "[1763800000.250000] 64 bytes from 10.78.0.100: icmp_seq=7 ttl=64 time=0.42 ms";
        assert_eq!(parse_reply(l), Some((7, 1763800000.25)));
        assert_eq!(
            parse_reply("PING 10.78.0.100 (10.78.0.100) 56(84) bytes of data."),
            None
        );
        assert_eq!(
            parse_reply("[1763800000.3] no answer yet for icmp_seq=8"),
            None
        );
    }

    #[test]
    fn counts_losses_inside_the_run_and_the_longest_gap() {
        let r = [(1, 10.00), (2, 10.01), (5, 10.05), (6, 10.06)];
        let rep = report(&r, Duration::from_millis(10));
        assert_eq!((rep.sent, rep.received, rep.lost), (6, 4, 2));
        assert!((rep.longest_gap.as_secs_f64() - 0.04).abs() < 1e-6);
    }
}
