//! `ferry drs status|plan|apply|config`, `ferry resource-pool ...`, `ferry vm place`.

use crate::client::Client;
use crate::{print_json, table, Global};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use ferry_types::{
    AdmissionMode, Allocation, ByteSize, DrsConfig, DrsMode, DrsMove, DrsPlan, DrsStatus,
    PlacementPolicy, PlacementReport, ResourcePool,
};
use reqwest::Method;
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum DrsCmd {
    /// Settings, the last plan, moves under way, HA admission control.
    Status,
    /// Compute a balancing plan now (nothing moves).
    Plan,
    /// Compute a plan and start its live migrations (within the limits).
    Apply,
    /// Show or change the settings.
    Config(Box<DrsConfigArgs>),
}

#[derive(Args, Debug, Clone, Default)]
pub struct DrsConfigArgs {
    /// off, manual (recommendations only) or automatic.
    #[arg(long)]
    mode: Option<DrsMode>,
    /// Migration threshold 1 (only rule fixes) to 5 (moves for small gains).
    #[arg(long)]
    level: Option<u8>,
    /// Placement: spread (most free resources) or pack.
    #[arg(long)]
    policy: Option<PlacementPolicy>,
    /// Seconds between balancing rounds.
    #[arg(long)]
    interval: Option<u64>,
    /// Seconds over which measured CPU load is averaged.
    #[arg(long)]
    window: Option<u64>,
    /// Seconds before DRS moves a VM again.
    #[arg(long)]
    hysteresis: Option<u64>,
    /// Concurrent DRS migrations per host.
    #[arg(long)]
    max_moves_per_host: Option<u32>,
    /// Concurrent DRS migrations in the cluster.
    #[arg(long)]
    max_moves_cluster: Option<u32>,
    /// Moves in one plan at most.
    #[arg(long)]
    max_plan_moves: Option<u32>,
    /// Weight of CPU imbalance.
    #[arg(long)]
    cpu_weight: Option<f64>,
    /// Weight of memory imbalance.
    #[arg(long)]
    memory_weight: Option<f64>,
    /// vCPUs per host core at most.
    #[arg(long)]
    max_vcpu_ratio: Option<f64>,
    /// HA admission control: keep room for this many host failures (0: off).
    #[arg(long)]
    ha_host_failures: Option<u32>,
    /// What a start breaking HA admission control gets: strict (refused) or warn.
    #[arg(long)]
    admission: Option<AdmissionMode>,
}

#[derive(Subcommand, Debug)]
pub enum RpoolCmd {
    /// List resource pools.
    List,
    /// Show one.
    Show { name: String },
    /// Create one.
    Create {
        name: String,
        #[command(flatten)]
        args: RpoolArgs,
    },
    /// Change one (given options replace).
    Set {
        name: String,
        #[command(flatten)]
        args: RpoolArgs,
    },
    /// Delete one (no sub-pools, no VMs).
    Delete { name: String },
}

#[derive(Args, Debug, Clone, Default)]
pub struct RpoolArgs {
    /// The parent pool; empty: top level.
    #[arg(long)]
    parent: Option<String>,
    /// CPU reserved for the pool, in cores.
    #[arg(long)]
    cpu_reservation: Option<f64>,
    /// CPU limit in cores; 0: unlimited.
    #[arg(long)]
    cpu_limit: Option<f64>,
    /// CPU shares against sibling pools (low 500, normal 1000, high 2000).
    #[arg(long)]
    cpu_shares: Option<u32>,
    /// Memory reserved for the pool, e.g. 4G.
    #[arg(long)]
    memory_reservation: Option<ByteSize>,
    /// Memory limit, e.g. 8G; 0: unlimited.
    #[arg(long)]
    memory_limit: Option<ByteSize>,
    /// Memory shares against sibling pools.
    #[arg(long)]
    memory_shares: Option<u32>,
}

impl RpoolArgs {
    /// Applies the options given to pool `p`.
    fn apply(&self, p: &mut ResourcePool) {
        if let Some(x) = &self.parent {
            p.parent = (!x.is_empty()).then(|| x.clone());
        }
        if let Some(r) = self.cpu_reservation {
            p.cpu.reservation = r;
        }
        if let Some(l) = self.cpu_limit {
            p.cpu.limit = (l != 0.0).then_some(l);
        }
        if let Some(n) = self.cpu_shares {
            p.cpu.shares = n;
        }
        if let Some(b) = self.memory_reservation {
            p.memory.reservation = b.0 as f64;
        }
        if let Some(l) = self.memory_limit {
            p.memory.limit = (l.0 != 0).then_some(l.0 as f64);
        }
        if let Some(n) = self.memory_shares {
            p.memory.shares = n;
        }
    }
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn print_moves(moves: &[DrsMove]) {
    let mut t = table(&["VM", "FROM", "TO", "MEMORY", "SCORE AFTER", "REASON"]);
    for m in moves {
        t.add_row(vec![
            m.vm.clone(),
            m.from.clone(),
            m.to.clone(),
            format!("{} MiB", m.memory_bytes >> 20),
            format!("{:.4}", m.score_after),
            m.reason.clone(),
        ]);
    }
    println!("{t}");
}

fn print_plan(p: &DrsPlan) {
    let mut t = table(&["HOST", "VMS", "MEMORY", "CPU LOAD"]);
    for h in &p.hosts {
        t.add_row(vec![
            h.host.clone(),
            h.vms.to_string(),
            format!("{} of {}", gib(h.memory_used_bytes), gib(h.memory_bytes)),
            format!("{:.2} of {} cores", h.cpu_load, h.cpus),
        ]);
    }
    println!("{t}");
    println!(
        "imbalance {:.4} → {:.4} with {} moves",
        p.score_before,
        p.score_after,
        p.moves.len()
    );
    if !p.moves.is_empty() {
        print_moves(&p.moves);
    }
}

pub fn print_placement(g: &Global, r: &PlacementReport, explain: bool) -> Result<()> {
    if g.json {
        return print_json(r);
    }
    match &r.host {
        Some(h) => println!("{}: {h} ({:?} policy)", r.vm, r.policy),
        None => println!("{}: no host can take it", r.vm),
    }
    if explain || r.host.is_none() {
        let mut t = table(&[
            "HOST",
            "ELIGIBLE",
            "SCORE",
            "FREE MEMORY",
            "CPU LOAD",
            "WHY NOT",
        ]);
        for h in &r.hosts {
            t.add_row(vec![
                h.host.clone(),
                if h.eligible { "yes" } else { "no" }.into(),
                h.score.map_or("-".into(), |s| format!("{s:.4}")),
                format!("{} MiB", h.memory_free_bytes >> 20),
                format!("{:.2} of {}", h.cpu_load, h.cpus),
                h.reasons.join("; "),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

pub async fn run(c: &Client, g: &Global, cmd: DrsCmd) -> Result<()> {
    match cmd {
        DrsCmd::Status => {
            let s: DrsStatus = c.get("/api/v1/drs").await?;
            if g.json {
                return print_json(&s);
            }
            println!(
                "DRS {:?}, level {}, every {} s; manager: {}; HA admission control: {}",
                s.config.mode,
                s.config.level,
                s.config.interval_s,
                s.manager.as_deref().unwrap_or("none"),
                s.admission
            );
            if !s.in_flight.is_empty() {
                println!("moving now:");
                print_moves(&s.in_flight);
            }
            match &s.plan {
                Some(p) => print_plan(p),
                None => println!("no plan yet"),
            }
            Ok(())
        }
        DrsCmd::Plan => {
            let p: DrsPlan = c.get("/api/v1/drs/plan").await?;
            if g.json {
                return print_json(&p);
            }
            print_plan(&p);
            Ok(())
        }
        DrsCmd::Apply => {
            let m: Vec<DrsMove> = c.request(Method::POST, "/api/v1/drs/apply", None).await?;
            if g.json {
                return print_json(&m);
            }
            if m.is_empty() {
                println!("nothing to move");
            } else {
                println!("started {} live migrations:", m.len());
                print_moves(&m);
            }
            Ok(())
        }
        DrsCmd::Config(a) => {
            let cur: DrsConfig = c.get("/api/v1/drs/config").await?;
            let mut v = cur.clone();
            fn set<T>(field: &mut T, x: Option<T>) {
                if let Some(x) = x {
                    *field = x;
                }
            }
            set(&mut v.mode, a.mode);
            set(&mut v.policy, a.policy);
            set(&mut v.admission, a.admission);
            set(&mut v.level, a.level);
            set(&mut v.interval_s, a.interval);
            set(&mut v.window_s, a.window);
            set(&mut v.hysteresis_s, a.hysteresis);
            set(&mut v.max_moves_per_host, a.max_moves_per_host);
            set(&mut v.max_moves_cluster, a.max_moves_cluster);
            set(&mut v.max_plan_moves, a.max_plan_moves);
            set(&mut v.cpu_weight, a.cpu_weight);
            set(&mut v.memory_weight, a.memory_weight);
            set(&mut v.max_vcpu_ratio, a.max_vcpu_ratio);
            set(&mut v.ha_host_failures, a.ha_host_failures);
            let new: DrsConfig = if v != cur {
                c.send(Method::PUT, "/api/v1/drs/config", &v).await?
            } else {
                cur
            };
            if g.json {
                return print_json(&new);
            }
            println!("{}", serde_json::to_string_pretty(&new)?);
            Ok(())
        }
    }
}

pub async fn run_rpool(c: &Client, g: &Global, cmd: RpoolCmd) -> Result<()> {
    match cmd {
        RpoolCmd::List => {
            let ps: Vec<ResourcePool> = c.get("/api/v1/resource-pools").await?;
            if g.json {
                return print_json(&ps);
            }
            let mut t = table(&[
                "POOL",
                "PARENT",
                "CPU res/limit/shares",
                "MEMORY res/limit/shares",
            ]);
            for p in ps {
                let lim = |l: Option<f64>, f: &dyn Fn(f64) -> String| l.map_or("-".into(), f);
                t.add_row(vec![
                    p.name.clone(),
                    p.parent.clone().unwrap_or_default(),
                    format!(
                        "{} / {} / {}",
                        p.cpu.reservation,
                        lim(p.cpu.limit, &|x| x.to_string()),
                        p.cpu.shares
                    ),
                    format!(
                        "{} / {} / {}",
                        gib(ferry_types::whole(p.memory.reservation)),
                        lim(p.memory.limit, &|x| gib(ferry_types::whole(x))),
                        p.memory.shares
                    ),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        RpoolCmd::Show { name } => {
            let p: ResourcePool = c.get(&format!("/api/v1/resource-pools/{name}")).await?;
            print_json(&p)
        }
        RpoolCmd::Create { name, args } => {
            let mut body = ResourcePool {
                name,
                parent: None,
                cpu: Allocation::default(),
                memory: Allocation::default(),
            };
            args.apply(&mut body);
            let p: ResourcePool = c
                .send(Method::POST, "/api/v1/resource-pools", &body)
                .await?;
            if g.json {
                return print_json(&p);
            }
            println!("resource pool {} created", p.name);
            Ok(())
        }
        RpoolCmd::Set { name, args } => {
            let cur: ResourcePool = c.get(&format!("/api/v1/resource-pools/{name}")).await?;
            let mut body = cur.clone();
            args.apply(&mut body);
            if body == cur {
                bail!("nothing to change: give --cpu-limit, --memory-limit, ...");
            }
            let p: ResourcePool = c
                .send(
                    Method::PUT,
                    &format!("/api/v1/resource-pools/{name}"),
                    &body,
                )
                .await?;
            if g.json {
                return print_json(&p);
            }
            println!("resource pool {} changed", p.name);
            Ok(())
        }
        RpoolCmd::Delete { name } => {
            c.request::<Value>(
                Method::DELETE,
                &format!("/api/v1/resource-pools/{name}"),
                None,
            )
            .await?;
            println!("resource pool {name} deleted");
            Ok(())
        }
    }
}
