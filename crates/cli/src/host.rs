//! `ferry host ...`: the daemon's host, the cluster's hosts, maintenance.

use super::*;
use ferry_types::MigrationDirection;

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Facts about the daemon's host (the default).
    Show,
    /// The daemon's background tasks (lease, HA, DRS, revocation list, ...): last
    /// run, last error, next run; and the migrations in flight, both ways.
    Status,
    /// The hosts of the cluster.
    List,
    /// Maintenance mode: move every running VM away (live), take no new ones.
    Maintenance {
        /// The host (default: the daemon's).
        host: Option<String>,
    },
    /// End maintenance mode.
    Activate { host: Option<String> },
    /// Bring every VM of the daemon's host down as its startup policy says (ACPI
    /// shutdown or suspend), in reverse startup order; no VM starts there afterwards
    /// until start-all or the next boot. The host's shutdown runs this
    /// (ferry-guests.service).
    StopAll,
    /// What the host's boot starts, in startup order: VMs its shutdown suspended, HA
    /// VMs that ran then, autostart VMs; starts are allowed again.
    StartAll,
}

/// The client of host `name` of the cluster (`None`: the daemon's own).
pub(crate) async fn host_client(c: &Client, name: Option<&str>) -> Result<Client> {
    let Some(name) = name else {
        return Ok(c.clone());
    };
    let hosts: Vec<ClusterHost> = c.get("/api/v1/cluster/hosts").await?;
    hosts
        .iter()
        .find(|h| h.name == name)
        .map(|h| c.at_node(&h.name))
        .with_context(|| {
            format!(
                "no host {name} in the cluster (hosts: {})",
                hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

pub(crate) async fn host(c: &Client, g: &Global, cmd: HostCmd) -> Result<()> {
    match cmd {
        HostCmd::Show => {
            let h: HostInfo = c.get("/api/v1/host").await?;
            if g.json {
                return print_json(&h);
            }
            println!(
                "{} ({}): {} CPUs, {} memory ({} available), accel {}, {}; {} of {} VMs running{}",
                h.name,
                h.hostname,
                h.cpus,
                ByteSize(h.memory_bytes),
                ByteSize(h.memory_available_bytes),
                h.accel,
                h.qemu_version,
                h.vms_running,
                h.vms_defined,
                if h.maintenance {
                    "; IN MAINTENANCE"
                } else {
                    ""
                }
            );
            print_caps(h.caps.as_ref());
            Ok(())
        }
        HostCmd::Status => {
            let h: HostInfo = c.get("/api/v1/host").await?;
            if g.json {
                // (the whole host, units and ports included: `ferry host show --json`)
                return print_json(&h.background);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let ago = |t: Option<u64>| {
                t.map_or("-".to_string(), |t| {
                    format!("{:.1} s ago", now.saturating_sub(t) as f64 / 1000.0)
                })
            };
            let mut t = table(&[
                "TASK",
                "EVERY",
                "RUNS",
                "FAILED",
                "LAST RUN",
                "LAST OK",
                "LAST ERROR",
            ]);
            for b in h.background {
                t.add_row(vec![
                    b.name,
                    format!("{:.1} s", b.every_ms as f64 / 1000.0),
                    b.runs.to_string(),
                    b.failures.to_string(),
                    ago(b.last_run_ms),
                    ago(b.last_ok_ms),
                    match (b.last_error, b.last_error_ms) {
                        (Some(e), at) => format!("{e} ({})", ago(at)),
                        _ => "-".into(),
                    },
                ]);
            }
            println!(
                "{}: ferry {}, accel {}, {}; {} of {} VMs running{}",
                h.name,
                h.version,
                h.accel,
                h.qemu_version,
                h.vms_running,
                h.vms_defined,
                if h.shutting_down {
                    "; VMS BROUGHT DOWN FOR SHUTDOWN (no starts until start-all or boot)"
                } else {
                    ""
                }
            );
            println!("processes and resource pools: {}", h.cgroups);
            print_caps(h.caps.as_ref());
            if !h.units.is_empty() {
                let mut u = table(&["UNIT", "ACTIVE", "SUB"]);
                for x in &h.units {
                    u.add_row(vec![x.unit.clone(), x.active.clone(), x.sub.clone()]);
                }
                println!("{u}");
            }
            let mut p = table(&["PORT (TCP)", "USED BY"]);
            for x in &h.ports {
                p.add_row(vec![x.port.clone(), x.what.clone()]);
            }
            println!("{p}");
            println!("{t}");
            if !h.migrations.is_empty() {
                let mut m = table(&["MIGRATION", "WAY", "HOST", "PHASE", "SINCE"]);
                for x in h.migrations {
                    let (way, peer) = match x.direction {
                        MigrationDirection::Outgoing => ("to", x.peer),
                        MigrationDirection::Incoming => ("from", x.peer),
                    };
                    m.add_row(vec![
                        x.vm,
                        way.into(),
                        peer,
                        serde_json::to_value(x.phase)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                        ago(Some(x.since_ms)),
                    ]);
                }
                println!("{m}");
            }
            Ok(())
        }
        HostCmd::List => {
            let hosts: Vec<ClusterHost> = c.get("/api/v1/cluster/hosts").await?;
            let mut rows = vec![];
            for h in &hosts {
                let info: Result<HostInfo> = c.at_node(&h.name).get("/api/v1/host").await;
                rows.push((h.clone(), info.ok()));
            }
            if g.json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|(h, i)| json!({"host": h, "info": i}))
                    .collect();
                return print_json(&v);
            }
            let mut t = table(&["HOST", "ADDRESS", "STATE", "VMS", "VM MEMORY", "AVAILABLE"]);
            for (h, i) in rows {
                match i {
                    Some(i) => t.add_row(vec![
                        h.name,
                        h.address,
                        if i.maintenance {
                            "maintenance"
                        } else {
                            "online"
                        }
                        .to_string(),
                        format!("{}/{}", i.vms_running, i.vms_defined),
                        ByteSize(i.vm_memory_bytes).to_string(),
                        ByteSize(i.memory_available_bytes).to_string(),
                    ]),
                    None => t.add_row(vec![h.name, h.address, "unreachable".into()]),
                };
            }
            println!("{t}");
            Ok(())
        }
        HostCmd::Maintenance { host } => {
            let hc = host_client(c, host.as_deref()).await?;
            let t: TaskAccepted = hc
                .request(Method::POST, "/api/v1/host/maintenance", None)
                .await?;
            let done = hc.wait_task(t, g.json).await?;
            if g.json {
                return print_json(&done);
            }
            for l in &done.log {
                println!("{l}");
            }
            println!("{} is in maintenance", done.target);
            Ok(())
        }
        HostCmd::StopAll | HostCmd::StartAll => {
            let path = if matches!(cmd, HostCmd::StopAll) {
                "/api/v1/host/stop-all"
            } else {
                "/api/v1/host/start-all"
            };
            // At the host's shutdown the daemon may be restarting: ask for a minute.
            let mut tries = 0;
            let t: TaskAccepted = loop {
                match c.request(Method::POST, path, None).await {
                    Ok(t) => break t,
                    Err(e)
                        if tries < 60
                            && format!("{e:#}").contains("Cannot reach the ferry daemon") =>
                    {
                        if tries == 0 {
                            eprintln!("ferry: {e:#}; retrying for a minute");
                        }
                        tries += 1;
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let done = c.wait_task(t, g.json).await?;
            let report: ferry_types::HostPowerReport = serde_json::from_value(
                done.result
                    .clone()
                    .with_context(|| format!("task {} ended without its report", done.id))?,
            )
            .with_context(|| format!("task {}: not a host power report", done.id))?;
            if g.json {
                return print_json(&report);
            }
            for s in &report.steps {
                println!("{:<24} {:<9} {}", s.vm, s.action, s.detail);
            }
            let failed = report.steps.iter().filter(|s| s.action == "failed").count();
            println!("{} VMs, {failed} failed", report.steps.len());
            if failed > 0 {
                anyhow::bail!("{failed} VMs failed");
            }
            Ok(())
        }
        HostCmd::Activate { host } => {
            let hc = host_client(c, host.as_deref()).await?;
            hc.request::<Value>(Method::POST, "/api/v1/host/activate", None)
                .await?;
            println!("{} active", host.unwrap_or_else(|| "host".into()));
            Ok(())
        }
    }
}

/// What a host can run: its CPU models and newest machine types.
fn print_caps(caps: Option<&ferry_types::HostCaps>) {
    match caps {
        None => println!("CPU models: unknown (its QEMU could not be asked)"),
        Some(c) => {
            println!("CPU models ({}): {}", c.arch, c.cpu_models.join(" "));
            let newest: Vec<String> = [ferry_types::Machine::Pc, ferry_types::Machine::Q35]
                .iter()
                .filter_map(|m| {
                    c.latest_machine_version(*m)
                        .map(|v| ferry_types::cpu::machine_type(*m, Some(&v)))
                })
                .collect();
            println!(
                "machine types: newest {} ({} versions in all, QEMU {})",
                newest.join(", "),
                c.machines.len(),
                c.qemu
            );
            for o in &c.others {
                let virt = o
                    .latest_machine_version(ferry_types::Machine::Virt)
                    .map(|v| format!("virt-{v}"))
                    .unwrap_or_else(|| "virt".into());
                println!(
                    "emulated: {} ({}, QEMU {}, machine {virt}): CPU models {}",
                    o.arch,
                    o.accel,
                    o.qemu,
                    o.cpu_models.len()
                );
            }
        }
    }
}
