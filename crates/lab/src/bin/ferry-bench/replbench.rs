//! `ferry-bench replication [--seconds 10] [--size-mib 512] [--runs 1]`: replicated volumes under
//! fio, in a 3-host etcd lab (replication over the lab's veth pairs). One run, the same
//! fio jobs against: a local raw file, the same kind of file exported by `qemu-nbd` (the
//! peer for our NBD server), our NBD export with replication switched off, replicated
//! to one peer, replicated to two; and `nbdkit null` (an NBD server that discards every
//! write: the transport's own ceiling) plus the machine's TCP round trip and stream
//! throughput, the floors a synchronous replica cannot go below. Jobs: 4k random writes at queue depth 1 (IOPS and
//! p50/p99 latency) and 16 (IOPS), 1 MiB sequential writes at depth 4 (MB/s); every job
//! ends with a flush (data durable on every up-to-date copy), which counts.

use anyhow::{bail, Context, Result};
use ferry_lab::{wait_for, ClusterLab};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Default, Clone, Copy)]
struct Figures {
    qd1_iops: f64,
    p50_us: f64,
    p99_us: f64,
    qd16_iops: f64,
    seq_mbs: f64,
    /// During the QD16 job: CPU µs per write of the serving process (the primary's
    /// daemon, qemu-nbd) and of all peer daemons together; machine busy %.
    serve_us: f64,
    peers_us: f64,
    busy_pct: f64,
}

impl Figures {
    /// Each figure's median over runs.
    fn median(v: &[Figures]) -> Figures {
        let m = |f: fn(&Figures) -> f64| crate::median(v.iter().map(f).collect());
        Figures {
            qd1_iops: m(|f| f.qd1_iops),
            p50_us: m(|f| f.p50_us),
            p99_us: m(|f| f.p99_us),
            qd16_iops: m(|f| f.qd16_iops),
            seq_mbs: m(|f| f.seq_mbs),
            serve_us: m(|f| f.serve_us),
            peers_us: m(|f| f.peers_us),
            busy_pct: m(|f| f.busy_pct),
        }
    }
}

/// (busy, total) jiffies of the machine.
fn machine() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

pub(crate) enum Target<'a> {
    File(&'a Path),
    Nbd(&'a Path),
}

pub(crate) fn fio(t: &Target, rw: &str, bs: &str, depth: u32, secs: u64) -> Result<Value> {
    let mut c = Command::new("fio");
    c.args([
        "--name=bench",
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={depth}"),
        &format!("--runtime={secs}"),
        "--time_based",
        "--end_fsync=1",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]);
    match t {
        Target::File(p) => {
            c.arg(format!("--filename={}", p.display()));
            c.arg(if depth == 1 {
                "--ioengine=psync"
            } else {
                "--ioengine=io_uring"
            });
        }
        Target::Nbd(sock) => {
            c.arg("--ioengine=nbd");
            c.arg(format!("--uri=nbd+unix:///?socket={}", sock.display()));
        }
    }
    let out = c.stderr(Stdio::piped()).output().context("run fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map(|i| &text[i..]).unwrap_or("");
    let v: Value = serde_json::from_str(json).with_context(|| {
        format!(
            "fio output: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if v["jobs"][0]["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(v["jobs"][0]["write"].clone())
}

fn measure(t: &Target, secs: u64, serve: Option<u32>, peers: &[u32]) -> Result<Figures> {
    let a = fio(t, "randwrite", "4k", 1, secs)?;
    let pct =
        |w: &Value, p: &str| w["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| ferry_lab::cpu_seconds(*p as i64))
            .sum::<f64>()
    };
    let serve: Vec<u32> = serve.into_iter().collect();
    let (s0, p0, m0) = (cpu(&serve), cpu(peers), machine());
    let b = fio(t, "randwrite", "4k", 16, secs)?;
    let (s1, p1, m1) = (cpu(&serve), cpu(peers), machine());
    let writes = b["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
    let c = fio(t, "write", "1M", 4, secs)?;
    Ok(Figures {
        serve_us: (s1 - s0) * 1e6 / writes,
        peers_us: (p1 - p0) * 1e6 / writes,
        busy_pct: 100.0 * (m1.0 - m0.0) / (m1.1 - m0.1).max(1.0),
        qd1_iops: a["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct(&a, "50.000000"),
        p99_us: pct(&a, "99.000000"),
        qd16_iops: b["iops"].as_f64().unwrap_or(0.0),
        seq_mbs: c["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    })
}

/// Starts an NBD server (`cmd`, serving on `sock`) and waits for its socket.
fn nbd_server(mut cmd: Command, sock: &Path, what: &str) -> Result<Child> {
    let _ = std::fs::remove_file(sock);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    wait_for(&format!("{what} socket"), Duration::from_secs(10), || {
        Ok(sock.exists())
    })?;
    Ok(child)
}

fn qemu_nbd(file: &Path, sock: &Path) -> Result<Child> {
    let mut c = Command::new("qemu-nbd");
    c.args([
        "-f",
        "raw",
        "-t",
        "--cache=writeback",
        "--discard=unmap",
        "-k",
    ])
    .arg(sock)
    .arg(file);
    nbd_server(c, sock, "qemu-nbd")
}

/// `nbdkit null`: an NBD server that discards every write (what the NBD transport
/// alone costs on this machine).
fn nbdkit_null(size_mib: u64, sock: &Path) -> Result<Child> {
    let mut c = Command::new("nbdkit");
    c.args(["--foreground", "--exit-with-parent", "-U"])
        .arg(sock)
        .args(["null", &format!("{size_mib}M")]);
    nbd_server(c, sock, "nbdkit (Debian package nbdkit)")
}

/// `ferry-bench tcp-echo ADDR`: connects to ADDR and echoes what it reads.
pub fn echo(addr: &str) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).context("connect")?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 64];
    loop {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&b[..n])?;
    }
}

/// What this machine's TCP stack gives one connection over loopback: the round trip of
/// a small message between two processes (the least a synchronous replica adds to a
/// write at depth 1) and the throughput of 1 MiB sends (the most a replication stream
/// carries).
fn tcp_ceiling() -> Result<(f64, f64, f64)> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("tcp-echo")
        .arg(l.local_addr()?.to_string())
        .spawn()
        .context("start the echo process")?;
    let (mut c, _) = l.accept()?;
    c.set_nodelay(true)?;
    let mut b = [0u8; 32];
    let n = 20_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    let rtt_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(c);
    let _ = child.wait();
    let (tcp_mbs, tcp_ms) = tcp_stream()?;
    Ok((rtt_us, tcp_mbs, tcp_ms))
}

/// 1 MiB sends over one loopback connection for 3 s: MB/s and CPU ms per MB (sender
/// and receiver).
fn tcp_stream() -> Result<(f64, f64)> {
    use std::io::{Read, Write};

    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut b = vec![0u8; 1 << 20];
        while s.read(&mut b)? > 0 {}
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    let data = vec![7u8; 1 << 20];
    let cpu0 = ferry_lab::cpu_seconds(std::process::id() as i64);
    let t = std::time::Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_secs(3) {
        c.write_all(&data)?;
        sent += data.len() as u64;
    }
    drop(c);
    let _ = sink.join();
    let secs = t.elapsed().as_secs_f64();
    let cpu = ferry_lab::cpu_seconds(std::process::id() as i64) - cpu0;
    let mb = sent as f64 / 1e6;
    Ok((mb / secs, cpu * 1e3 / mb))
}

pub fn run() -> Result<()> {
    let secs = crate::arg_str("--seconds", "10")
        .parse::<u64>()
        .unwrap_or(10);
    let runs = crate::arg_str("--runs", "1")
        .parse::<usize>()
        .unwrap_or(1)
        .max(1);
    let size_mib = crate::arg_str("--size-mib", "512")
        .parse::<u64>()
        .unwrap_or(512);
    let ferry = crate::ferry_bin();
    let lab = ClusterLab::for_test(&ferry, 3)?;
    let h1 = lab.cli("h1")?;
    let size = format!("{size_mib}M");
    for (pool, hosts) in [("two", "h1,h2"), ("three", "h1,h2,h3")] {
        let path = format!("{}/{pool}-{{host}}", lab.dir.display());
        h1.ferry_ok(&[
            "pool",
            "create",
            pool,
            "--type",
            "replicated",
            "--hosts",
            hosts,
            "--path",
            &path,
        ])?;
        h1.ferry_ok(&["volume", "create", pool, "v", "--size", &size])?;
        h1.ferry_ok(&["volume", "promote", pool, "v"])?;
    }
    h1.ferry_ok(&["volume", "create", "two", "alone", "--size", &size])?;
    h1.ferry_ok(&["volume", "promote", "two", "alone"])?;
    h1.ferry_ok(&["volume", "disconnect", "two", "alone"])?;
    for (pool, peers) in [("two", 1), ("three", 2)] {
        wait_for(
            &format!("{pool}/v in sync"),
            Duration::from_secs(60),
            || {
                let s = h1.ferry_json(&["volume", "replication", pool, "v"])?;
                let up = s["replicas"][0]["replica"]["peers"]
                    .as_array()
                    .map_or(0, |p| {
                        p.iter().filter(|p| p["state"] == "up-to-date").count()
                    });
                Ok(up == peers)
            },
        )?;
    }
    let sock = |pool: &str, vol: &str| {
        lab.run_dir("h1")
            .join("nbd")
            .join(format!("{pool}.{vol}.sock"))
    };
    let local = lab.dir.join("local.raw");
    let peer_file = lab.dir.join("qemu-nbd.raw");
    for f in [&local, &peer_file] {
        std::fs::File::create(f)?.set_len(size_mib << 20)?;
    }
    let qn_sock = lab.dir.join("qemu-nbd.sock");
    let mut qn = qemu_nbd(&peer_file, &qn_sock)?;
    let null_sock = lab.dir.join("nbdkit-null.sock");
    let mut null = match nbdkit_null(size_mib, &null_sock) {
        Ok(c) => c,
        Err(e) => {
            let _ = qn.kill();
            return Err(e);
        }
    };

    println!(
        "fio, {secs} s per job, {size_mib} MiB volumes, every job ends with a flush, median of {runs} run(s) in rounds; replication over the lab's veth (one machine, 2 cores: fio, the primary and the peers share them)."
    );
    println!();
    let (s_alone, s_one, s_two) = (sock("two", "alone"), sock("two", "v"), sock("three", "v"));
    let pid = |h: &str| lab.host(h).ok().and_then(|h| h.daemon_pid);
    let (d1, d2, d3) = (pid("h1"), pid("h2"), pid("h3"));
    let peers2: Vec<u32> = d2.into_iter().collect();
    let peers3: Vec<u32> = d2.into_iter().chain(d3).collect();
    let qn_pid = Some(qn.id());
    let null_pid = Some(null.id());
    type Row<'a> = (&'a str, Target<'a>, Option<u32>, &'a [u32]);
    let rows: Vec<Row> = vec![
        (
            "local raw file (fio psync / io_uring)",
            Target::File(&local),
            None,
            &[],
        ),
        (
            "raw file via qemu-nbd (QEMU's NBD server)",
            Target::Nbd(&qn_sock),
            qn_pid,
            &[],
        ),
        (
            "nbdkit null (discards writes: the NBD transport alone)",
            Target::Nbd(&null_sock),
            null_pid,
            &[],
        ),
        (
            "ferry NBD export, replication off",
            Target::Nbd(&s_alone),
            d1,
            &[],
        ),
        (
            "ferry, replicated to 1 peer",
            Target::Nbd(&s_one),
            d1,
            &peers2,
        ),
        (
            "ferry, replicated to 2 peers",
            Target::Nbd(&s_two),
            d1,
            &peers3,
        ),
    ];
    // `--only 0,3`: a subset of the rows (by index), for profiling one of them.
    let only = crate::arg_str("--only", "");
    let only: Vec<usize> = only.split(',').filter_map(|x| x.parse().ok()).collect();
    // `--runs N`: every row N times, in rounds (a drift of the machine hits all rows
    // alike); each figure is the median of its runs.
    let mut all: Vec<(&&str, Vec<Figures>)> = vec![];
    for round in 0..runs {
        for (i, (label, t, serve, peers)) in rows.iter().enumerate() {
            if !only.is_empty() && !only.contains(&i) {
                continue;
            }
            let f = measure(t, secs, *serve, peers).with_context(|| label.to_string());
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    let _ = qn.kill();
                    let _ = null.kill();
                    return Err(e);
                }
            };
            eprintln!("{label}: run {} of {runs} done", round + 1);
            match all.iter_mut().find(|(l, _)| *l == label) {
                Some((_, v)) => v.push(f),
                None => all.push((label, vec![f])),
            }
        }
    }
    let results: Vec<(&&str, Figures)> = all
        .into_iter()
        .map(|(label, v)| (label, Figures::median(&v)))
        .collect();
    for c in [&mut qn, &mut null] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let find = |l: &str| results.iter().find(|(x, _)| **x == l).map(|r| r.1);
    let local_f = find(rows[0].0).unwrap_or_default();
    let alone = find(rows[3].0).unwrap_or_default();
    println!("| target | 4k QD1 IOPS | p50 µs | p99 µs | 4k QD16 IOPS | 1M seq MB/s | QD16 IOPS vs local / vs ferry alone | seq vs local / vs ferry alone | QD16 CPU µs/write: server / peers | machine busy |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, f) in &results {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} % / {:.0} % | {:.0} % / {:.0} % | {:.0} / {:.0} | {:.0} % |",
            f.qd1_iops,
            f.p50_us,
            f.p99_us,
            f.qd16_iops,
            f.seq_mbs,
            100.0 * f.qd16_iops / local_f.qd16_iops,
            100.0 * f.qd16_iops / alone.qd16_iops,
            100.0 * f.seq_mbs / local_f.seq_mbs,
            100.0 * f.seq_mbs / alone.seq_mbs,
            f.serve_us,
            f.peers_us,
            f.busy_pct,
        );
    }
    let (rtt_us, tcp_mbs, tcp_ms_per_mb) = tcp_ceiling().context("TCP ceiling")?;
    println!();
    println!(
        "This machine's TCP over loopback, one connection: {rtt_us:.0} µs per round trip of a small message between two processes, {tcp_mbs:.0} MB/s of 1 MiB sends ({tcp_ms_per_mb:.2} CPU ms per MB, sender and receiver)."
    );
    if local_f.qd16_iops > 0.0 && local_f.seq_mbs > 0.0 {
        println!(
            "Against the local file: the NBD transport alone (nbdkit null) reaches {:.0} % of its 4k QD16 IOPS, one TCP stream {:.0} % of its sequential MB/s.",
            100.0 * find(rows[2].0).unwrap_or_default().qd16_iops / local_f.qd16_iops,
            100.0 * tcp_mbs / local_f.seq_mbs
        );
    }
    Ok(())
}
