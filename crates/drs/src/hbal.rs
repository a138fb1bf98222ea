//! Ganeti's htools text backend (`hbal -t FILE`, format in htools(1)) and hbal's
//! output, so the benchmark can hand both planners the same cluster and judge both
//! results by the same score. VMs become instances on shared storage (`rbd`: any node
//! can take them by live migration, as ours); measured load goes in hbal's dynamic
//! utilisation file (`-U`) as fractions of the host, so on equal hosts hbal's load
//! metrics are our utilisations.

use crate::Cluster;
use std::fmt::Write;

const GROUP: &str = "ferry-group-0000";

/// The cluster in the text backend format.
pub fn write_cluster(c: &Cluster, max_vcpu_ratio: f64) -> String {
    let mut s = format!("default|{GROUP}|preferred||\n\n");
    for h in &c.hosts {
        let used: u64 = c
            .vms
            .iter()
            .filter(|v| v.running && v.host == h.name)
            .map(|v| v.memory_bytes)
            .sum();
        let total = h.memory_bytes >> 20;
        let free = total.saturating_sub(used >> 20);
        let role = if h.state == crate::HostState::Online {
            "N"
        } else {
            "Y"
        };
        let _ = writeln!(
            s,
            "{}|{total}|0|{free}|1048576|1048576|{}|{role}|{GROUP}|1||N|0|1|1.0",
            h.name,
            ferry_types::whole(h.cpus.round())
        );
    }
    s.push('\n');
    for v in &c.vms {
        let status = if v.running { "running" } else { "ADMIN_down" };
        let _ = writeln!(
            s,
            "{}|{}|1024|{}|{status}|Y|{}||rbd||1|-",
            v.name,
            v.memory_bytes >> 20,
            v.vcpus,
            v.host
        );
    }
    s.push_str("\n\n");
    let _ = writeln!(
        s,
        "|128,1,1024,1,1,1|128,1,1024,1,1,1;16777216,256,1048576,16,8,1|plain,drbd,rbd|{max_vcpu_ratio:.1}|32.0"
    );
    s
}

/// hbal's `-U` file: per VM its CPU and memory as fractions of its host, disk and
/// network 0.
pub fn write_utilisation(c: &Cluster) -> String {
    let mut s = String::new();
    for v in &c.vms {
        let Some(h) = c.hosts.iter().find(|h| h.name == v.host) else {
            continue;
        };
        let _ = writeln!(
            s,
            "{} {:.6} {:.6} 0 0",
            v.name,
            v.cpu_load / h.cpus.max(0.001),
            v.memory_bytes as f64 / h.memory_bytes.max(1) as f64
        );
    }
    s
}

/// One step of hbal's solution (`  3. vm7 h1 => h4  2.0545 a=fa:h4`).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub vm: String,
    pub from: String,
    pub to: String,
}

/// The steps hbal printed with `-v`.
pub fn parse_steps(stdout: &str) -> Vec<Step> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let numbered = f.first()?.strip_suffix('.')?.parse::<u64>().is_ok();
            if !numbered || f.len() < 5 || f[3] != "=>" {
                return None;
            }
            Some(Step {
                vm: f[1].into(),
                from: f[2].into(),
                to: f[4].into(),
            })
        })
        .collect()
}

/// `c` with hbal's steps carried out.
pub fn apply(c: &Cluster, steps: &[Step]) -> Cluster {
    let mut out = c.clone();
    for st in steps {
        if let Some(v) = out.vms.iter_mut().find(|v| v.name == st.vm) {
            v.host = st.to.clone();
        }
    }
    out
}
