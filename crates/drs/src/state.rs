//! The snapshot indexed for fast what-ifs: per host the running VMs, memory, vCPUs and
//! CPU load in use, the affinity groups present, and the sums the score needs.

use crate::{Cluster, HostState, Vm};
use ferry_types::DrsConfig;
use std::collections::HashMap;

pub(crate) struct State<'a> {
    pub c: &'a Cluster,
    /// Index of each VM's host (None: unknown host).
    pub at: Vec<Option<usize>>,
    pub mem: Vec<u64>,
    pub cpu: Vec<f64>,
    pub vcpus: Vec<u64>,
    /// Running VMs per host.
    pub on: Vec<Vec<usize>>,
    /// Group → running members per host.
    pub anti: HashMap<&'a str, Vec<u32>>,
    pub aff: HashMap<&'a str, Vec<u32>>,
}

pub(crate) fn mib(b: u64) -> u64 {
    b >> 20
}

impl<'a> State<'a> {
    pub fn new(c: &'a Cluster) -> State<'a> {
        let n = c.hosts.len();
        let host_ix: HashMap<&str, usize> = c
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();
        let mut s = State {
            c,
            at: c
                .vms
                .iter()
                .map(|v| host_ix.get(v.host.as_str()).copied())
                .collect(),
            mem: vec![0; n],
            cpu: c.hosts.iter().map(|h| h.cpu_base.max(0.0)).collect(),
            vcpus: vec![0; n],
            on: vec![vec![]; n],
            anti: HashMap::new(),
            aff: HashMap::new(),
        };
        for (i, v) in c.vms.iter().enumerate() {
            if let (true, Some(h)) = (v.running, s.at[i]) {
                s.add(i, h);
            }
        }
        s
    }

    /// Puts running VM `v` on host `h` (counts only; `at` is the caller's).
    pub fn add(&mut self, v: usize, h: usize) {
        let vm = &self.c.vms[v];
        self.mem[h] += vm.memory_bytes;
        self.cpu[h] += vm.cpu_load;
        self.vcpus[h] += vm.vcpus as u64;
        self.on[h].push(v);
        let n = self.c.hosts.len();
        for g in &vm.rules.anti_affinity {
            self.anti.entry(g.as_str()).or_insert_with(|| vec![0; n])[h] += 1;
        }
        if let Some(g) = &vm.rules.affinity {
            self.aff.entry(g.as_str()).or_insert_with(|| vec![0; n])[h] += 1;
        }
        self.at[v] = Some(h);
    }

    pub fn remove(&mut self, v: usize, h: usize) {
        let vm = &self.c.vms[v];
        self.mem[h] -= vm.memory_bytes;
        self.cpu[h] -= vm.cpu_load;
        self.vcpus[h] -= vm.vcpus as u64;
        if let Some(p) = self.on[h].iter().position(|x| *x == v) {
            self.on[h].swap_remove(p);
        }
        for g in &vm.rules.anti_affinity {
            if let Some(c) = self.anti.get_mut(g.as_str()) {
                c[h] -= 1;
            }
        }
        if let Some(g) = &vm.rules.affinity {
            if let Some(c) = self.aff.get_mut(g.as_str()) {
                c[h] -= 1;
            }
        }
    }

    /// Why host `h` cannot take `vm` (which must not be counted on `h`); empty: it can.
    pub fn reasons(&self, vm: &Vm, h: usize, cfg: &DrsConfig, out: &mut Vec<String>) {
        let host = &self.c.hosts[h];
        match host.state {
            HostState::Online => {}
            HostState::Maintenance => out.push("in maintenance".into()),
            HostState::Down => out.push("down (no lease)".into()),
        }
        self.rule_reasons(vm, h, out);
        self.capacity_reasons(vm, h, cfg, out);
    }

    /// The VM's rules that host `h` breaks: pins, labels, affinity, anti-affinity.
    pub fn rule_reasons(&self, vm: &Vm, h: usize, out: &mut Vec<String>) {
        let host = &self.c.hosts[h];
        let r = &vm.rules;
        match &host.caps {
            Some(caps) => out.extend(caps.refusals_for(
                vm.arch.as_str(),
                vm.cpu_model.as_deref(),
                vm.machine.as_deref(),
                &vm.needs,
            )),
            // a host that could not say what it runs runs its own x86_64 VMs as before
            None if vm.arch != ferry_types::Arch::X86_64 => {
                out.push(format!("did not say whether it runs {} guests", vm.arch))
            }
            None => {}
        }
        if !r.hosts.is_empty() && !r.hosts.contains(&host.name) {
            out.push(format!("not among the VM's hosts ({})", r.hosts.join(", ")));
        }
        for l in &r.host_labels {
            if !host.labels.contains(l) {
                out.push(format!("lacks label {l}"));
            }
        }
        for g in &r.anti_affinity {
            if self.anti.get(g.as_str()).is_some_and(|c| c[h] > 0) {
                out.push(format!("anti-affinity group {g}: one of its VMs runs here"));
            }
        }
        if let Some(g) = &r.affinity {
            if let Some(c) = self.aff.get(g.as_str()) {
                if c[h] == 0 && c.iter().any(|n| *n > 0) {
                    let at: Vec<&str> = c
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| **n > 0)
                        .map(|(i, _)| self.c.hosts[i].name.as_str())
                        .collect();
                    out.push(format!("affinity group {g}: runs on {}", at.join(", ")));
                }
            }
        }
    }

    /// Memory, vCPU ratio and CPU load of host `h` with `vm` added.
    pub fn capacity_reasons(&self, vm: &Vm, h: usize, cfg: &DrsConfig, out: &mut Vec<String>) {
        let host = &self.c.hosts[h];
        let free = host.memory_bytes.saturating_sub(self.mem[h]);
        if vm.memory_bytes > free {
            out.push(format!(
                "memory: needs {} MiB, {} MiB free",
                mib(vm.memory_bytes),
                mib(free)
            ));
        }
        let vc = self.vcpus[h] + vm.vcpus as u64;
        if vc as f64 > cfg.max_vcpu_ratio * host.cpus {
            out.push(format!(
                "vCPUs: {vc} on {} cores is above the ratio {}",
                host.cpus, cfg.max_vcpu_ratio
            ));
        }
        if self.cpu[h] + vm.cpu_load > host.cpus {
            out.push(format!(
                "CPU: load would be {:.2} of {} cores",
                self.cpu[h] + vm.cpu_load,
                host.cpus
            ));
        }
    }

    /// Online, with room for the VM's memory, vCPUs and load (the cheap checks).
    pub fn has_room(&self, vm: &Vm, h: usize, cfg: &DrsConfig) -> bool {
        let host = &self.c.hosts[h];
        host.state == HostState::Online
            && vm.memory_bytes <= host.memory_bytes.saturating_sub(self.mem[h])
            && self.cpu[h] + vm.cpu_load <= host.cpus
            && (self.vcpus[h] + vm.vcpus as u64) as f64 <= cfg.max_vcpu_ratio * host.cpus
    }

    pub fn fits(&self, vm: &Vm, h: usize, cfg: &DrsConfig) -> bool {
        if !self.has_room(vm, h, cfg) {
            return false;
        }
        let mut r = vec![];
        self.reasons(vm, h, cfg, &mut r);
        r.is_empty()
    }

    /// (memory, CPU) utilisation of host `h`, 0..1 (more when overcommitted).
    pub fn util(&self, h: usize) -> (f64, f64) {
        let host = &self.c.hosts[h];
        (
            frac(self.mem[h] as f64, host.memory_bytes as f64),
            frac(self.cpu[h], host.cpus),
        )
    }

    /// Hosts that count in the balance.
    pub fn balanced(&self) -> impl Iterator<Item = usize> + '_ {
        self.c
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.state == HostState::Online)
            .map(|(i, _)| i)
    }
}

fn frac(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}
