use crate::*;
use ferry_types::{Allocation, DrsConfig, PlacementPolicy, ResourcePool};
use proptest::prelude::*;
use std::collections::BTreeSet;

const G: u64 = 1 << 30;
const M: u64 = 1 << 20;

fn cfg() -> DrsConfig {
    DrsConfig::default()
}

fn three() -> Cluster {
    Cluster {
        hosts: vec![
            Host::new("a", 4.0, 8 * G),
            Host::new("b", 4.0, 8 * G),
            Host::new("c", 4.0, 8 * G),
        ],
        vms: vec![],
    }
}

/// Replays a plan on the snapshot, checking capacity after each move.
fn replay(c: &Cluster, plan: &ferry_types::DrsPlan, cfg: &DrsConfig) -> Cluster {
    let mut c = c.clone();
    for m in &plan.moves {
        let v = c.vms.iter_mut().find(|v| v.name == m.vm).unwrap();
        assert_eq!(v.host, m.from, "{m:?}");
        v.host = m.to.clone();
        let h = c.hosts.iter().find(|h| h.name == m.to).unwrap();
        let on = c.vms.iter().filter(|v| v.running && v.host == h.name);
        let (mem, vcpus, cpu) = on.fold((0, 0, 0.0), |(a, b, x), v| {
            (a + v.memory_bytes, b + v.vcpus, x + v.cpu_load)
        });
        assert!(
            mem <= h.memory_bytes,
            "{} overcommitted after {m:?}",
            h.name
        );
        assert!(vcpus as f64 <= cfg.max_vcpu_ratio * h.cpus);
        assert!(cpu <= h.cpus + 1e-9);
    }
    c
}

#[test]
fn spread_picks_most_free_pack_the_fullest() {
    let mut c = three();
    c.vms.push(Vm::new("x", "a", 1, 4 * G, 1.0));
    c.vms.push(Vm::new("y", "b", 1, 2 * G, 0.5));
    let new = Vm::new("n", "", 1, G, 0.1);
    let r = place(&c, &new, &cfg());
    assert_eq!(r.host.as_deref(), Some("c"));
    let pack = DrsConfig {
        policy: PlacementPolicy::Pack,
        ..cfg()
    };
    assert_eq!(place(&c, &new, &pack).host.as_deref(), Some("a"));
}

#[test]
fn explain_names_every_filter() {
    let mut c = three();
    c.hosts[0].state = HostState::Maintenance;
    c.hosts[1].labels = vec!["ssd".into()];
    c.hosts[2].labels = vec!["ssd".into()];
    let mut big = Vm::new("big", "c", 2, 7 * G, 0.5);
    big.rules.anti_affinity = vec!["db".into()];
    c.vms.push(big);
    let mut vm = Vm::new("n", "", 1, 2 * G, 0.1);
    vm.rules.host_labels = vec!["ssd".into()];
    vm.rules.anti_affinity = vec!["db".into()];
    let r = place(&c, &vm, &cfg());
    assert_eq!(r.host.as_deref(), Some("b"));
    let why = |h: &str| {
        r.hosts
            .iter()
            .find(|x| x.host == h)
            .unwrap()
            .reasons
            .join("; ")
    };
    assert!(why("a").contains("maintenance"), "{}", why("a"));
    assert!(why("a").contains("lacks label ssd"), "{}", why("a"));
    assert!(
        why("c").contains("memory: needs 2048 MiB, 1024 MiB free"),
        "{}",
        why("c")
    );
    assert!(why("c").contains("anti-affinity group db"), "{}", why("c"));
    assert!(r.hosts[1].eligible && r.hosts[1].score.is_some());

    vm.rules.hosts = vec!["c".into()];
    let r = place(&c, &vm, &cfg());
    assert_eq!(r.host, None);
    let b = r.hosts.iter().find(|x| x.host == "b").unwrap();
    assert!(
        b.reasons[0].contains("not among the VM's hosts (c)"),
        "{b:?}"
    );
}

#[test]
fn restarts_and_evacuations_follow_the_rules() {
    let mut c = three();
    c.hosts[2].labels = vec!["ssd".into()];
    let mut db = Vm::new("db", "a", 1, 2 * G, 0.5);
    db.rules.host_labels = vec!["ssd".into()];
    db.ha = true;
    c.vms.push(db);
    c.vms.push(Vm::new("web", "a", 1, 2 * G, 0.5));
    c.hosts[0].state = HostState::Down;
    // Even with the HA reserve on, a restart may use it.
    let cfg = DrsConfig {
        ha_host_failures: 2,
        ..cfg()
    };
    assert_eq!(place_away(&mut c, "db", "a", &cfg).as_deref(), Ok("c"));
    // web: b is emptier than c (which got db).
    assert_eq!(place_away(&mut c, "web", "a", &cfg).as_deref(), Ok("b"));
    // Never back where it came from; no label anywhere else → the reasons.
    let err = place_away(&mut c, "db", "c", &cfg).unwrap_err();
    assert!(err.contains("b: lacks label ssd"), "{err}");
    assert!(!err.contains("c:"), "{err}");
}

/// Caps of a host running `models` and machine `pc-q35-10.0`.
fn caps(models: &[&str]) -> Option<std::sync::Arc<ferry_types::HostCaps>> {
    Some(std::sync::Arc::new(ferry_types::HostCaps {
        arch: "x86_64".into(),
        accel: "kvm".into(),
        qemu: "10.0.2".into(),
        cpu_models: models.iter().map(|m| m.to_string()).collect(),
        machines: vec!["pc-q35-10.0".into()],
        others: vec![],
        features: vec![],
    }))
}

#[test]
fn only_hosts_that_run_the_vms_architecture_take_it() {
    let mut c = three();
    let mut with_arm = caps(&["x86-64-v2-AES"]).unwrap();
    std::sync::Arc::make_mut(&mut with_arm).others = vec![ferry_types::HostCaps {
        arch: "aarch64".into(),
        accel: "tcg".into(),
        qemu: "10.0.2".into(),
        cpu_models: vec!["cortex-a72".into(), "max".into()],
        machines: vec!["virt-10.0".into()],
        others: vec![],
        features: vec![],
    }];
    c.hosts[0].caps = Some(with_arm);
    c.hosts[1].caps = caps(&["x86-64-v2-AES"]);
    // c says nothing: an x86_64 VM is not checked there, another arch is refused
    let mut arm = Vm::new("arm", "", 1, G, 0.1);
    arm.arch = ferry_types::Arch::Aarch64;
    arm.cpu_model = Some("cortex-a72".into());
    arm.machine = Some("virt-10.0".into());
    let r = place(&c, &arm, &cfg());
    assert_eq!(r.host.as_deref(), Some("a"), "{r:?}");
    let why = |h: &str| {
        r.hosts
            .iter()
            .find(|x| x.host == h)
            .unwrap()
            .reasons
            .join("; ")
    };
    assert!(
        why("b").contains("cannot run aarch64 guests"),
        "{}",
        why("b")
    );
    assert!(
        why("c").contains("did not say whether it runs aarch64"),
        "{}",
        why("c")
    );
    // an unknown model of that arch is refused like any other
    arm.cpu_model = Some("cortex-a999".into());
    assert!(place(&c, &arm, &cfg()).host.is_none());
    // HA restarts and evacuations too
    arm.cpu_model = Some("cortex-a72".into());
    arm.host = "b".into();
    arm.ha = true;
    c.vms.push(arm);
    c.hosts[1].state = HostState::Down;
    assert_eq!(
        place_away(&mut c.clone(), "arm", "b", &cfg()).as_deref(),
        Ok("a")
    );
    c.hosts[0].state = HostState::Down;
    assert!(place_away(&mut c, "arm", "b", &cfg()).is_err());
}

#[test]
fn hosts_that_cannot_run_the_cpu_or_machine_take_nothing_restarts_and_balance_included() {
    let mut c = three();
    c.hosts[0].caps = caps(&["x86-64-v2-AES", "x86-64-v3"]);
    c.hosts[1].caps = caps(&["x86-64-v2-AES"]);
    // c publishes nothing (an earlier release): not checked
    let mut v3 = Vm::new("v3", "", 1, G, 0.1);
    v3.cpu_model = Some("x86-64-v3".into());
    v3.machine = Some("pc-q35-10.0".into());
    let r = place(&c, &v3, &cfg());
    let b = r.hosts.iter().find(|h| h.host == "b").unwrap();
    assert!(!b.eligible);
    assert_eq!(b.reasons, ["cannot run CPU model x86-64-v3"]);
    let mut old_machine = v3.clone();
    old_machine.cpu_model = Some("x86-64-v2-AES".into());
    old_machine.machine = Some("pc-q35-8.0".into());
    let r = place(&c, &old_machine, &cfg());
    assert_eq!(r.host.as_deref(), Some("c"), "{r:?}");
    assert!(
        r.hosts[0].reasons[0].contains("lacks machine type pc-q35-8.0"),
        "{r:?}"
    );

    // An HA restart away from a goes to c (b cannot run it) and nowhere when c is down.
    v3.host = "a".into();
    v3.ha = true;
    c.vms.push(v3);
    c.hosts[0].state = HostState::Down;
    let mut with_c = c.clone();
    assert_eq!(
        place_away(&mut with_c, "v3", "a", &cfg()).as_deref(),
        Ok("c")
    );
    c.hosts[2].state = HostState::Down;
    let err = place_away(&mut c, "v3", "a", &cfg()).unwrap_err();
    assert!(err.contains("b: cannot run CPU model x86-64-v3"), "{err}");

    // Balancing never moves a VM to a host that cannot run it, however loaded.
    let mut c = three();
    c.hosts[1].caps = caps(&["x86-64-v2-AES"]);
    c.hosts[2].caps = caps(&["x86-64-v2-AES"]);
    for i in 0..6 {
        let mut v = Vm::new(&format!("v{i}"), "a", 1, G, 0.5);
        v.cpu_model = Some(if i < 3 { "x86-64-v3" } else { "x86-64-v2-AES" }.into());
        c.vms.push(v);
    }
    let plan = balance(&c, &cfg(), &BTreeSet::new(), Tuning::default());
    assert!(!plan.moves.is_empty(), "{plan:?}");
    for m in &plan.moves {
        let v = c.vms.iter().find(|v| v.name == m.vm).unwrap();
        assert_eq!(v.cpu_model.as_deref(), Some("x86-64-v2-AES"), "{m:?}");
    }
}

#[test]
fn affinity_keeps_a_group_together() {
    let mut c = three();
    let mut w = Vm::new("web", "b", 1, G, 0.1);
    w.rules.affinity = Some("app".into());
    c.vms.push(w);
    let mut db = Vm::new("db", "", 1, G, 0.1);
    db.rules.affinity = Some("app".into());
    assert_eq!(place(&c, &db, &cfg()).host.as_deref(), Some("b"));
}

#[test]
fn balance_spreads_a_loaded_host_and_stops() {
    let mut c = three();
    for i in 0..6 {
        c.vms.push(Vm::new(&format!("v{i}"), "a", 1, G, 0.5));
    }
    let cfg = cfg();
    let plan = balance(&c, &cfg, &BTreeSet::new(), Tuning::default());
    assert!(plan.score_before > 0.3, "{plan:?}");
    assert_eq!(plan.moves.len(), 4, "{plan:?}");
    let after = replay(&c, &plan, &cfg);
    assert!(score(&after, &cfg) < 1e-9);
    assert!((plan.score_after - score(&after, &cfg)).abs() < 1e-9);
    // Balanced now: a second plan moves nothing (no ping-pong).
    let again = balance(&after, &cfg, &BTreeSet::new(), Tuning::default());
    assert!(again.moves.is_empty(), "{again:?}");
}

#[test]
fn level_one_and_frozen_and_pinned_vms_stay() {
    let mut c = three();
    for i in 0..4 {
        c.vms.push(Vm::new(&format!("v{i}"), "a", 1, G, 0.5));
    }
    let lvl1 = DrsConfig { level: 1, ..cfg() };
    assert!(balance(&c, &lvl1, &BTreeSet::new(), Tuning::default())
        .moves
        .is_empty());
    c.vms[0].rules.pinned = true;
    c.vms[1].movable = false;
    let frozen: BTreeSet<String> = ["v2".to_string()].into();
    let plan = balance(&c, &cfg(), &frozen, Tuning::default());
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    assert_eq!(plan.moves[0].vm, "v3");
}

#[test]
fn rule_fix_moves_an_anti_affine_vm_away() {
    let mut c = three();
    for n in ["db1", "db2"] {
        let mut v = Vm::new(n, "a", 1, G, 0.1);
        v.rules.anti_affinity = vec!["db".into()];
        c.vms.push(v);
    }
    let cfg = DrsConfig { level: 1, ..cfg() };
    let plan = balance(&c, &cfg, &BTreeSet::new(), Tuning::default());
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    assert_eq!(plan.moves[0].vm, "db1");
    assert!(plan.moves[0].reason.contains("anti-affinity group db"));
}

#[test]
fn ha_reserve_blocks_starts_and_moves() {
    let mut c = three();
    // 6 GiB of HA VMs on each of a and b, c empty: losing a or b needs c's 8 GiB.
    for (n, h) in [("a1", "a"), ("b1", "b")] {
        let mut v = Vm::new(n, h, 1, 6 * G, 0.1);
        v.ha = true;
        c.vms.push(v);
    }
    assert!(admission::failover_ok(&c, 1).is_ok());
    assert!(admission::failover_ok(&c, 2).is_err());
    let cfg = DrsConfig {
        ha_host_failures: 1,
        ..cfg()
    };
    // A 4 GiB VM on c would leave no room for a's or b's.
    let big = Vm::new("big", "", 1, 4 * G, 0.1);
    let r = place(&c, &big, &cfg);
    assert_eq!(r.host, None, "{r:?}");
    let why = r
        .hosts
        .iter()
        .find(|h| h.host == "c")
        .unwrap()
        .reasons
        .join(";");
    assert!(why.contains("HA admission control"), "{why}");
    // Without the reserve it goes to c.
    assert_eq!(
        place(&c, &big, &DrsConfig::default()).host.as_deref(),
        Some("c")
    );
}

#[test]
fn pools_limits_and_reservations() {
    let pool = |name: &str, parent: Option<&str>, res: u64, limit: Option<u64>| ResourcePool {
        name: name.into(),
        parent: parent.map(Into::into),
        cpu: Allocation::default(),
        memory: Allocation {
            reservation: res as f64,
            limit: limit.map(|l| l as f64),
            shares: 1000,
        },
    };
    let pools = vec![
        pool("prod", None, 12 * G, None),
        pool("web", Some("prod"), 4 * G, Some(3 * G)),
        pool("test", None, 0, Some(2 * G)),
    ];
    assert!(pools::check(&pools, 12.0, 24 * G).is_ok());
    assert!(pools::check(&pools, 12.0, 8 * G)
        .unwrap_err()
        .contains("reserve 12288 MiB"));
    let mut bad = pools.clone();
    bad[1].parent = Some("nope".into());
    assert!(pools::check(&bad, 12.0, 24 * G)
        .unwrap_err()
        .contains("nope"));

    let mut c = three();
    let mut w1 = Vm::new("w1", "a", 1, 2 * G, 0.1);
    w1.pool = Some("web".into());
    c.vms.push(w1);
    let mut w2 = Vm::new("w2", "", 1, 2 * G, 0.1);
    w2.pool = Some("web".into());
    assert!(pools::admit(&pools, &c, &w2)
        .unwrap_err()
        .contains("resource pool web"));
    // Outside any pool: 24 GiB − 12 GiB reserved by prod − 0 by test = 12 GiB.
    let free = Vm::new("f", "", 1, 12 * G, 0.1);
    assert!(pools::admit(&pools, &c, &free).is_ok());
    let too = Vm::new("f", "", 1, 12 * G + 512 * M, 0.1);
    assert!(pools::admit(&pools, &c, &too)
        .unwrap_err()
        .contains("reserved"));
    // Inside prod the reservation is prod's own: 10 GiB more still fit in it.
    let mut p = Vm::new("p", "", 1, 10 * G, 0.1);
    p.pool = Some("prod".into());
    assert!(pools::admit(&pools, &c, &p).is_ok());

    let l = pools::cgroup_limits(&ResourcePool {
        cpu: Allocation {
            reservation: 0.0,
            limit: Some(1.5),
            shares: 2000,
        },
        ..pool("x", None, G, Some(2 * G))
    });
    assert_eq!(l.cpu_weight, 200);
    assert_eq!(l.cpu_max_us, Some(150_000));
    assert_eq!(l.memory_max, Some(2 * G));
    assert_eq!(l.memory_low, G);
}

#[test]
fn hbal_format_and_steps() {
    let mut c = three();
    c.vms.push(Vm::new("v1", "a", 2, 1536 * M, 0.5));
    let t = hbal::write_cluster(&c, 4.0);
    assert!(t.contains("\na|8192|0|6656|"), "{t}");
    assert!(
        t.contains("\nv1|1536|1024|2|running|Y|a||rbd||1|-\n"),
        "{t}"
    );
    // group, nodes, instances, (no tags), ipolicy
    assert_eq!(t.split("\n\n").count(), 4, "{t}");
    let u = hbal::write_utilisation(&c);
    assert_eq!(u, "v1 0.125000 0.187500 0 0\n");
    let steps = hbal::parse_steps(
        "Trying to minimize the CV...\n    1. v1 a    => b      5.43 a=fa:b\nSolution length=1\n",
    );
    assert_eq!(
        steps,
        vec![hbal::Step {
            vm: "v1".into(),
            from: "a".into(),
            to: "b".into()
        }]
    );
    assert_eq!(hbal::apply(&c, &steps).vms[0].host, "b");
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    (
        2usize..8,
        prop::collection::vec((0usize..8, 1u32..4, 1u64..9, 0u32..100, 0u8..4), 0..40),
    )
        .prop_map(|(nh, vms)| {
            let hosts = (0..nh)
                .map(|i| Host::new(&format!("h{i}"), 8.0, 16 * G))
                .collect::<Vec<_>>();
            let mut c = Cluster { hosts, vms: vec![] };
            let mut used = vec![0u64; nh];
            for (i, (h, vcpus, mem, load, grp)) in vms.into_iter().enumerate() {
                let h = h % nh;
                let mem = mem * 512 * M;
                if used[h] + mem > 16 * G {
                    continue;
                }
                used[h] += mem;
                let mut v = Vm::new(
                    &format!("v{i}"),
                    &format!("h{h}"),
                    vcpus,
                    mem,
                    load as f64 / 100.0,
                );
                if grp == 0 {
                    v.rules.anti_affinity = vec![format!("g{i}")];
                }
                c.vms.push(v);
            }
            c
        })
}

proptest! {
    #[test]
    fn plans_never_oversubscribe_and_never_worsen(c in arb_cluster(), level in 1u8..6) {
        let cfg = DrsConfig { level, ..DrsConfig::default() };
        let frozen: BTreeSet<String> = c.vms.iter().take(2).map(|v| v.name.clone()).collect();
        let plan = balance(&c, &cfg, &frozen, Tuning::default());
        let after = replay(&c, &plan, &cfg);
        let mut seen = BTreeSet::new();
        for m in &plan.moves {
            prop_assert!(seen.insert(m.vm.clone()), "{} moved twice", m.vm);
            prop_assert!(!frozen.contains(&m.vm));
        }
        if plan.moves.iter().all(|m| !m.reason.starts_with("rule")) {
            prop_assert!(score(&after, &cfg) <= plan.score_before + 1e-9);
        }
        prop_assert!((plan.score_after - score(&after, &cfg)).abs() < 1e-6);
        prop_assert!(plan.moves.len() <= cfg.max_plan_moves as usize);
        // Deterministic.
        prop_assert_eq!(plan, balance(&c, &cfg, &frozen, Tuning::default()));
    }

    #[test]
    fn placement_only_picks_eligible_hosts(c in arb_cluster(), mem in 1u64..20) {
        let vm = Vm::new("new", "", 1, mem * G, 0.2);
        let r = place(&c, &vm, &DrsConfig::default());
        match &r.host {
            Some(h) => {
                let v = r.hosts.iter().find(|x| &x.host == h).unwrap();
                prop_assert!(v.eligible && v.memory_free_bytes >= vm.memory_bytes);
            }
            None => prop_assert!(r.hosts.iter().all(|x| !x.eligible)),
        }
    }
}

/// Pool admission as it was computed before usage sums: every VM walked per pool.
fn admit_model(pools: &[ResourcePool], c: &Cluster, vm: &Vm) -> Result<(), String> {
    let used = |pool: &str| -> u64 {
        c.vms
            .iter()
            .filter(|v| v.running && v.name != vm.name)
            .filter(|v| {
                v.pool.as_deref().is_some_and(|p| {
                    pools::chain(pools, p).is_ok_and(|ch| ch.iter().any(|q| q.name == pool))
                })
            })
            .map(|v| v.memory_bytes)
            .sum()
    };
    let mem = vm.memory_bytes;
    let chain = match &vm.pool {
        Some(p) => pools::chain(pools, p)?,
        None => vec![],
    };
    for p in &chain {
        if let Some(limit) = p.memory.limit {
            if (used(&p.name) + mem) as f64 > limit {
                return Err("limit".into());
            }
        }
    }
    let total: u64 = c
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Online)
        .map(|h| h.memory_bytes)
        .sum();
    let mut held = 0u64;
    for p in pools.iter().filter(|p| p.parent.is_none()) {
        held += ferry_types::whole(p.memory.reservation).max(used(&p.name));
    }
    held += c
        .vms
        .iter()
        .filter(|v| v.running && v.name != vm.name && v.pool.is_none())
        .map(|v| v.memory_bytes)
        .sum::<u64>();
    let adds = match chain.first() {
        Some(t) => {
            let (u, r) = (used(&t.name), ferry_types::whole(t.memory.reservation));
            (u + mem).max(r) - u.max(r)
        }
        None => mem,
    };
    if held + adds > total {
        return Err("reserved".into());
    }
    Ok(())
}

fn arb_pool_cluster() -> impl Strategy<Value = (Vec<ResourcePool>, Cluster, Vm)> {
    let pool_names = [None, Some("prod"), Some("web"), Some("test"), Some("gone")];
    let vm = (0usize..5, 1u64..8, any::<bool>(), 0usize..3);
    (
        proptest::collection::vec(vm, 0..12),
        (0u64..16, 0u64..8, proptest::option::of(1u64..10)),
        (0usize..5, 1u64..8),
    )
        .prop_map(move |(vms, (prod_res, web_res, web_limit), (p, m))| {
            let pool =
                |name: &str, parent: Option<&str>, res: u64, limit: Option<u64>| ResourcePool {
                    name: name.into(),
                    parent: parent.map(String::from),
                    cpu: Allocation {
                        reservation: 0.0,
                        limit: None,
                        shares: 1000,
                    },
                    memory: Allocation {
                        reservation: (res * G) as f64,
                        limit: limit.map(|l| (l * G) as f64),
                        shares: 1000,
                    },
                };
            let pools = vec![
                pool("prod", None, prod_res, None),
                pool("web", Some("prod"), web_res.min(prod_res), web_limit),
                pool("test", None, 0, Some(4 * G)),
            ];
            let mut c = three();
            for (i, (pi, mem, running, h)) in vms.into_iter().enumerate() {
                let mut v = Vm::new(&format!("v{i}"), ["a", "b", "c"][h], 1, mem * G, 0.0);
                v.running = running;
                v.pool = pool_names[pi].map(String::from);
                c.vms.push(v);
            }
            let mut vm = Vm::new("v0", "", 1, m * G, 0.0);
            vm.pool = pool_names[p].map(String::from);
            (pools, c, vm)
        })
}

proptest! {
    /// Admission from usage sums decides as walking every VM did, and the usage of
    /// the hosts' parts added is the cluster's.
    #[test]
    fn pool_admission_from_sums_matches_the_walk((pools, c, vm) in arb_pool_cluster()) {
        prop_assert_eq!(pools::admit(&pools, &c, &vm).is_ok(), admit_model(&pools, &c, &vm).is_ok());
        let mut parts = pools::Usage::default();
        for h in &c.hosts {
            let mut u = pools::Usage::of_vms(c.vms.iter().filter(|v| v.host == h.name), &vm.name);
            u.online_memory = if h.state == HostState::Online { h.memory_bytes } else { 0 };
            parts.add(&u);
        }
        prop_assert_eq!(parts, pools::Usage::of(&c, &vm.name));
    }
}

#[test]
fn a_vm_needing_a_tpm_goes_only_where_swtpm_is() {
    let mut c = three();
    let mut with_tpm = caps(&["x86-64-v2-AES"]).unwrap();
    std::sync::Arc::make_mut(&mut with_tpm).features = vec!["tpm".into()];
    c.hosts[0].caps = caps(&["x86-64-v2-AES"]);
    c.hosts[1].caps = Some(with_tpm);
    c.hosts[2].caps = caps(&["x86-64-v2-AES"]);
    let mut vm = Vm::new("win", "", 1, G, 0.1);
    vm.cpu_model = Some("x86-64-v2-AES".into());
    vm.needs = vec!["tpm".into()];
    let r = place(&c, &vm, &cfg());
    assert_eq!(r.host.as_deref(), Some("b"), "{r:?}");
    let why = format!("{r:?}");
    assert!(why.contains("has no swtpm"), "{why}");
}
