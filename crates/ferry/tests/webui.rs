//! The web UI in a real browser: `ui/e2e/*.mjs` (playwright-core driving Debian's
//! headless Chromium, run inside a lab namespace) against real `ferry serve` daemons
//! and the tiny test guest. The page logs in as root with a password set first with
//! `ferry user passwd root` over the daemon's local socket. One host: log in (a wrong
//! password refused), create a VM with the wizard, start it,
//! its serial console (ready marker, a command typed and answered), VNC, graphs, a
//! snapshot, an error with the server's reason, stop, 1,000 VMs in a virtualised tree,
//! delete, a user made with a grant and a token (revoked), logged in as that user,
//! log out. Two hosts: the tree, live migration from the page with its report,
//! consoles relayed to the other host, maintenance mode. Screenshots go to
//! `target/webui-artifacts/{run,cluster}/`. Needs what scripts/setup.sh installs (node, the UI's npm
//! packages and build, chromium).

use anyhow::{bail, Context, Result};
use ferry_lab::{ClusterLab, Lab};
use std::path::{Path, PathBuf};
use std::process::Command;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn ui_dir() -> Result<PathBuf> {
    let ui = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ui");
    if !ui.join("node_modules/playwright-core").is_dir() || !ui.join("dist/index.html").is_file() {
        bail!("the UI is not built (ui/node_modules, ui/dist): run scripts/setup.sh");
    }
    Ok(ui)
}

/// root's password in these tests, set over the daemon's local socket.
const ROOT_PASSWORD: &str = "ferry-e2e-root-pw";

/// Sets root's password with the CLI over the daemon's local `socket` (inside `ns`),
/// from a 0600 file in the lab's directory beside `state_dir`.
fn set_root_password(ns: &str, socket: &Path, state_dir: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = state_dir
        .parent()
        .unwrap_or(state_dir)
        .join("root-password");
    let _ = std::fs::remove_file(&file);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| f.write_all(ROOT_PASSWORD.as_bytes()))
        .with_context(|| format!("write {}", file.display()))?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns, FERRY, "--socket"])
        .arg(socket)
        .args(["user", "passwd", "root", "--password-file"])
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()
        .context("run ferry user passwd root")?;
    if !out.status.success() {
        bail!(
            "ferry user passwd root failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `script` with node in the namespace `ns` against `server` (its daemon's local
/// socket: `socket`); fails with its output and the tail of the daemon's log.
fn run_e2e(
    ns: &str,
    script: &str,
    server: &str,
    socket: &Path,
    state_dir: &Path,
    log: &Path,
) -> Result<()> {
    let ui = ui_dir()?;
    let guest = ferry_lab::guest()?;
    let token = std::fs::read_to_string(state_dir.join("admin-token"))
        .context("the daemon's admin token")?;
    // The page logs in as root with a password; the script's own API calls use the
    // admin token (root's).
    set_root_password(ns, socket, state_dir)?;
    // One folder per script, emptied first: the screenshots are this run's.
    let stem = Path::new(script)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("e2e");
    let artifacts = ui.join("../target/webui-artifacts").join(stem);
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts)?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "node", script])
        .current_dir(&ui)
        .env("FERRY_URL", server)
        .env("FERRY_TOKEN", token.trim())
        .env("FERRY_USER", "root")
        .env("FERRY_PASSWORD", ROOT_PASSWORD)
        // The script's own API calls (Node's fetch) check the host's certificate
        // against the cluster CA.
        .env(
            "NODE_EXTRA_CA_CERTS",
            state_dir.join(ferry_pki::PKI_DIR).join("ca.crt"),
        )
        .env("GUEST_KERNEL", &guest.kernel)
        .env("GUEST_INITRD", &guest.initrd)
        .env("ARTIFACTS", &artifacts)
        // A backup store's folder (the backup pages); the script makes it a store.
        .env("BACKUP_DIR", state_dir.join("webui-backups"))
        .output()
        .with_context(|| format!("run node {script}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    if !out.status.success() || !stdout.contains("] ok") {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let v: Vec<&str> = log.lines().collect();
        bail!(
            "browser test {script} failed (screenshots in {}):\n{stdout}\n{}\n--- daemon log ---\n{}",
            artifacts.display(),
            String::from_utf8_lossy(&out.stderr),
            v[v.len().saturating_sub(60)..].join("\n")
        );
    }
    Ok(())
}

#[test]
fn browser_logs_in_creates_runs_and_uses_a_vm() -> Result<()> {
    let mut lab = Lab::new(FERRY)?;
    lab.start_daemon()?;
    let log = lab.dir.join("daemon.log");
    let server = format!("http://127.0.0.1:{}", ferry_lab::API_PORT);
    run_e2e(
        &lab.ns,
        "e2e/run.mjs",
        &server,
        &lab.run_dir().join("api.sock"),
        &lab.state_dir(),
        &log,
    )
}

#[test]
fn browser_migrates_relays_consoles_and_evacuates_in_a_cluster() -> Result<()> {
    let lab = ClusterLab::for_test(FERRY, 2)?;
    let h1 = lab.cli("h1")?;
    h1.boot_vm(
        "web",
        "10.78.0.100",
        &["--disk", "pool=shared,size=16M,format=raw"],
    )?;
    let log = lab.dir.join("h1").join("daemon.log");
    run_e2e(
        &h1.ns,
        "e2e/cluster.mjs",
        &lab.host("h1")?.api(),
        &lab.run_dir("h1").join("api.sock"),
        &lab.state_dir("h1"),
        &log,
    )
}
