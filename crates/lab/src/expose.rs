//! `ferry lab expose`: a lab host's API (and web UI) on an address of this machine, so
//! a browser outside the lab's namespaces reaches it. Each connection is relayed by a
//! thread that enters the host's network namespace (setns affects only that thread)
//! before it connects.

use anyhow::{Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// Relays connections to `listen` to `target` inside the namespace `ns`, until killed.
pub fn expose(ns: &str, target: SocketAddr, listen: SocketAddr) -> Result<()> {
    let nsfile = PathBuf::from("/var/run/netns").join(ns);
    if !nsfile.exists() {
        anyhow::bail!("no network namespace {ns}");
    }
    let listener = TcpListener::bind(listen).with_context(|| format!("listen on {listen}"))?;
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let nsfile = nsfile.clone();
        std::thread::spawn(move || {
            if let Err(e) = relay(client, &nsfile, target) {
                eprintln!("lab expose: {e:#}");
            }
        });
    }
    Ok(())
}

fn relay(client: TcpStream, nsfile: &std::path::Path, target: SocketAddr) -> Result<()> {
    let f = std::fs::File::open(nsfile).with_context(|| format!("open {}", nsfile.display()))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .context("enter the namespace")?;
    let upstream = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    let (mut c_in, mut u_out) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut u_out);
        let _ = u_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_in, mut c_out) = (upstream, client);
    let _ = std::io::copy(&mut u_in, &mut c_out);
    let _ = c_out.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}
