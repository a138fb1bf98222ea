//! The live API under schemathesis (PyPI; `scripts/setup.sh` installs it in
//! `/var/cache/ferry/schemathesis`): generated requests against every operation of the
//! OpenAPI document a running daemon serves. No answer may be a 5xx, every answer must
//! match the document, and a daemon confined to the lab's folder (everything else
//! read-only) keeps running throughout.

use anyhow::{ensure, Context, Result};
use ferry_lab::Lab;
use serde_json::{json, Value};
use std::path::Path;

const SCHEMATHESIS: &str = "/var/cache/ferry/schemathesis/bin/schemathesis";

#[test]
fn the_live_api_answers_generated_requests_without_5xx_and_as_documented() -> Result<()> {
    ensure!(
        Path::new(SCHEMATHESIS).exists(),
        "{SCHEMATHESIS} is missing: run scripts/setup.sh"
    );
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon_confined()?;
    let token = std::fs::read_to_string(lab.state_dir().join("admin-token"))
        .context("the daemon's token")?;
    let token = token.trim().to_string();
    let run = |mode: &str, checks: &str| -> Result<()> {
        let out = lab
            .cmd(SCHEMATHESIS)
            .arg("run")
            .arg(format!(
                "http://127.0.0.1:{}/api/v1/openapi.json",
                ferry_lab::API_PORT
            ))
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--mode", mode, "--checks", checks])
            .args(["--max-examples", "25", "--request-timeout", "30"])
            .args(["--generation-deterministic", "--no-color"])
            // Left out: starting VMs (each would live until the lab goes) and the calls
            // that restart the daemon by design (cluster init/join/leave, a renewal).
            .args([
                "--exclude-path-regex",
                "(/(start|resume|reboot|migrate|console|vnc|stream)$)|(/cluster/(init|join|leave|certs/renew)$)",
            ])
            .arg("--report-dir")
            .arg(lab.dir.join(format!("schemathesis-{mode}")))
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(120)..].join("\n");
        eprintln!("schemathesis --mode {mode}:\n{tail}");
        ensure!(
            out.status.success(),
            "schemathesis ({mode}) found failures:\n{tail}"
        );
        Ok(())
    };
    // Requests the document forbids change nothing: the VMs, pools and volumes are
    // the same before and after (and every one is refused with a 4xx).
    let before = inventory(&lab)?;
    run(
        "negative",
        "not_a_server_error,negative_data_rejection,status_code_conformance",
    )?;
    let after = inventory(&lab)?;
    ensure!(
        before == after,
        "rejected requests changed something:\nbefore: {before}\nafter: {after}"
    );
    // Then everything: valid and invalid requests, answers as documented.
    run(
        "all",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
    )?;
    // The daemon is still there and answers.
    lab.ferry_ok(&["host"])?;
    Ok(())
}

/// The VMs (definitions and states), pools (definitions) and each pool's volumes
/// (names, formats, sizes), as the CLI lists them.
fn inventory(lab: &Lab) -> Result<Value> {
    let vms: Vec<Value> = lab
        .ferry_json(&["vm", "list"])?
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| json!({"spec": v["spec"], "state": v["state"]}))
        .collect();
    let mut pools = serde_json::Map::new();
    for p in lab
        .ferry_json(&["pool", "list"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = p["spec"]["name"].as_str().context("a pool's name")?;
        let volumes: Vec<Value> = lab
            .ferry_json(&["volume", "list", name])?
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| json!([v["name"], v["format"], v["size_bytes"]]))
            .collect();
        pools.insert(name.into(), json!({"spec": p["spec"], "volumes": volumes}));
    }
    Ok(json!({"vms": vms, "pools": pools}))
}
