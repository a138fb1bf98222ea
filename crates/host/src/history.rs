//! The last hour of load per VM and for the host, for the web UI's graphs: every
//! [`INTERVAL`] the raw counters (CPU time, resident memory, disk and NIC bytes) are
//! read and turned into rates against the previous reading. Bounded: [`KEEP`] points per
//! series, series of VMs that are gone are dropped. Kept in memory: a daemon restart
//! starts the graphs afresh.

use crate::metrics::VmSample;
use crate::Host;
use ferry_types::{MetricsHistory, MetricsPoint};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Seconds between samples.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// One hour of samples.
pub const KEEP: usize = 360;

/// Cumulative counters read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub time_ms: u64,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub disk_read: u64,
    pub disk_write: u64,
    pub net_rx: u64,
    pub net_tx: u64,
}

/// A series: the last reading and the points made so far.
#[derive(Debug, Default)]
pub struct Series {
    last: Option<Counters>,
    pub points: VecDeque<MetricsPoint>,
}

impl Series {
    /// Adds a reading: a point with the rates since the last one (none for the first
    /// reading, or when a counter went backwards — a restarted QEMU starts from zero).
    pub fn add(&mut self, c: Counters) {
        if let Some(p) = self.last {
            let dt = c.time_ms.saturating_sub(p.time_ms) as f64 / 1000.0;
            let back = c.cpu_seconds < p.cpu_seconds
                || c.disk_read < p.disk_read
                || c.disk_write < p.disk_write
                || c.net_rx < p.net_rx
                || c.net_tx < p.net_tx;
            if dt > 0.0 && !back {
                let rate = |a: u64, b: u64| (a - b) as f64 / dt;
                self.points.push_back(MetricsPoint {
                    time_ms: c.time_ms,
                    cpu: (c.cpu_seconds - p.cpu_seconds) / dt,
                    memory_bytes: c.memory_bytes,
                    disk_read_bps: rate(c.disk_read, p.disk_read),
                    disk_write_bps: rate(c.disk_write, p.disk_write),
                    net_rx_bps: rate(c.net_rx, p.net_rx),
                    net_tx_bps: rate(c.net_tx, p.net_tx),
                });
                while self.points.len() > KEEP {
                    self.points.pop_front();
                }
            }
        }
        self.last = Some(c);
    }

    /// A VM that is not running: its reading is forgotten, a gap follows.
    pub fn pause(&mut self) {
        self.last = None;
    }
}

#[derive(Debug, Default)]
pub struct History {
    pub host: Series,
    pub vms: HashMap<String, Series>,
}

/// The host's counters: CPU from /proc/stat, memory from /proc/meminfo, disks from
/// /proc/diskstats (whole devices), network from /proc/net/dev (without loopback).
fn host_counters() -> Counters {
    let mut c = Counters {
        time_ms: crate::events::now_ms(),
        ..Default::default()
    };
    if let Ok(s) = std::fs::read_to_string("/proc/stat") {
        if let Some(l) = s.lines().find(|l| l.starts_with("cpu ")) {
            let f: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle+iowait.
            let busy: f64 = f.iter().take(8).sum::<f64>()
                - f.get(3).copied().unwrap_or(0.0)
                - f.get(4).copied().unwrap_or(0.0);
            c.cpu_seconds = busy / 100.0;
        }
    }
    c.memory_bytes = crate::meminfo("MemTotal:").saturating_sub(crate::meminfo("MemAvailable:"));
    if let Ok(s) = std::fs::read_to_string("/proc/diskstats") {
        for l in s.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let Some(name) = f.get(2) else { continue };
            // Whole disks only (partitions would count twice); no loop/ram devices.
            let whole = std::path::Path::new(&format!("/sys/block/{name}")).exists();
            if !whole || name.starts_with("loop") || name.starts_with("ram") {
                continue;
            }
            let sectors = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            c.disk_read += sectors(5) * 512;
            c.disk_write += sectors(9) * 512;
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/net/dev") {
        for l in s.lines().skip(2) {
            let Some((name, rest)) = l.split_once(':') else {
                continue;
            };
            if name.trim() == "lo" {
                continue;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            c.net_rx += f.first().copied().unwrap_or(0);
            c.net_tx += f.get(8).copied().unwrap_or(0);
        }
    }
    c
}

fn vm_counters(s: &VmSample, time_ms: u64) -> Counters {
    Counters {
        time_ms,
        cpu_seconds: s.cpu_seconds.unwrap_or(0.0),
        memory_bytes: s.rss_bytes.unwrap_or(0),
        disk_read: s.disks.iter().map(|d| d.1).sum(),
        disk_write: s.disks.iter().map(|d| d.2).sum(),
        net_rx: s.nics.iter().map(|n| n.1).sum(),
        net_tx: s.nics.iter().map(|n| n.2).sum(),
    }
}

impl Host {
    #[tracing::instrument(skip_all)]
    pub async fn history_loop(self) {
        loop {
            self.record_history().await;
            self.inner
                .loops
                .report("history", INTERVAL, Ok::<(), String>(()));
            tokio::time::sleep(INTERVAL).await;
        }
    }

    async fn record_history(&self) {
        let samples = self.sample().await;
        let host = host_counters();
        let mut h = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        h.host.add(host);
        h.vms
            .retain(|name, _| samples.iter().any(|s| &s.name == name));
        for s in &samples {
            let series = h.vms.entry(s.name.clone()).or_default();
            if s.up && s.cpu_seconds.is_some() {
                series.add(vm_counters(s, host.time_ms));
            } else {
                series.pause();
            }
        }
    }

    /// The last hour of a VM's load (empty while it never ran since the daemon started).
    pub async fn vm_history(&self, name: &str) -> crate::Result<MetricsHistory> {
        let vm = self.get_vm(name).await?;
        let h = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        Ok(MetricsHistory {
            interval_s: INTERVAL.as_secs(),
            memory_limit_bytes: vm.spec.memory_mib << 20,
            cpu_limit: f64::from(vm.spec.cpus),
            points: h
                .vms
                .get(name)
                .map(|s| s.points.iter().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// Cores the host kept busy over the last sample interval (none before the second
    /// sample).
    pub fn host_cpu_busy(&self) -> Option<f64> {
        let h = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        h.host.points.back().map(|p| p.cpu)
    }

    /// The last hour of this host's load.
    pub fn host_history(&self) -> MetricsHistory {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let memory = crate::host_memory_bytes();
        let h = self.inner.history.lock().unwrap_or_else(|e| e.into_inner());
        MetricsHistory {
            interval_s: INTERVAL.as_secs(),
            memory_limit_bytes: memory,
            cpu_limit: cpus as f64,
            points: h.host.points.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(t: u64, cpu: f64, rd: u64) -> Counters {
        Counters {
            time_ms: t,
            cpu_seconds: cpu,
            memory_bytes: 100,
            disk_read: rd,
            ..Default::default()
        }
    }

    #[test]
    fn rates_from_counters_gaps_and_bound() {
        let mut s = Series::default();
        s.add(c(0, 1.0, 0));
        assert!(
            s.points.is_empty(),
            "the first reading has nothing to compare"
        );
        s.add(c(10_000, 6.0, 10_000));
        assert_eq!(s.points.len(), 1);
        assert!((s.points[0].cpu - 0.5).abs() < 1e-9);
        assert!((s.points[0].disk_read_bps - 1000.0).abs() < 1e-9);
        // A counter going backwards (QEMU restarted) makes no point.
        s.add(c(20_000, 0.5, 0));
        assert_eq!(s.points.len(), 1);
        s.add(c(30_000, 1.5, 0));
        assert_eq!(s.points.len(), 2);
        // A pause: the next reading starts afresh.
        s.pause();
        s.add(c(40_000, 100.0, 0));
        assert_eq!(s.points.len(), 2);
        for i in 0..1000u64 {
            s.add(c(50_000 + i * 10_000, 100.0 + i as f64, 0));
        }
        assert_eq!(s.points.len(), KEEP);
        assert_eq!(s.points.back().unwrap().time_ms, 50_000 + 999 * 10_000);
    }

    #[test]
    fn host_counters_read_this_machine() {
        let a = host_counters();
        assert!(a.cpu_seconds > 0.0 && a.memory_bytes > 0, "{a:?}");
    }
}
