//! `ferry-bench tls [--seconds 5] [--size-mib 256] [--calls 2000] [--rounds 3]`: what TLS costs on the
//! links it now guards, side by side in one run, over loopback on this machine:
//! - replication: two of ferry's replication services (the same code the daemon runs)
//!   with a replicated volume, fio through the primary's NBD export — 4k random writes
//!   at queue depth 16 (IOPS) and 1 MiB sequential writes at depth 4 (MB/s) — with the
//!   link between them plain TCP and with mutual TLS (the hosts' certificates);
//! - a host-to-host API call: a small GET on one reused connection, plain HTTP against
//!   HTTPS with mutual TLS (rustls on both ends, the daemon's accept loop).
//!
//! Live migration with and without QEMU's TLS is part of `ferry-bench migration`.

use crate::replbench::{fio, Target};
use anyhow::{bail, Context, Result};
use ferry_pki::{Expect, HostPki};
use ferry_replica::{Cluster, Report, Service};
use ferry_types::{GenId, PeerState};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "p/v";

#[derive(Default)]
struct Net {
    addrs: Mutex<BTreeMap<String, SocketAddr>>,
}

/// One host's view of the two-host cluster, with or without its certificate.
struct View {
    net: Arc<Net>,
    pki: Option<HostPki>,
}

#[async_trait::async_trait]
impl Cluster for View {
    async fn outdate(&self, _v: &str, _peer: &str) -> Result<(), String> {
        Ok(())
    }
    async fn up_to_date(&self, _v: &str, _peer: &str) -> Result<(), String> {
        Ok(())
    }
    async fn peer_addr(&self, host: &str) -> Option<SocketAddr> {
        self.net.addrs.lock().expect("addrs").get(host).copied()
    }
    fn report(&self, _v: &str, _r: Report) {}
    fn client_tls(&self, host: &str) -> Option<Arc<rustls::ClientConfig>> {
        self.pki
            .as_ref()
            .map(|p| Arc::new(p.client_config(Expect::Host(host.to_string()))))
    }
    fn server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.pki.as_ref().map(|p| p.server_config(true))
    }
}

fn certificates(dir: &Path) -> Result<(HostPki, HostPki)> {
    let lo = ["127.0.0.1".parse()?];
    let a = HostPki::ensure(&dir.join("pki-a"), "a", &lo)?;
    let (key, csr) = ferry_pki::new_request("b")?;
    let cert = a.issue(&csr, "b", &lo)?;
    HostPki::install(&dir.join("pki-b"), a.ca_pem(), None, &cert, &key)?;
    Ok((a, HostPki::load(&dir.join("pki-b"))?))
}

/// (4k QD16 IOPS, 1M MB/s) through a primary replicated to one peer.
fn replication(tls: bool, size_mib: u64, secs: u64) -> Result<(f64, f64)> {
    let dir = tempfile_dir("ferry-bench-tls")?;
    let (pa, pb) = certificates(&dir)?;
    let net = Arc::new(Net::default());
    let g = |n| GenId {
        n,
        host: "a".into(),
    };
    let mut svcs = vec![];
    for (name, pki) in [("a", pa), ("b", pb)] {
        let view = Arc::new(View {
            net: net.clone(),
            pki: tls.then_some(pki),
        });
        let svc = Service::new(name, &dir.join(name).join("run"), view)?;
        let addr = svc.listen("127.0.0.1:0".parse()?)?;
        net.addrs.lock().expect("addrs").insert(name.into(), addr);
        svc.open(
            KEY,
            &dir.join(name).join("pool"),
            "v",
            Some((size_mib << 20, Some(g(1)))),
        )?;
        svcs.push(svc);
    }
    let (a, _b) = (&svcs[0], &svcs[1]);
    a.promote(
        KEY,
        g(2),
        &["a".into(), "b".into()],
        &BTreeSet::new(),
        false,
    )?;
    let t = Instant::now();
    loop {
        let st = a.status(KEY)?;
        if st
            .peers
            .iter()
            .any(|p| p.host == "b" && p.state == PeerState::UpToDate)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the peer never came up to date: {st:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sock = a.socket_path(KEY);
    let q = fio(&Target::Nbd(&sock), "randwrite", "4k", 16, secs)?;
    let s = fio(&Target::Nbd(&sock), "write", "1M", 4, secs)?;
    tokio::runtime::Runtime::new()?.block_on(a.demote(KEY))?;
    drop(svcs);
    let _ = std::fs::remove_dir_all(&dir);
    let iops = q["iops"].as_f64().context("fio reported no iops")?;
    let bw = s["bw_bytes"].as_f64().context("fio reported no bw_bytes")?;
    Ok((iops, bw / 1e6))
}

fn tempfile_dir(prefix: &str) -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Median latency (µs) of `calls` small GETs on one reused connection.
async fn api_calls(tls: bool, calls: usize) -> Result<f64> {
    let dir = tempfile_dir("ferry-bench-api")?;
    let (a, b) = certificates(&dir)?;
    let app = axum::Router::new().route("/api/v1/ping", axum::routing::get(|| async { "pong" }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let limits = ferry_api::serve::Limits::default();
    let server = if tls {
        let tl = ferry_api::serve::TlsListener {
            tcp: l,
            config: a.server_config(false),
            timeout: limits.header_timeout,
        };
        tokio::spawn(ferry_api::serve::serve(tl, app, limits, stop_rx))
    } else {
        tokio::spawn(ferry_api::serve::serve(l, app, limits, stop_rx))
    };
    let client = if tls {
        reqwest::Client::builder()
            .use_preconfigured_tls(b.client_config(Expect::Host("a".into())))
            .build()?
    } else {
        reqwest::Client::builder().build()?
    };
    let url = format!(
        "{}://{addr}/api/v1/ping",
        if tls { "https" } else { "http" }
    );
    let mut v = Vec::with_capacity(calls);
    for i in 0..calls + 50 {
        let t = Instant::now();
        let r = client.get(&url).send().await.context("ping")?;
        let body = r.text().await?;
        if body != "pong" {
            bail!("unexpected answer {body}");
        }
        if i >= 50 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(crate::median(v))
}

pub fn run() -> Result<()> {
    let secs = crate::arg("--seconds", 5) as u64;
    let size = crate::arg("--size-mib", 256) as u64;
    let calls = crate::arg("--calls", 2000);
    println!("TLS on ferry's links, loopback, this machine (2 cores); replication: medians of alternating rounds.");
    println!();
    println!("| link | measure | plain | TLS | TLS / plain |");
    println!("|---|---|---|---|---|");
    // Alternating rounds (plain, TLS, plain, TLS, …): neither gets the warmer cache.
    let rounds = crate::arg("--rounds", 3);
    let (mut p, mut t) = (vec![], vec![]);
    for _ in 0..rounds {
        p.push(replication(false, size, secs)?);
        t.push(replication(true, size, secs)?);
    }
    let med =
        |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| crate::median(v.iter().map(f).collect());
    let (pq, ps) = (med(&p, |x| x.0), med(&p, |x| x.1));
    let (tq, ts) = (med(&t, |x| x.0), med(&t, |x| x.1));
    println!(
        "| replication (1 peer) | 4k random writes QD16, IOPS | {pq:.0} | {tq:.0} | {:.2} |",
        tq / pq
    );
    println!(
        "| replication (1 peer) | 1 MiB writes QD4, MB/s | {ps:.0} | {ts:.0} | {:.2} |",
        ts / ps
    );
    let rt = tokio::runtime::Runtime::new()?;
    let pa = rt.block_on(api_calls(false, calls))?;
    let ta = rt.block_on(api_calls(true, calls))?;
    println!(
        "| host-to-host API call (reused connection) | latency µs (median) | {pa:.0} | {ta:.0} | {:.2} |",
        ta / pa
    );
    Ok(())
}
