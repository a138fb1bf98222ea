//! The web UI in a real browser: `ui/e2e/run.mjs` (playwright-core driving Debian's
//! headless Chromium) against a real `ferry serve` in a lab namespace with the tiny test
//! guest — log in, create a VM with the wizard, start it, its serial console (ready
//! marker, a command typed and answered), VNC, graphs, a snapshot, an error with the
//! server's reason, stop, 1,000 VMs in a virtualised tree, delete, log out. Screenshots
//! go to `target/webui-artifacts/`. Needs what scripts/setup.sh installs (node, the UI's
//! npm packages, chromium).

use anyhow::{bail, Context, Result};
use ferry_lab::Lab;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn browser_logs_in_creates_runs_and_uses_a_vm() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ui = root.join("ui");
    if !ui.join("node_modules/playwright-core").is_dir() || !ui.join("dist/index.html").is_file() {
        bail!("the UI is not built (ui/node_modules, ui/dist): run scripts/setup.sh");
    }
    let guest = ferry_lab::guest()?;
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let token = std::fs::read_to_string(lab.state_dir().join("admin-token"))
        .context("the daemon's admin token")?;
    let artifacts = root.join("target/webui-artifacts");
    let _ = std::fs::remove_dir_all(&artifacts);
    // The browser runs in the lab's namespace, where the daemon listens on loopback.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns, "node", "e2e/run.mjs"])
        .current_dir(&ui)
        .env("FERRY_URL", &lab.server)
        .env("FERRY_TOKEN", token.trim())
        .env("GUEST_KERNEL", &guest.kernel)
        .env("GUEST_INITRD", &guest.initrd)
        .env("ARTIFACTS", &artifacts)
        .output()
        .context("run node ui/e2e/run.mjs")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !out.status.success() || !stdout.contains("] ok") {
        bail!(
            "browser test failed (screenshots in {}):\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
            artifacts.display(),
            tail(&lab.daemon_log(), 60)
        );
    }
    Ok(())
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
