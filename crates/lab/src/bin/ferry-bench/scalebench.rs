//! `ferry-bench scale [--hosts 16,64] [--vms 1000,10000] [--running 0] [--ha-vms 200]
//! [--fail-hosts 1] [--starts 1000] [--soak-minutes 0] [--seconds 60] [--json]`: a simulated cluster against a real etcd (3 voters on loopback): H agents
//! in this process (each its own state dir, runtime state and fake machine through the
//! host seam — no QEMU), V VM records written in bulk and spread over the hosts, R of
//! them started (fake QEMUs). Then the cluster is left idle and measured:
//!
//! - `idle_etcd_writes_per_s`: revisions per second (every put, delete and successful
//!   transaction), and `idle_etcd_proposals_per_s`: raft proposals committed per second
//!   (also failed compare-and-swaps, which cost a consensus round too);
//! - `idle_etcd_write_bytes_per_s` and `etcd_db_growth_mb_per_h`: the values written,
//!   i.e. the history etcd accumulates per hour until it compacts it;
//! - `start_admission_ms`: one VM start's admission check (a DRS snapshot), median;
//!   `start_admission_before_ms` the same on the path before this host kept other
//!   hosts' DRS views and pool sums (every view derived anew, the whole snapshot
//!   walked), alternating with the first so both see the same machine;
//! - `vm_start_ms`: one VM start (admission, records, a fake QEMU), median of
//!   `--starts` (1,000) starts in a row, each host in turn starting its stopped VMs (a
//!   mass power-on); `power_on_admission_ms` the admission checks among them;
//!   `vm_start_first_tenth_ms` / `vm_start_last_tenth_ms` the medians of the first and
//!   last tenth (a cost growing with the VMs running shows as a difference), and
//!   `drs_host_views_derived_per_start` how many other hosts' DRS views a start
//!   re-derived (the others are kept between snapshots);
//! - `drs_round_s`: one DRS plan over the whole cluster;
//! - `ui_first_page_ms`: what `GET /api/v1/vms?limit=50` costs the answering host (the
//!   page chosen out of the whole cluster's VMs and written as JSON), median;
//!   `ui_search_ms` the same with `q=` matching a few VMs;
//! - `cache_sync_s`: how long a host's cluster cache takes to list and watch the
//!   cluster after its start.
//!
//! - with `--soak-minutes M`, `soak_*`: M minutes of VM starts and stops on one host
//!   with etcd's database sampled every 30 s (it must level off).
//!
//! `ferry-bench voters` prints put latency and throughput for 3, 5, 7 and 9 voters.
//!
//! Each simulated host keeps its own cluster cache (a watch per part on etcd, as a real
//! host) up to 1,000,000 host×VM pairs; beyond, the hosts of this one process share one
//! (`caches: shared`), else the copies alone would exceed this machine's memory.
//! - `host_failure_*_s`: `--fail-hosts` (1) more hosts holding `--ha-vms` (200) running
//!   HA VMs die together (their runtime ends; fake QEMUs through the host seam): when
//!   the HA manager has marked them all fenced, and when the first and last of their VMs
//!   run on other hosts (lease TTL 10 s). `--fail-hosts 16` is a rack.

use crate::{arg, arg_str};
use anyhow::{bail, Context, Result};
use ferry_store::member::{self, MemberConfig};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Three etcd voters on loopback (plain HTTP: the figures are etcd's, not TLS's),
/// killed by pid when dropped.
struct Etcd {
    _dir: tempfile::TempDir,
    pids: Vec<i32>,
    urls: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for p in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn start_etcd() -> Result<Etcd> {
    start_etcd_n(3).await
}

/// `n` etcd voters on loopback.
async fn start_etcd_n(n: usize) -> Result<Etcd> {
    let dir = tempfile::tempdir()?;
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
        .collect();
    let mut e = Etcd {
        _dir: dir,
        pids: vec![],
        urls: vec![],
    };
    let mut cfgs = vec![];
    for (i, (c, p)) in ports.iter().enumerate() {
        let d = e._dir.path().join(format!("e{i}"));
        std::fs::create_dir_all(&d)?;
        let cfg = member_config(&format!("e{i}"), &d, *c, *p, &initial.join(","));
        let pid = member::spawn("etcd", &cfg, &d.join("etcd.log"), &d.join("pid")).await?;
        e.pids.push(pid);
        e.urls.push(cfg.client_url.clone());
        cfgs.push((cfg, d));
    }
    for (cfg, d) in &cfgs {
        member::wait_healthy(
            &cfg.name,
            &cfg.client_url,
            None,
            &d.join("etcd.log"),
            Duration::from_secs(30),
        )
        .await?;
    }
    Ok(e)
}

/// A member as ferry runs it (its quota and history retention, from `member.rs`), but
/// plain HTTP.
fn member_config(name: &str, dir: &std::path::Path, c: u16, p: u16, initial: &str) -> MemberConfig {
    MemberConfig {
        name: name.into(),
        data_dir: dir.join("data"),
        client_url: format!("http://127.0.0.1:{c}"),
        peer_url: format!("http://127.0.0.1:{p}"),
        initial_cluster: initial.into(),
        new_cluster: true,
        heartbeat_ms: 100,
        election_ms: 1000,
        quota_bytes: ferry_store::health::QUOTA_BYTES,
        tls: None,
    }
}

/// etcd's own counter of raft proposals committed (scraped from its `/metrics`).
async fn proposals(url: &str) -> Result<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("etcd_server_proposals_committed_total ")
                .and_then(|v| v.trim().parse().ok())
        })
        .context("etcd_server_proposals_committed_total")
}

struct Sim {
    rt: Arc<tokio::runtime::Runtime>,
    hosts: Vec<ferry_cluster::Cluster>,
    etcd: Etcd,
    _dir: tempfile::TempDir,
    shared_cache: bool,
    /// The host that fails, on its runtime, with its HA VMs.
    victim: Option<(tokio::runtime::Runtime, Vec<ferry_cluster::Cluster>)>,
}

fn vm_spec(name: &str, id: u32) -> Result<ferry_types::VmSpec> {
    Ok(serde_json::from_value(json!({
        "name": name,
        "memory_mib": 256,
        "cpus": 1,
        "nics": [{"bridge": "br0", "mac": format!("52:47:{:02x}:{:02x}:{:02x}:{:02x}",
            id >> 24, (id >> 16) & 0xff, (id >> 8) & 0xff, id & 0xff)}],
    }))?)
}

/// H hosts on a fresh etcd, V records spread over them, R started.
fn build(hosts: usize, vms: usize, running: usize, ha_vms: usize, fail: usize) -> Result<Sim> {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    let dir = tempfile::tempdir()?;
    let etcd = rt.block_on(start_etcd())?;
    let names: Vec<String> = (0..hosts).map(|i| format!("s{i:03}")).collect();
    // The host that fails (its HA VMs restarted elsewhere): one more, on a runtime of
    // its own so that it can die alone.
    let all: Vec<String> = names.iter().cloned().chain(victims(ha_vms, fail)).collect();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(etcd.urls.clone(), None).await?;
        for n in &all {
            let m = ferry_types::ClusterHost {
                name: n.clone(),
                api: "https://127.0.0.1:8470".into(),
                address: "127.0.0.1".into(),
                cert_serial: None,
                migration_ca: None,
            };
            c.put(
                format!("/ferry{}", ferry_store::keys::cluster::member(n)),
                serde_json::to_vec(&m)?,
                None,
            )
            .await?;
        }
        // In transactions of 100 puts (etcd allows 128 operations in one).
        let mut ops = vec![];
        for i in 0..vms {
            let id = 100 + u32::try_from(i)?;
            let name = format!("vm{i:05}");
            let host = &names[i % hosts];
            let rec = ferry_host::records::VmRecord::new(id, vm_spec(&name, id)?);
            let key = format!(
                "/ferry{}",
                ferry_store::keys::cluster::of_host(host, &ferry_store::keys::host::vm(&name))
            );
            ops.push(etcd_client::TxnOp::put(
                key,
                serde_json::to_vec(&rec)?,
                None,
            ));
            if ops.len() == 100 || i + 1 == vms {
                c.txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                    .await?;
            }
        }
        c.put(
            format!("/ferry{}", ferry_store::keys::cluster::NEXT_VM_ID),
            serde_json::to_vec(&(100 + vms))?,
            None,
        )
        .await?;
        anyhow::Ok(())
    })?;
    // One cluster CA, held by the first host; the others joined with certificates it
    // signed (as `cluster join` does), so exactly one host signs revocation lists.
    let founder = ferry_pki::HostPki::ensure(
        &dir.path().join(&names[0]).join("state/pki"),
        &names[0],
        &[],
    )?;
    for n in &all[1..] {
        let (key, csr) = ferry_pki::new_request(n)?;
        let cert = founder.issue(&csr, n, &[])?;
        ferry_pki::HostPki::install(
            &dir.path().join(n).join("state/pki"),
            founder.ca_pem(),
            None,
            &cert,
            &key,
        )?;
    }
    let shared_cache = hosts.saturating_mul(vms) > 1_000_000;
    let mut first_link: Option<ferry_host::ClusterLink> = None;
    let mut sims = vec![];
    for n in &names {
        let c = rt.block_on(sim_host(
            &etcd.urls,
            &dir.path().join(n),
            n,
            &mut first_link,
            shared_cache,
        ))?;
        sims.push(c);
    }
    let victim = if ha_vms > 0 {
        let vrt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut dying = vec![];
        for n in victims(ha_vms, fail) {
            dying.push(vrt.block_on(sim_host(
                &etcd.urls,
                &dir.path().join(&n),
                &n,
                &mut first_link,
                shared_cache,
            ))?);
        }
        Some((vrt, dying))
    } else {
        None
    };
    // Every host alive (a lease) before anything is measured.
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(etcd.urls.clone(), None).await?;
        let t = Instant::now();
        loop {
            let alive = c
                .get(
                    format!("/ferry{}", ferry_store::keys::cluster::ALIVE),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await?
                .count();
            if usize::try_from(alive)? >= all.len() {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("only {alive} of {hosts} hosts got a lease");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(())
    })?;
    for i in 0..running.min(vms) {
        let name = format!("vm{i:05}");
        let h = &sims[i % hosts];
        rt.block_on(h.start_vm(&name))
            .map_err(|e| anyhow::anyhow!("start {name}: {e}"))?;
    }
    if let Some((vrt, dying)) = &victim {
        vrt.block_on(async {
            for i in 0..ha_vms {
                let v = &dying[i % dying.len()];
                let name = format!("ha{i:04}");
                let id = 1_000_000 + u32::try_from(i)?;
                let mut spec = vm_spec(&name, id)?;
                spec.memory_mib = 64;
                spec.ha = serde_json::from_value(json!({"mode": "restart"}))?;
                v.create_vm(spec)
                    .await
                    .map_err(|e| anyhow::anyhow!("create {name}: {e}"))?;
                v.start_vm(&name)
                    .await
                    .map_err(|e| anyhow::anyhow!("start {name}: {e}"))?;
            }
            anyhow::Ok(())
        })?;
    }
    Ok(Sim {
        rt,
        hosts: sims,
        etcd,
        _dir: dir,
        shared_cache,
        victim,
    })
}

/// The hosts that fail together (a rack), holding the HA VMs.
fn victims(ha_vms: usize, fail: usize) -> Vec<String> {
    if ha_vms == 0 {
        return vec![];
    }
    (0..fail.max(1)).map(|i| format!("victim{i:02}")).collect()
}

/// The hosts' lease TTL here (ferry's default).
const LEASE_TTL_S: u64 = 10;

/// Simulated host `n` on the current runtime (its own etcd connection, state dir and
/// fake machine); the first one's cache shared with the others when `shared`.
async fn sim_host(
    urls: &[String],
    dir: &std::path::Path,
    n: &str,
    first_link: &mut Option<ferry_host::ClusterLink>,
    shared: bool,
) -> Result<ferry_cluster::Cluster> {
    let cfg = ferry_types::ClusterConfig {
        name: n.to_string(),
        address: "127.0.0.1".into(),
        api: "https://127.0.0.1:8470".into(),
        endpoints: urls.to_vec(),
        managed_etcd: false,
        initial_cluster: String::new(),
        lease_ttl_s: LEASE_TTL_S,
        ca_fingerprint: String::new(),
    };
    let root = ferry_store::EtcdStore::connect(urls, "/ferry", None).await?;
    let mut link = ferry_host::ClusterLink::on_etcd(cfg, root);
    match first_link {
        Some(f) if shared => link = link.sharing_cache_of(f),
        Some(_) => {}
        None => *first_link = Some(link.clone()),
    }
    let os = ferry_host::fake::FakeOs::new(&["br0"]);
    let host = ferry_host::fake::open_member(dir, os, n, Some(link)).await?;
    Ok(ferry_cluster::Cluster::start(
        ferry_migration::Migrations::open(host).await,
    ))
}

/// The failing host dies (its runtime ends: no lease renewal, nothing of it runs); how
/// long until the HA manager marks it fenced, and until its first and last HA VM runs
/// on another host (read from etcd every 100 ms).
fn measure_host_failure(s: &mut Sim, ha_vms: usize) -> Result<Value> {
    let Some((vrt, dying)) = s.victim.take() else {
        return Ok(json!({}));
    };
    let names: Vec<String> = dying.iter().map(|d| d.host_name().to_string()).collect();
    drop(dying);
    let t0 = Instant::now();
    vrt.shutdown_background();
    s.rt.block_on(async {
        let mut c = etcd_client::Client::connect(s.etcd.urls.clone(), None).await?;
        let (mut fenced, mut first, mut last) = (None, None, None);
        let hosts: Vec<String> = s.hosts.iter().map(|h| h.host_name().to_string()).collect();
        while t0.elapsed() < Duration::from_secs(180) {
            let mut marked = 0;
            for n in names.iter().filter(|_| fenced.is_none()) {
                let mark = format!("/ferry{}", ferry_store::keys::cluster::fenced(n));
                marked += usize::from(c.get(mark, None).await?.count() > 0);
            }
            if fenced.is_none() && marked == names.len() {
                fenced = Some(t0.elapsed().as_secs_f64());
            }
            // Each surviving host's HA VM records (a range per host: the whole
            // cluster's records would not fit one reply at 50,000 VMs).
            let mut up = 0;
            for h in &hosts {
                let r = c
                    .get(
                        format!("/ferry/hosts/{h}/vms/ha"),
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await?;
                for kv in r.kvs() {
                    let rec: Value = serde_json::from_slice(kv.value())?;
                    if rec["last_state"] == "running" {
                        up += 1;
                    }
                }
            }
            if up > 0 && first.is_none() {
                first = Some(t0.elapsed().as_secs_f64());
            }
            if up >= ha_vms {
                last = Some(t0.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if last.is_none() {
            eprintln!("host failure: not every HA VM came up elsewhere within 180 s");
        }
        anyhow::Ok(json!({
            "ha_vms": ha_vms,
            "failed_hosts": names.len(),
            "lease_ttl_s": LEASE_TTL_S,
            "host_failure_fenced_s": fenced,
            "host_failure_first_vm_s": first,
            "host_failure_last_vm_s": last,
        }))
    })
}

/// The revision, raft proposals and the values written between two moments.
fn measure_idle(s: &Sim, seconds: u64) -> Result<Value> {
    s.rt.block_on(async {
        let url = &s.etcd.urls[0];
        let mut c = etcd_client::Client::connect(s.etcd.urls.clone(), None).await?;
        let rev = |r: &etcd_client::GetResponse| r.header().map_or(0, |h| h.revision());
        // Let the start settle (leases granted, first loads published).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let r0 = rev(&c.get("/ferry/none", None).await?);
        let p0 = proposals(url).await?;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let r1 = rev(&c.get("/ferry/none", None).await?);
        let p1 = proposals(url).await?;
        let dt = t0.elapsed().as_secs_f64();
        // The history of the window, replayed: what etcd keeps until it compacts.
        let mut stream = c
            .watch(
                "/",
                Some(
                    etcd_client::WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(r0 + 1),
                ),
            )
            .await?;
        let mut bytes = 0u64;
        let mut seen_to = r0;
        // Which keys are written, by kind (the key with names and numbers dropped).
        let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
        while seen_to < r1 {
            let Ok(Ok(Some(m))) =
                tokio::time::timeout(Duration::from_secs(5), stream.message()).await
            else {
                break;
            };
            for ev in m.events() {
                if let Some(kv) = ev.kv() {
                    bytes += u64::try_from(kv.key().len() + kv.value().len())?;
                    let k = String::from_utf8_lossy(kv.key());
                    let kind: Vec<&str> = k
                        .split('/')
                        .enumerate()
                        .map(|(i, p)| {
                            if i == 3 && k.starts_with("/ferry/hosts/") {
                                "*"
                            } else {
                                p
                            }
                        })
                        .take(5)
                        .collect();
                    *kinds.entry(kind.join("/")).or_default() += 1;
                    seen_to = seen_to.max(kv.mod_revision());
                }
            }
        }
        drop(stream);
        let writes = (r1 - r0) as f64 / dt;
        eprintln!("keys written while idle, by kind: {kinds:?}");
        let bps = bytes as f64 / dt;
        anyhow::Ok(json!({
            "idle_etcd_writes_per_s": writes,
            "idle_etcd_proposals_per_s": (p1 - p0) / dt,
            "idle_etcd_write_bytes_per_s": bps,
            "etcd_db_growth_mb_per_h": bps * 3600.0 / 1e6,
        }))
    })
}

/// How long the first host's cache takes to be in sync from scratch (a new link on
/// its own connection: a host starting).
fn measure_cache_sync(s: &Sim) -> Result<f64> {
    s.rt.block_on(async {
        let root = ferry_store::EtcdStore::connect(&s.etcd.urls, "/ferry", None).await?;
        let h = &s.hosts[0];
        let cfg = h.cluster().context("a cluster")?.cfg.clone();
        let link = ferry_host::ClusterLink::on_etcd(cfg, root);
        let t = Instant::now();
        if !link.cache().wait_synced(Duration::from_secs(300)).await {
            bail!("the cache did not get in sync in 300 s");
        }
        anyhow::Ok(t.elapsed().as_secs_f64())
    })
}

/// Median admission check, VM start and UI page; one DRS plan; from the first host.
fn measure_decisions(s: &Sim, vms: usize, running: usize, ha_vms: usize) -> Result<Value> {
    let h = &s.hosts[0];
    let link = h.cluster().context("a cluster")?;
    if !s
        .rt
        .block_on(link.cache().wait_synced(Duration::from_secs(300)))
    {
        bail!("host 0's cache is not in sync");
    }
    let hosts = s.hosts.len();
    // Stopped VMs of host 0 (VM i lives on host i % hosts; the first `running` run).
    let stopped: Vec<String> = (0..vms)
        .filter(|i| i % hosts == 0 && *i >= running)
        .map(|i| format!("vm{i:05}"))
        .collect();
    // Admission with other hosts' DRS views kept (now) and derived at every call (the
    // path before), alternating so both see the same machine.
    let (mut adm, mut adm_full) = (vec![], vec![]);
    for (k, name) in stopped.iter().take(10).enumerate() {
        for kept in [k % 2 == 0, k % 2 != 0] {
            h.set_drs_views_kept(kept);
            let t = Instant::now();
            let r = s.rt.block_on(h.admit_start(name));
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if kept {
                adm.push(ms)
            } else {
                adm_full.push(ms)
            }
            if let Err(e) = r {
                eprintln!("admission of {name}: {e}");
            }
        }
    }
    h.set_drs_views_kept(true);
    // A mass power-on: each host in turn starts its stopped VMs, one after the other,
    // each start with its admission check first (as the API does).
    let n_starts: usize = arg_str("--starts", "1000").parse().context("--starts")?;
    let mut starts = vec![];
    let mut admissions = vec![];
    let derived_before = s.hosts.iter().map(|h| h.drs_views_derived()).sum::<u64>();
    let order = (0..hosts).flat_map(|h| (running..vms).filter(move |i| i % hosts == h));
    for i in order.take(n_starts) {
        let (host, name) = (&s.hosts[i % hosts], format!("vm{i:05}"));
        let t = Instant::now();
        let r = s.rt.block_on(async {
            host.admit_start(&name).await?;
            let a = t.elapsed();
            host.start_vm(&name).await.map(|_| a)
        });
        starts.push(t.elapsed().as_secs_f64() * 1000.0);
        match r {
            Ok(a) => admissions.push(a.as_secs_f64() * 1000.0),
            Err(e) => eprintln!("start of {name}: {e}"),
        }
    }
    let derived = s.hosts.iter().map(|h| h.drs_views_derived()).sum::<u64>() - derived_before;
    let tenth = (starts.len() / 10).max(1);
    let first_tenth = crate::median(starts.iter().take(tenth).copied().collect());
    let last_tenth = crate::median(starts.iter().rev().take(tenth).copied().collect());
    let page = |p: ferry_types::VmListParams| -> Result<(f64, usize)> {
        let t = Instant::now();
        let page =
            s.rt.block_on(h.list_vms_page(&p))
                .map_err(|e| anyhow::anyhow!("list: {e}"))?;
        let body = serde_json::to_vec(&page.vms)?;
        std::hint::black_box(body);
        Ok((t.elapsed().as_secs_f64() * 1000.0, page.total))
    };
    let mut first = vec![];
    let mut search = vec![];
    for _ in 0..10 {
        let (ms, total) = page(ferry_types::VmListParams {
            limit: Some(50),
            ..Default::default()
        })?;
        if total != vms + ha_vms {
            eprintln!("the list counts {total} VMs of {}", vms + ha_vms);
        }
        first.push(ms);
        search.push(
            page(ferry_types::VmListParams {
                q: Some("vm0000".into()),
                limit: Some(50),
                ..Default::default()
            })?
            .0,
        );
    }
    let t = Instant::now();
    let plan = s.rt.block_on(h.drs_plan());
    let drs = t.elapsed().as_secs_f64();
    if let Err(e) = plan {
        eprintln!("drs plan: {e}");
    }
    Ok(json!({
        "start_admission_ms": crate::median(adm),
        "start_admission_before_ms": crate::median(adm_full),
        "vm_starts": starts.len(),
        "power_on_admission_ms": crate::median(admissions),
        "vm_start_first_tenth_ms": first_tenth,
        "vm_start_last_tenth_ms": last_tenth,
        "vm_start_ms": crate::median(starts),
        "drs_host_views_derived_per_start": derived as f64 / n_starts.max(1) as f64,
        "drs_round_s": drs,
        "ui_first_page_ms": crate::median(first),
        "ui_search_ms": crate::median(search),
        "caches": if s.shared_cache { "shared" } else { "own" },
    }))
}

pub(crate) fn run() -> Result<()> {
    let as_json = std::env::args().any(|a| a == "--json");
    let hosts: Vec<usize> = arg_str("--hosts", "16")
        .split(',')
        .map(|x| x.parse().context("--hosts"))
        .collect::<Result<_>>()?;
    let vms: Vec<usize> = arg_str("--vms", "1000")
        .split(',')
        .map(|x| x.parse().context("--vms"))
        .collect::<Result<_>>()?;
    let running = arg("--running", 0);
    let ha_vms = arg("--ha-vms", 200);
    let soak = u64::try_from(arg("--soak-minutes", 0))?;
    let fail = arg("--fail-hosts", 1);
    let seconds = u64::try_from(arg("--seconds", 60))?;
    let mut rows = vec![];
    for &h in &hosts {
        for &v in &vms {
            eprintln!("scale: {h} hosts, {v} VMs ({running} running), {seconds} s idle");
            let t = Instant::now();
            let mut sim = build(h, v, running, ha_vms, fail)?;
            let built = t.elapsed().as_secs_f64();
            let mut row = json!({"hosts": h, "vms": v, "running": running, "build_s": built});
            let sync = measure_cache_sync(&sim)?;
            row["cache_sync_s"] = json!(sync);
            for part in [
                measure_idle(&sim, seconds)?,
                measure_decisions(&sim, v, running, ha_vms)?,
                measure_soak(&sim, soak, v, running)?,
                measure_host_failure(&mut sim, ha_vms)?,
            ] {
                if let (Some(r), Some(p)) = (row.as_object_mut(), part.as_object()) {
                    r.extend(p.clone());
                }
            }
            // The runtime (and with it every simulated host) ends before etcd.
            let Sim {
                rt,
                hosts,
                etcd,
                _dir,
                ..
            } = sim;
            drop(hosts);
            if let Ok(rt) = Arc::try_unwrap(rt) {
                rt.shutdown_timeout(Duration::from_secs(5));
            }
            drop(etcd);
            if as_json {
                println!("{row}");
            }
            rows.push(row);
        }
    }
    if !as_json {
        let cols = [
            "hosts",
            "vms",
            "running",
            "idle_etcd_writes_per_s",
            "idle_etcd_proposals_per_s",
            "idle_etcd_write_bytes_per_s",
            "etcd_db_growth_mb_per_h",
            "start_admission_ms",
            "start_admission_before_ms",
            "vm_starts",
            "power_on_admission_ms",
            "vm_start_ms",
            "vm_start_first_tenth_ms",
            "vm_start_last_tenth_ms",
            "drs_host_views_derived_per_start",
            "drs_round_s",
            "failed_hosts",
            "host_failure_fenced_s",
            "host_failure_first_vm_s",
            "host_failure_last_vm_s",
            "ui_first_page_ms",
            "ui_search_ms",
            "cache_sync_s",
            "caches",
            "soak_db_in_use_mb_max",
            "soak_db_in_use_mb_last",
        ];
        println!("{}", cols.join("\t"));
        for r in &rows {
            let cells: Vec<String> = cols
                .iter()
                .map(|c| match &r[*c] {
                    Value::Number(n) => match n.as_f64() {
                        Some(f) if n.is_f64() => format!("{f:.3}"),
                        _ => n.to_string(),
                    },
                    Value::Null => "n/a".into(),
                    v => v.to_string(),
                })
                .collect();
            println!("{}", cells.join("\t"));
        }
    }
    Ok(())
}

/// `ferry-bench voters [--counts 3,5,7,9] [--puts 500]`: why ferry stops at 5 voters.
/// For each count, that many etcd voters on loopback (ferry's flags, plain HTTP), then
/// `--puts` puts of 1 KiB one after another (latency: every voter's fsync of the
/// leader's majority is waited for) and the same from 16 writers at once (throughput).
pub(crate) fn voters() -> Result<()> {
    let counts: Vec<usize> = arg_str("--counts", "3,5,7,9")
        .split(',')
        .map(|x| x.parse().context("--counts"))
        .collect::<Result<_>>()?;
    let puts = arg("--puts", 500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("voters\tput_p50_ms\tput_p99_ms\tputs_per_s_1_writer\tputs_per_s_16_writers\tfailures_tolerated");
    for n in counts {
        let row = rt.block_on(async {
            let e = start_etcd_n(n).await?;
            let c = etcd_client::Client::connect(e.urls.clone(), None).await?;
            let value = vec![b'x'; 1024];
            let mut lat = vec![];
            let t = Instant::now();
            for i in 0..puts {
                let t1 = Instant::now();
                c.kv_client()
                    .put(format!("/bench/{i}"), value.clone(), None)
                    .await?;
                lat.push(t1.elapsed().as_secs_f64() * 1000.0);
            }
            let one = puts as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut tasks = vec![];
            for w in 0..16 {
                let mut kv = c.kv_client();
                let value = value.clone();
                let each = puts / 16 + 1;
                tasks.push(tokio::spawn(async move {
                    for i in 0..each {
                        kv.put(format!("/bench/w{w}/{i}"), value.clone(), None)
                            .await?;
                    }
                    anyhow::Ok(each)
                }));
            }
            let mut done = 0;
            for t in tasks {
                done += t.await??;
            }
            let many = done as f64 / t.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
            drop(e);
            anyhow::Ok(format!(
                "{n}\t{:.2}\t{:.2}\t{one:.0}\t{many:.0}\t{}",
                crate::median(lat.clone()),
                p99,
                (n - 1) / 2
            ))
        })?;
        println!("{row}");
    }
    Ok(())
}

/// `--soak-minutes M`: host 0 starts and stops its stopped VMs in a loop (every record
/// write the real paths make) while etcd's database is sampled every 30 s: what it holds
/// must level off (history older than the 5 minutes of retention is compacted; the
/// tending host defragments).
fn measure_soak(s: &Sim, minutes: u64, vms: usize, running: usize) -> Result<Value> {
    if minutes == 0 {
        return Ok(json!({}));
    }
    let hosts = s.hosts.len();
    let names: Vec<String> = (0..vms)
        .filter(|i| i % hosts == 0 && *i >= running)
        .take(20)
        .map(|i| format!("vm{i:05}"))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (h, st, n) = (s.hosts[0].clone(), stop.clone(), ops.clone());
    let churn = s.rt.spawn(async move {
        // measure_decisions may have started them.
        for name in &names {
            let _ = h.stop_vm(name).await;
        }
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            for name in &names {
                if h.start_vm(name).await.is_ok() && h.stop_vm(name).await.is_ok() {
                    n.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    let samples = s.rt.block_on(async {
        let mut c = etcd_client::Client::connect(s.etcd.urls[..1].to_vec(), None).await?;
        let mut out = vec![];
        let t0 = Instant::now();
        let r0 = c.status().await?.header().map_or(0, |h| h.revision());
        loop {
            let st = c.status().await?;
            let rev = st.header().map_or(0, |h| h.revision());
            out.push(json!({
                "min": t0.elapsed().as_secs() / 60,
                "db_mb": st.db_size() as f64 / 1e6,
                "db_in_use_mb": st.raft_used_db_size() as f64 / 1e6,
                "writes_per_s": (rev - r0) as f64 / t0.elapsed().as_secs_f64().max(1.0),
            }));
            eprintln!(
                "soak: {}",
                out.last().map(|v| v.to_string()).unwrap_or_default()
            );
            if t0.elapsed() >= Duration::from_secs(minutes * 60) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        anyhow::Ok(out)
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = s.rt.block_on(churn);
    let in_use: Vec<f64> = samples
        .iter()
        .filter_map(|v| v["db_in_use_mb"].as_f64())
        .collect();
    Ok(json!({
        "soak_minutes": minutes,
        "soak_vm_ops": ops.load(std::sync::atomic::Ordering::Relaxed),
        "soak_db_in_use_mb_max": in_use.iter().copied().fold(0.0, f64::max),
        "soak_db_in_use_mb_last": in_use.last(),
        "soak_samples": samples,
    }))
}
