use super::*;
use ferry_types::HaMode;
use proptest::prelude::*;

const G: u64 = 1 << 30;

fn host(name: &str, alive: bool, mem_g: u64) -> HostView {
    HostView {
        name: name.into(),
        alive,
        maintenance: false,
        memory_bytes: mem_g * G,
    }
}

fn vm(name: &str, host: &str, mem_g: u64) -> VmView {
    VmView {
        name: name.into(),
        host: host.into(),
        ha: HaPolicy {
            mode: HaMode::Restart,
            ..HaPolicy::default()
        },
        memory_bytes: mem_g * G,
        running: true,
        wanted: true,
        relocate: false,
    }
}

fn recover(vm: &str, from: &str, to: &str) -> Command {
    Command::Recover {
        vm: vm.into(),
        from: from.into(),
        to: to.into(),
    }
}

#[test]
fn nothing_to_do_while_every_host_is_alive() {
    let hosts = [host("h1", true, 8), host("h2", true, 8)];
    assert_eq!(plan(&hosts, &[vm("a", "h1", 1), vm("b", "h2", 1)]), vec![]);
}

#[test]
fn dead_hosts_vms_go_to_the_host_with_most_free_memory() {
    let hosts = [
        host("h1", false, 8),
        host("h2", true, 8),
        host("h3", true, 8),
    ];
    let vms = [vm("a", "h1", 2), vm("x", "h2", 3)];
    assert_eq!(plan(&hosts, &vms), vec![recover("a", "h1", "h3")]);
}

#[test]
fn priority_first_and_placements_count_against_the_target() {
    let hosts = [
        host("h1", false, 8),
        host("h2", true, 4),
        host("h3", true, 3),
    ];
    let mut low = vm("a-low", "h1", 3);
    low.ha.priority = 0;
    let mut high = vm("z-high", "h1", 3);
    high.ha.priority = 10;
    // z-high takes h2 (most free); a-low then fits only h3.
    assert_eq!(
        plan(&hosts, &[low, high]),
        vec![recover("z-high", "h1", "h2"), recover("a-low", "h1", "h3")]
    );
}

#[test]
fn non_ha_stopped_and_unknown_host_vms_are_left_alone() {
    let hosts = [host("h1", false, 8), host("h2", true, 8)];
    let mut off = vm("off", "h1", 1);
    off.ha.mode = HaMode::Off;
    let mut stopped = vm("stopped", "h1", 1);
    stopped.wanted = false;
    let orphan = vm("orphan", "gone", 1);
    assert_eq!(plan(&hosts, &[off, stopped, orphan]), vec![]);
}

#[test]
fn maintenance_full_and_anti_affinity_hosts_are_skipped_with_reasons() {
    let mut m = host("h2", true, 16);
    m.maintenance = true;
    let hosts = [
        host("h1", false, 8),
        m,
        host("h3", true, 2),
        host("h4", true, 8),
    ];
    let mut a = vm("db1", "h1", 1);
    a.ha.anti_affinity = Some("db".into());
    let mut other = vm("db2", "h4", 1);
    other.ha.anti_affinity = Some("db".into());
    let big = vm("big", "h1", 4);
    let cmds = plan(&hosts, &[a, other, big]);
    assert_eq!(cmds[0], recover("big", "h1", "h4"));
    // db1 must avoid h4 (db2 runs there): h3 has room for 1 GiB.
    assert_eq!(cmds[1], recover("db1", "h1", "h3"));
}

#[test]
fn no_place_names_each_hosts_reason() {
    let mut m = host("h2", true, 16);
    m.maintenance = true;
    let hosts = [host("h1", false, 8), m, host("h3", true, 1)];
    let cmds = plan(&hosts, &[vm("big", "h1", 4)]);
    let [Command::NoPlace { vm: name, reason }] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!(name, "big");
    assert!(reason.contains("h2: maintenance") && reason.contains("h3: 1024 MiB free"));
    let none = plan(&[host("h1", false, 8)], &[vm("a", "h1", 1)]);
    assert!(
        matches!(&none[0], Command::NoPlace { reason, .. } if reason.contains("no other host"))
    );
}

#[test]
fn crash_looping_vm_is_relocated_never_to_its_own_host() {
    let hosts = [host("h1", true, 64), host("h2", true, 8)];
    let mut v = vm("a", "h1", 1);
    v.relocate = true;
    v.running = false;
    assert_eq!(
        plan(&hosts, &[v]),
        vec![Command::Relocate {
            vm: "a".into(),
            from: "h1".into(),
            to: "h2".into()
        }]
    );
}

proptest! {
    /// Whatever the view: only HA VMs of dead hosts (or relocations) move, only to live
    /// hosts out of maintenance, never beyond a host's memory, each VM at most once.
    #[test]
    fn plans_never_overcommit_or_target_dead_hosts(
        hosts in prop::collection::vec((any::<bool>(), any::<bool>(), 1u64..16), 1..6),
        vms in prop::collection::vec((0usize..6, 1u64..4, any::<bool>(), any::<bool>(), -2i32..3), 0..20),
    ) {
        let hosts: Vec<HostView> = hosts.iter().enumerate().map(|(i, (alive, maint, mem))| HostView {
            name: format!("h{i}"), alive: *alive, maintenance: *maint, memory_bytes: mem * G,
        }).collect();
        let vms: Vec<VmView> = vms.iter().enumerate().map(|(i, (h, mem, ha, running, prio))| {
            let mut v = vm(&format!("v{i}"), &format!("h{}", h % hosts.len()), *mem);
            v.ha.mode = if *ha { HaMode::Restart } else { HaMode::Off };
            v.ha.priority = *prio;
            v.running = *running;
            v
        }).collect();
        let cmds = plan(&hosts, &vms);
        let mut load: BTreeMap<String, u64> = BTreeMap::new();
        for v in &vms {
            let h = hosts.iter().find(|h| h.name == v.host).unwrap();
            if h.alive && (v.running || v.ha.enabled()) {
                *load.entry(v.host.clone()).or_default() += v.memory_bytes;
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &cmds {
            match c {
                Command::Recover { vm, from, to } => {
                    prop_assert!(seen.insert(vm.clone()));
                    let v = vms.iter().find(|v| &v.name == vm).unwrap();
                    prop_assert!(v.ha.enabled() && &v.host == from);
                    prop_assert!(!hosts.iter().find(|h| &h.name == from).unwrap().alive);
                    let t = hosts.iter().find(|h| &h.name == to).unwrap();
                    prop_assert!(t.alive && !t.maintenance);
                    *load.entry(to.clone()).or_default() += v.memory_bytes;
                }
                Command::Relocate { .. } => prop_assert!(false, "no relocation asked"),
                Command::NoPlace { vm, .. } => prop_assert!(seen.insert(vm.clone())),
            }
        }
        for (h, used) in load {
            let cap = hosts.iter().find(|x| x.name == h).unwrap().memory_bytes;
            // Pre-existing load may exceed capacity; recoveries never add beyond it.
            let added: u64 = cmds.iter().filter_map(|c| match c {
                Command::Recover { vm, to, .. } if *to == h => vms.iter().find(|v| &v.name == vm).map(|v| v.memory_bytes),
                _ => None,
            }).sum();
            prop_assert!(added == 0 || used <= cap);
        }
    }
}

proptest! {
    /// `select` alone decides which VMs and in what order; `plan_with` asks the placer
    /// once per selected VM, in that order, and never overrides or vetoes its answer
    /// (other than refusing the host the VM leaves).
    #[test]
    fn the_placer_alone_decides_where(
        hosts in prop::collection::vec(any::<bool>(), 1..5),
        vms in prop::collection::vec((0usize..5, any::<bool>(), any::<bool>(), any::<bool>(), -2i32..3), 0..16),
        answers in prop::collection::vec(proptest::option::of(0usize..5), 16),
    ) {
        let hosts: Vec<HostView> = hosts.iter().enumerate().map(|(i, alive)| HostView {
            name: format!("h{i}"), alive: *alive, maintenance: false, memory_bytes: G,
        }).collect();
        let vms: Vec<VmView> = vms.iter().enumerate().map(|(i, (h, ha, wanted, relocate, prio))| {
            let mut v = vm(&format!("v{i:02}"), &format!("h{}", h % hosts.len()), 1);
            v.ha.mode = if *ha { HaMode::Restart } else { HaMode::Off };
            v.ha.priority = *prio;
            v.wanted = *wanted;
            v.relocate = *relocate;
            v
        }).collect();
        let sel = select(&hosts, &vms);
        let alive = |h: &str| hosts.iter().any(|x| x.name == h && x.alive);
        // Which: HA and wanted, dead host or crash-looping on a live one; each once.
        for r in &sel {
            let v = vms.iter().find(|v| v.name == r.vm).unwrap();
            prop_assert!(v.ha.enabled() && v.wanted);
            prop_assert_eq!(r.dead, !alive(&v.host));
            prop_assert!(r.dead || v.relocate);
        }
        for v in &vms {
            let due = v.ha.enabled() && v.wanted && (!alive(&v.host) || v.relocate);
            prop_assert_eq!(sel.iter().filter(|r| r.vm == v.name).count(), usize::from(due));
        }
        // Order: priority, then name.
        for w in sel.windows(2) {
            let (a, b) = (vms.iter().find(|v| v.name == w[0].vm).unwrap(), vms.iter().find(|v| v.name == w[1].vm).unwrap());
            prop_assert!(a.ha.priority > b.ha.priority || (a.ha.priority == b.ha.priority && a.name < b.name));
        }
        // Where: whatever the placer says, in select's order.
        let mut asked = vec![];
        let cmds = plan_with(&hosts, &vms, |r| {
            asked.push(r.vm.clone());
            match answers[asked.len() - 1] {
                Some(i) => Ok(format!("h{}", i % hosts.len())),
                None => Err("full".into()),
            }
        });
        prop_assert_eq!(asked, sel.iter().map(|r| r.vm.clone()).collect::<Vec<_>>());
        prop_assert_eq!(cmds.len(), sel.len());
        for (i, (c, r)) in cmds.iter().zip(&sel).enumerate() {
            let want = answers[i].map(|a| format!("h{}", a % hosts.len()));
            match c {
                Command::Recover { vm, from, to } | Command::Relocate { vm, from, to } => {
                    prop_assert_eq!(vm, &r.vm);
                    prop_assert_eq!(from, &r.from);
                    prop_assert_eq!(Some(to.clone()), want);
                    prop_assert!(to != from);
                    prop_assert_eq!(matches!(c, Command::Recover { .. }), r.dead);
                }
                Command::NoPlace { vm, .. } => {
                    prop_assert_eq!(vm, &r.vm);
                    prop_assert!(want.is_none() || want.as_deref() == Some(r.from.as_str()));
                }
            }
        }
    }
}
