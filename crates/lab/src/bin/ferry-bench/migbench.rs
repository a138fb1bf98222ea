//! `ferry-bench migration`: live migration in a 3-host lab, for 256 MiB and 1 GiB guests,
//! idle and dirtying memory, measured end to end (ping recorders at 10 ms and 1 ms in the
//! client namespace), side by side with plain QEMU migrating the same guest (the same
//! QEMU command line, started by hand in the same namespaces) with QEMU's defaults,
//! without and with QEMU's TLS (the hosts' certificates, as ferry sets it up).

use crate::rt;
use anyhow::{bail, Context, Result};
use ferry_lab::{ClusterLab, PingRecorder, PingReport};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const IP: &str = "10.78.0.150";

/// A memory load the guest runs while it migrates.
#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    /// Shell line started in the background in the guest ("" for idle); each round
    /// writes `mib` MiB and appends a line to /tmp/rounds.
    cmd: &'static str,
    mib: u64,
}

const PREP: &str = "yes abcdefghijklmnop | head -c 33554432 > /tmp/src";
const LOADS: [Load; 3] = [
    Load {
        name: "idle",
        cmd: "",
        mib: 0,
    },
    Load {
        name: "~50 MB/s",
        cmd: "while :; do dd if=/tmp/src of=/tmp/dst bs=1M count=5 conv=notrunc 2>/dev/null; echo >> /tmp/rounds; usleep 100000; done",
        mib: 5,
    },
    Load {
        name: "flat out",
        cmd: "while :; do dd if=/tmp/src of=/tmp/dst bs=1M count=32 conv=notrunc 2>/dev/null; echo >> /tmp/rounds; done",
        mib: 32,
    },
];

struct Outcome {
    total_s: f64,
    downtime_ms: u64,
    p10: PingReport,
    p1: PingReport,
    passes: u64,
    dirty_mib_s: u64,
    /// What the guest's load wrote, MiB/s (measured in the guest before migrating).
    load_mib_s: u64,
    steps: String,
    completed: bool,
}

fn pingers(lab: &ClusterLab) -> Result<(PingRecorder, PingRecorder)> {
    Ok((
        PingRecorder::start(&lab.client_ns(), IP, Duration::from_millis(10))?,
        PingRecorder::start(&lab.client_ns(), IP, Duration::from_millis(1))?,
    ))
}

/// ferry: boot on h1, load, migrate to h2 with `ferry vm migrate`. Returns the outcome
/// and the QEMU command line the destination ran (for the peer).
fn ferry_case(
    lab: &ClusterLab,
    mib: u64,
    load: Load,
    cap: Option<u64>,
) -> Result<(Outcome, Vec<String>)> {
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);
    let mem = format!("{mib}M");
    h1.create_test_vm(
        "bench",
        IP,
        &[
            "--memory",
            &mem,
            "--nic",
            "bridge=br0",
            "--disk",
            "pool=shared,size=16M,format=raw",
        ],
    )?;
    h1.ferry_ok(&["vm", "start", "bench"])?;
    h1.wait_console("bench", "FERRY-READY", Duration::from_secs(120))?;
    let mut load_rate = 0;
    if !load.cmd.is_empty() {
        h1.guest_sh("bench", PREP)?;
        h1.guest_sh("bench", &format!("({} &)", load.cmd))?;
        std::thread::sleep(Duration::from_secs(2));
        let n: Vec<u64> = h1
            .guest_sh(
                "bench",
                "a=$(wc -l < /tmp/rounds); sleep 3; b=$(wc -l < /tmp/rounds); echo $a $b",
            )?
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [a, b] = n[..] {
            load_rate = (b - a) * load.mib / 3;
        }
    }
    let (p10, p1) = pingers(lab)?;
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let cap_s = cap.map(|c| c.to_string()).unwrap_or_default();
    let mut args = vec!["--json", "vm", "migrate", "bench", "--to", "h2"];
    if cap.is_some() {
        args.extend(["--bandwidth", &cap_s]);
    }
    let out = h1.ferry(&args)?;
    let total_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(700));
    let (p10, p1) = (p10.stop(), p1.stop());
    if !out.status.success() {
        bail!("ferry migrate: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r: Value = serde_json::from_slice(&out.stdout)?;
    let pid = h2.ferry_json(&["vm", "show", "bench"])?["pid"]
        .as_i64()
        .context("pid on h2")?;
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))?
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    h2.ferry_ok(&["vm", "delete", "bench", "--force", "--keep-disks"])?;
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    Ok((
        Outcome {
            total_s,
            downtime_ms: u("downtime_ms"),
            p10,
            p1,
            passes: u("passes"),
            dirty_mib_s: (u("max_dirty_pages_rate") * 4096) >> 20,
            load_mib_s: load_rate,
            steps: r["policy_steps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str())
                        .map(|s| s.split(':').next().unwrap_or(s).to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default(),
            completed: true,
        },
        argv,
    ))
}

/// A hand-started QEMU of the peer run.
struct PeerQemu {
    dir: PathBuf,
}

impl PeerQemu {
    fn start(
        ns: &str,
        argv: &[String],
        from_dir: &str,
        dir: PathBuf,
        incoming: Option<&str>,
    ) -> Result<PeerQemu> {
        let _ = std::fs::remove_dir_all(&dir);
        // QEMU makes its sockets in the run dir's `qemu/` (ferry's layout).
        std::fs::create_dir_all(dir.join("qemu"))?;
        let d = dir.display().to_string();
        let mut args: Vec<String> = vec![];
        let mut skip = false;
        for a in &argv[1..] {
            if skip {
                skip = false;
                continue;
            }
            if a == "-incoming" {
                skip = true;
                continue;
            }
            args.push(peer_netdev(&a.replace(from_dir, &d)));
        }
        if let Some(uri) = incoming {
            args.extend(["-incoming".to_string(), uri.to_string()]);
        }
        let tap = tap_of(&args).context("tap in the QEMU command line")?;
        for c in [
            vec!["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"],
            vec!["link", "set", &tap, "master", "br0", "up"],
        ] {
            let o = Command::new("ip").args(["-n", ns]).args(&c).output()?;
            if !o.status.success() {
                bail!("ip {c:?}: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        // Detached as ferry starts it (QEMU's -daemonize is not allowed under its
        // -sandbox): its own session, output in qemu.log; ready once QMP answers.
        let log = dir.join("qemu.log");
        let o = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c"])
            .arg(r#"log=$1; pidf=$2; shift 2; setsid "$@" >>"$log" 2>&1 </dev/null & echo $! >"$pidf""#)
            .arg("sh")
            .arg(&log)
            .arg(dir.join("qemu.pid"))
            .arg(&argv[0])
            .args(&args)
            .output()?;
        if !o.status.success() {
            bail!("peer QEMU: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(PeerQemu { dir })
    }

    fn qmp(&self, rt: &tokio::runtime::Runtime) -> Result<ferry_qmp::Qmp> {
        let p = self.dir.join("qemu").join("qmp.sock");
        Ok(rt.block_on(ferry_qmp::Qmp::connect_retry(&p, Duration::from_secs(10)))?)
    }

    /// Types a line on the serial console (a short connection; QEMU keeps the log).
    fn type_line(&self, line: &str) -> Result<()> {
        let mut s =
            std::os::unix::net::UnixStream::connect(self.dir.join("qemu").join("serial.sock"))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut buf = [0u8; 4096];
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(600) {
            if s.read(&mut buf).unwrap_or(0) == 0 {
                break;
            }
        }
        Ok(())
    }

    fn wait_log(&self, needle: &str, within: Duration) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < within {
            if std::fs::read_to_string(self.dir.join("serial.log"))
                .unwrap_or_default()
                .contains(needle)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{needle} not in {}", self.dir.display())
    }

    fn stop(&self, ns: &str, tap: &str) {
        let rt = rt();
        if let Ok(q) = self.qmp(&rt) {
            let _ = rt.block_on(q.execute("quit", None));
        }
        if let Some(pid) = std::fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            for _ in 0..100 {
                if !ferry_lab::pid_runs_qemu_of(pid, &self.dir) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if ferry_lab::pid_runs_qemu_of(pid, &self.dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        let _ = Command::new("ip")
            .args(["-n", ns, "link", "del", tap])
            .status();
    }
}

/// The tap of the peer's QEMU (one per lab host's namespace).
const PEER_TAP: &str = "ptap0";

/// ferry hands QEMU its taps as open descriptors; the peer's QEMU is started by hand,
/// so its netdev names a tap of its own instead.
fn peer_netdev(a: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(a) {
        Ok(mut v) if v["type"] == "tap" && v.get("fd").is_some() => {
            if let Some(o) = v.as_object_mut() {
                for k in ["fd", "vhost", "vhostfd"] {
                    o.remove(k);
                }
                o.insert("ifname".into(), json!(PEER_TAP));
                o.insert("script".into(), json!("no"));
                o.insert("downscript".into(), json!("no"));
            }
            v.to_string()
        }
        _ => a.to_string(),
    }
}

fn tap_of(args: &[String]) -> Option<String> {
    args.iter()
        .find_map(|a| a.split("\"ifname\":\"").nth(1))
        .and_then(|r| r.split('"').next())
        .map(String::from)
}

/// Plain QEMU: the same command line by hand on h1 and h2, `migrate` with defaults.
/// QEMU's TLS files for lab host `host` (its ferry certificate), in a folder of the lab.
fn qemu_tls_dir(lab: &ClusterLab, host: &str) -> Result<PathBuf> {
    let pki = lab.state_dir(host).join(ferry_pki::PKI_DIR);
    let dir = lab.dir.join(format!("peer-tls-{host}"));
    std::fs::create_dir_all(&dir)?;
    for (to, from) in [
        ("ca-cert.pem", "ca.crt"),
        ("server-cert.pem", "host.crt"),
        ("server-key.pem", "host.key"),
        ("client-cert.pem", "host.crt"),
        ("client-key.pem", "host.key"),
    ] {
        std::fs::copy(pki.join(from), dir.join(to))?;
    }
    Ok(dir)
}

/// Plain QEMU, with `tls`: QEMU's TLS set up by hand as ferry does it (the hosts'
/// certificates, the destination admitting only h1, the source checking h2's name).
fn peer_case(
    lab: &ClusterLab,
    argv: &[String],
    load: Load,
    cap: Option<u64>,
    tls: bool,
) -> Result<Outcome> {
    // The VM's run dir, from its QMP socket (`-qmp unix:{run dir}/qemu/qmp.sock,...`):
    // the peer's QEMUs get every path under it in a dir of their own.
    let run_dir = argv
        .iter()
        .find_map(|a| a.strip_prefix("unix:")?.split_once("/qemu/qmp.sock"))
        .map(|(dir, _)| dir.to_string())
        .context("the QMP socket in the QEMU command line")?;
    let (ns1, ns2) = (lab.host("h1")?.ns.clone(), lab.host("h2")?.ns.clone());
    let tap = PEER_TAP.to_string();
    let src = PeerQemu::start(&ns1, argv, &run_dir, lab.dir.join("peer-src"), None)?;
    let uri = "tcp:10.78.0.12:4444";
    let mut dst: Option<PeerQemu> = None;
    let mut load_rate = 0;
    let r = (|| -> Result<Outcome> {
        src.wait_log("FERRY-READY", Duration::from_secs(120))?;
        if !load.cmd.is_empty() {
            // The shell's first read may answer its cursor-position query: give it an
            // empty line first.
            src.type_line("")?;
            std::thread::sleep(Duration::from_secs(1));
            // Markers are computed so that the echoed input never matches them.
            src.type_line(&format!("{PREP}; echo PREP-$((40+2))-DONE"))?;
            src.wait_log("PREP-42-DONE", Duration::from_secs(120))?;
            src.type_line(&format!("({} &)", load.cmd))?;
            std::thread::sleep(Duration::from_secs(2));
            src.type_line(
                "a=$(wc -l < /tmp/rounds); sleep 3; b=$(wc -l < /tmp/rounds); echo RATE-$a-$b-E$((40+2))",
            )?;
            src.wait_log("-E42", Duration::from_secs(60))?;
            let log = std::fs::read_to_string(src.dir.join("serial.log")).unwrap_or_default();
            let n: Vec<u64> = log
                .rsplit("RATE-")
                .next()
                .and_then(|r| r.split("-E42").next())
                .map(|r| r.split('-').filter_map(|x| x.trim().parse().ok()).collect())
                .unwrap_or_default();
            if let [a, b] = n[..] {
                load_rate = (b - a) * load.mib / 3;
            }
        }
        let rt = rt();
        let q = src.qmp(&rt)?;
        if let Some(c) = cap {
            rt.block_on(q.execute(
                "migrate-set-parameters",
                Some(json!({"max-bandwidth": c << 20})),
            ))?;
        }
        let (p10, p1) = pingers(lab)?;
        std::thread::sleep(Duration::from_millis(500));
        // Like ferry's total: from starting the destination's QEMU to completion.
        let t = Instant::now();
        let d = dst.insert(PeerQemu::start(
            &ns2,
            argv,
            &run_dir,
            lab.dir.join("peer-dst"),
            Some(uri),
        )?);
        let dq = d.qmp(&rt)?;
        if tls {
            let (d1, d2) = (qemu_tls_dir(lab, "h1")?, qemu_tls_dir(lab, "h2")?);
            rt.block_on(dq.execute(
                "object-add",
                Some(json!({"qom-type": "tls-creds-x509", "id": "tls", "dir": d2,
                            "endpoint": "server", "verify-peer": true})),
            ))?;
            rt.block_on(dq.execute(
                "object-add",
                Some(
                    json!({"qom-type": "authz-list", "id": "authz", "policy": "deny",
                    "rules": [{"match": "O=ferry,CN=h1", "policy": "allow"},
                              {"match": "CN=h1,O=ferry", "policy": "allow"}]}),
                ),
            ))?;
            rt.block_on(dq.execute(
                "migrate-set-parameters",
                Some(json!({"tls-creds": "tls", "tls-authz": "authz"})),
            ))?;
            rt.block_on(q.execute(
                "object-add",
                Some(json!({"qom-type": "tls-creds-x509", "id": "tls", "dir": d1,
                            "endpoint": "client", "verify-peer": true})),
            ))?;
            rt.block_on(q.execute(
                "migrate-set-parameters",
                Some(json!({"tls-creds": "tls", "tls-hostname": "h2"})),
            ))?;
        }
        rt.block_on(q.execute("migrate", Some(json!({"uri": uri}))))?;
        let mut max_dirty = 0;
        let (info, completed) = loop {
            std::thread::sleep(Duration::from_millis(50));
            let i = rt.block_on(q.execute("query-migrate", None))?;
            max_dirty = max_dirty.max(i["ram"]["dirty-pages-rate"].as_u64().unwrap_or(0));
            match i["status"].as_str() {
                Some("completed") => break (i, true),
                Some("failed") | Some("cancelled") => break (i, false),
                _ if t.elapsed() > Duration::from_secs(90) => {
                    rt.block_on(q.execute("migrate_cancel", None))?;
                    break (i, false);
                }
                _ => {}
            }
        };
        let total_s = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(700));
        Ok(Outcome {
            total_s,
            downtime_ms: info["downtime"].as_u64().unwrap_or(0),
            p10: p10.stop(),
            p1: p1.stop(),
            passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            dirty_mib_s: (max_dirty * 4096) >> 20,
            load_mib_s: load_rate,
            steps: if completed {
                String::new()
            } else {
                "did not converge in 90 s".into()
            },
            completed,
        })
    })();
    src.stop(&ns1, &tap);
    if let Some(d) = &dst {
        d.stop(&ns2, &tap);
    }
    r
}

/// The disk file in a QEMU command line (the VM's one volume).
fn disk_of(argv: &[String]) -> Option<PathBuf> {
    argv.iter()
        .find_map(|a| a.split("\"filename\":\"").nth(1))
        .and_then(|r| r.split('"').next())
        .map(PathBuf::from)
}

/// TCP throughput between h1 and h2 (the link the migrations use), bytes/s.
fn link_rate(lab: &ClusterLab) -> Result<f64> {
    let (ns1, ns2) = (lab.host("h1")?.ns.clone(), lab.host("h2")?.ns.clone());
    let listener = ferry_lab::in_netns(&ns2, || std::net::TcpListener::bind("10.78.0.12:4555"))??;
    let rx = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k as u64;
        }
    });
    let total = 2u64 << 30;
    let t = Instant::now();
    ferry_lab::in_netns(&ns1, || -> Result<()> {
        let mut s = std::net::TcpStream::connect("10.78.0.12:4555")?;
        let buf = vec![1u8; 1 << 20];
        for _ in 0..(total >> 20) {
            s.write_all(&buf)?;
        }
        Ok(())
    })??;
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

fn row(guest: &str, load: &str, who: &str, o: &Outcome) -> String {
    format!(
        "| {guest} | {load} | {who} | {} | {} | {} / {:.0} | {} / {:.0} | {} | {} | {} |",
        if o.completed {
            format!("{:.2}", o.total_s)
        } else {
            "—".into()
        },
        o.downtime_ms,
        o.p10.lost,
        o.p10.longest_gap.as_secs_f64() * 1000.0,
        o.p1.lost,
        o.p1.longest_gap.as_secs_f64() * 1000.0,
        o.passes,
        if o.load_mib_s > 0 {
            format!(
                "{} MiB/s written, {} MiB/s dirty seen",
                o.load_mib_s, o.dirty_mib_s
            )
        } else {
            format!("{} MiB/s dirty seen", o.dirty_mib_s)
        },
        if o.steps.is_empty() { "—" } else { &o.steps }
    )
}

pub fn run() -> Result<()> {
    let sizes: Vec<u64> = crate::arg_str("--sizes", "256,1024")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let loads: Vec<Load> = {
        let want = crate::arg_str("--loads", "idle,50,max");
        LOADS
            .iter()
            .zip(["idle", "50", "max"])
            .filter(|(_, k)| want.split(',').any(|w| w == *k))
            .map(|(l, _)| *l)
            .collect()
    };
    let ferry = crate::ferry_bin();
    let lab = ClusterLab::for_test(&ferry, 3)?;
    let rate = link_rate(&lab)?;
    println!(
        "Live migration, h1 → h2 in a 3-host lab (TCG, 1 vCPU; link h1→h2 {:.0} MiB/s by TCP). Pings from the client: lost / longest gap (ms).",
        rate / (1u64 << 20) as f64
    );
    println!();
    println!("| guest | load | who | total s | QEMU downtime ms | @10 ms lost / gap | @1 ms lost / gap | passes | guest load | policy steps |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut ratios = vec![];
    let mut tls = vec![];
    for &mib in &sizes {
        let mut cases: Vec<(Load, Option<u64>)> = loads.iter().map(|l| (*l, None)).collect();
        if loads.iter().any(|l| l.name == "flat out") {
            cases.push((LOADS[2], Some(32)));
        }
        for (load, cap) in cases {
            let guest = format!("{mib} MiB");
            let label = match cap {
                Some(c) => format!("{}, link capped at {c} MiB/s", load.name),
                None => load.name.to_string(),
            };
            let (f, argv) = ferry_case(&lab, mib, load, cap)?;
            println!("{}", row(&guest, &label, "ferry", &f));
            let p = peer_case(&lab, &argv, load, cap, false)?;
            println!("{}", row(&guest, &label, "plain QEMU", &p));
            let pt = peer_case(&lab, &argv, load, cap, true)?;
            println!("{}", row(&guest, &label, "plain QEMU + TLS", &pt));
            if let Some(d) = disk_of(&argv) {
                let _ = std::fs::remove_file(d);
            }
            if p.completed && pt.completed {
                tls.push((
                    guest.clone(),
                    label.clone(),
                    pt.total_s / p.total_s,
                    pt.downtime_ms as i64 - p.downtime_ms as i64,
                ));
            }
            if load.name == "idle" {
                let ideal = (mib << 20) as f64 / rate;
                println!(
                    "|  |  | ferry total / (RAM / link) | {:.2} |  |  |  |  |  |  |",
                    f.total_s / ideal
                );
            }
            if p.completed {
                ratios.push((guest, label, f.total_s / p.total_s));
            }
        }
    }
    println!();
    for (g, l, r) in ratios {
        println!("total time ferry (TLS) / plain QEMU, {g} {l}: {r:.2}");
    }
    for (g, l, r, d) in tls {
        println!("QEMU's TLS: total time with / without {g} {l}: {r:.2}; downtime {d:+} ms");
    }
    Ok(())
}
