//! Prometheus metrics, gathered at scrape time: per-VM CPU time and memory from /proc,
//! disk counters from QMP `query-blockstats`, NIC counters from the taps.

use crate::Host;
use metrics::{counter, gauge, with_local_recorder};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

pub struct VmSample {
    pub name: String,
    pub up: bool,
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub memory_bytes: u64,
    /// (disk id, rd_bytes, wr_bytes, rd_ops, wr_ops)
    pub disks: Vec<(String, u64, u64, u64, u64)>,
    /// (nic id, guest rx bytes, guest tx bytes, guest rx packets, guest tx packets)
    pub nics: Vec<(String, u64, u64, u64, u64)>,
}

pub fn proc_cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ... utime(11) stime(12).
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / USER_HZ)
}

pub fn proc_rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

impl Host {
    pub async fn sample(&self) -> Vec<VmSample> {
        let mut out = vec![];
        let Ok(recs) = self.records().await else {
            return out;
        };
        for r in recs {
            let slot = self.slot(&r.spec.name);
            let (pid, qmp) = slot.with(|rt| (rt.pid, rt.qmp.clone()));
            let mut s = VmSample {
                name: r.spec.name.clone(),
                up: slot.state().has_process(),
                cpu_seconds: pid.and_then(proc_cpu_seconds),
                rss_bytes: pid.and_then(proc_rss_bytes),
                memory_bytes: r.spec.memory_mib << 20,
                disks: vec![],
                nics: vec![],
            };
            if let Some(q) = qmp {
                let q = q.with_timeout(Duration::from_secs(2));
                let stats = q
                    .run(&ferry_qmp::commands::QueryBlockstats { query_nodes: false })
                    .await;
                for b in stats.into_iter().flatten() {
                    let id = b
                        .qdev
                        .as_deref()
                        .map(|d| {
                            d.trim_start_matches("/machine/peripheral/")
                                .trim_end_matches("/virtio-backend")
                                .to_string()
                        })
                        .unwrap_or_default();
                    let st = b.stats;
                    if id.starts_with("disk") {
                        s.disks.push((
                            id,
                            st.rd_bytes,
                            st.wr_bytes,
                            st.rd_operations,
                            st.wr_operations,
                        ));
                    }
                }
            }
            if s.up {
                for i in 0..r.spec.nics.len() {
                    if let Some(t) = self.inner.os.link_stats(&ferry_net::tap_name(r.id, i)) {
                        // The tap's tx is what the guest receives.
                        s.nics.push((
                            format!("net{i}"),
                            t.tx_bytes,
                            t.rx_bytes,
                            t.tx_packets,
                            t.rx_packets,
                        ));
                    }
                }
            }
            out.push(s);
        }
        out
    }

    /// The metrics in Prometheus text format.
    pub async fn render_metrics(&self) -> String {
        let samples = self.sample().await;
        let tasks_running = self
            .tasks()
            .list()
            .iter()
            .filter(|t| t.state == ferry_types::TaskState::Running)
            .count();
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        with_local_recorder(&recorder, || {
            gauge!("ferry_vms_defined").set(samples.len() as f64);
            gauge!("ferry_vms_running").set(samples.iter().filter(|s| s.up).count() as f64);
            gauge!("ferry_tasks_running").set(tasks_running as f64);
            for s in &samples {
                let vm = s.name.clone();
                gauge!("ferry_vm_up", "vm" => vm.clone()).set(if s.up { 1.0 } else { 0.0 });
                gauge!("ferry_vm_memory_configured_bytes", "vm" => vm.clone())
                    .set(s.memory_bytes as f64);
                if let Some(c) = s.cpu_seconds {
                    gauge!("ferry_vm_cpu_seconds_total", "vm" => vm.clone()).set(c);
                }
                if let Some(r) = s.rss_bytes {
                    gauge!("ferry_vm_memory_rss_bytes", "vm" => vm.clone()).set(r as f64);
                }
                for (d, rb, wb, ro, wo) in &s.disks {
                    let l = [("vm", vm.clone()), ("disk", d.clone())];
                    counter!("ferry_vm_disk_read_bytes_total", &l).absolute(*rb);
                    counter!("ferry_vm_disk_write_bytes_total", &l).absolute(*wb);
                    counter!("ferry_vm_disk_read_ops_total", &l).absolute(*ro);
                    counter!("ferry_vm_disk_write_ops_total", &l).absolute(*wo);
                }
                for (n, rb, tb, rp, tp) in &s.nics {
                    let l = [("vm", vm.clone()), ("nic", n.clone())];
                    counter!("ferry_vm_net_rx_bytes_total", &l).absolute(*rb);
                    counter!("ferry_vm_net_tx_bytes_total", &l).absolute(*tb);
                    counter!("ferry_vm_net_rx_packets_total", &l).absolute(*rp);
                    counter!("ferry_vm_net_tx_packets_total", &l).absolute(*tp);
                }
            }
        });
        handle.render()
    }
}
