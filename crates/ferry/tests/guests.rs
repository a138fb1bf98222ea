//! Real guests' virtual hardware (issue 22), with real QEMU in lab clusters: CPU
//! models and machine versions pinned at create, each host's models published, and
//! placement and live migration refusing a host that cannot run the VM's CPU.

use anyhow::Result;
use ferry_lab::{ClusterLab, LabOptions};
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The CPU flags among `flags` the guest's /proc/cpuinfo shows.
fn guest_flags(cli: &ferry_lab::Cli, vm: &str, flags: &[&str]) -> Result<Vec<String>> {
    let pat = flags.join("|");
    let out = cli.guest_sh(
        vm,
        &format!("grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\\n' | grep -x -E '{pat}' | sort -u | tr '\\n' ' '"),
    )?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

#[test]
fn cpu_models_and_machine_versions_are_pinned_and_hosts_that_lack_them_are_refused() -> Result<()> {
    // h2 offers two models only (the admin's baseline, like vSphere's EVC).
    let mut opts = LabOptions::default();
    opts.serve_args.insert(
        "h2".into(),
        ["--cpu-model", "x86-64-v2-AES", "--cpu-model", "qemu64"]
            .map(String::from)
            .to_vec(),
    );
    let lab = ClusterLab::for_test_with(FERRY, 2, opts)?;
    let (h1, h2) = (lab.cli("h1")?, lab.cli("h2")?);

    // Each host says what it runs.
    let caps1 = h1.ferry_json(&["host", "show"])?["caps"].clone();
    let caps2 = h2.ferry_json(&["host", "show"])?["caps"].clone();
    let models1 = strings(&caps1["cpu_models"]);
    assert!(
        models1.iter().any(|m| m == "x86-64-v3") && models1.iter().any(|m| m == "x86-64-v2-AES"),
        "{caps1}"
    );
    assert!(
        !models1.iter().any(|m| m == "host"),
        "TCG has no host model: {caps1}"
    );
    assert_eq!(strings(&caps2["cpu_models"]), ["qemu64", "x86-64-v2-AES"]);
    assert_eq!(caps1["arch"], "x86_64");
    let machines = strings(&caps1["machines"]);
    assert!(machines.iter().any(|m| m == "pc-q35-9.2"), "{caps1}");
    let status = h1.ferry_ok(&["host", "status"])?;
    assert!(status.contains("CPU models (x86_64):"), "{status}");

    // A new VM gets the default model and the newest machine version, kept in its spec;
    // its guest sees the model's flags and nothing beyond.
    let a = h1.boot_vm("a", "10.78.0.100", &[])?;
    assert_eq!(a["spec"]["cpu"], "x86-64-v2-AES");
    let version = a["spec"]["machine_version"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        machines.contains(&format!("pc-i440fx-{version}")),
        "{version} among {machines:?}"
    );
    let pid = a["pid"].as_i64().unwrap_or(0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert!(
        argv.windows(2)
            .any(|w| w[0] == "-machine" && w[1] == format!("pc-i440fx-{version}")),
        "{argv:?}"
    );
    assert!(
        argv.windows(2)
            .any(|w| w[0] == "-cpu" && w[1].starts_with("qemu64,") && w[1].ends_with(",enforce")),
        "{argv:?}"
    );
    assert_eq!(
        guest_flags(&h1, "a", &["aes", "sse4_2", "avx2"])?,
        ["aes", "sse4_2"]
    );

    // A VM of a higher level runs on h1, with the level's flags.
    h1.boot_vm(
        "b",
        "10.78.0.101",
        &[
            "--cpu",
            "x86-64-v3",
            "--machine",
            "q35",
            "--machine-version",
            "9.2",
        ],
    )?;
    assert_eq!(guest_flags(&h1, "b", &["aes", "avx2"])?, ["aes", "avx2"]);
    let b = h1.ferry_json(&["vm", "show", "b"])?;
    assert_eq!(b["spec"]["machine_version"], "9.2");

    // h2 cannot run it: placement says why, live migration is refused with the reason
    // and the VM runs on where it was.
    let place = h1.ferry_json(&["vm", "place", "b", "--explain"])?;
    let h2v = place["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["host"] == "h2"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(h2v["eligible"], false, "{place}");
    assert!(
        h2v["reasons"]
            .to_string()
            .contains("cannot run CPU model x86-64-v3"),
        "{place}"
    );
    h1.ferry_fails(
        &["vm", "migrate", "b", "--to", "h2"],
        "cannot run CPU model x86-64-v3",
    )?;
    assert_eq!(h1.vm_state("b")?.0, "running");
    assert_eq!(h1.guest_sh("b", "echo alive")?, "alive");
    assert!(h2.vm_names()?.is_empty());

    // The default model moves to h2 and keeps its CPU there.
    let moved = h1.ferry_json(&["vm", "migrate", "a", "--to", "h2"])?;
    assert_eq!(moved["to"], "h2");
    assert_eq!(
        guest_flags(&h2, "a", &["aes", "sse4_2", "avx2"])?,
        ["aes", "sse4_2"]
    );

    // What a host cannot run is refused at create, naming the field; nothing is made.
    h2.ferry_fails(
        &["vm", "create", "c", "--memory", "64M", "--cpu", "x86-64-v3"],
        "cpu: CPU model x86-64-v3 is not one this host runs",
    )?;
    h1.ferry_fails(
        &[
            "vm",
            "create",
            "c",
            "--memory",
            "64M",
            "--machine-version",
            "99.0",
        ],
        "has no machine type pc-i440fx-99.0",
    )?;
    h1.ferry_fails(
        &["vm", "create", "c", "--memory", "64M", "--cpu", "a,b"],
        "only letters",
    )?;
    h1.ferry_fails(
        &[
            "vm",
            "create",
            "c",
            "--memory",
            "64M",
            "--machine-version",
            "ten",
        ],
        "MAJOR.MINOR",
    )?;
    assert!(!h1.vm_names()?.contains(&"c".to_string()));
    assert!(!h2.vm_names()?.contains(&"c".to_string()));

    // A stopped VM's model changes by edit; the edit keeps what it does not name.
    h1.ferry_ok(&["vm", "stop", "b"])?;
    h1.ferry_ok(&["vm", "edit", "b", "--cpu", "x86-64-v2-AES"])?;
    let b = h1.ferry_json(&["vm", "show", "b"])?;
    assert_eq!(b["spec"]["cpu"], "x86-64-v2-AES");
    assert_eq!(b["spec"]["machine_version"], "9.2");
    let place = h1.ferry_json(&["vm", "place", "b", "--explain"])?;
    assert!(
        !place.to_string().contains("cannot run CPU model"),
        "{place}"
    );
    Ok(())
}
