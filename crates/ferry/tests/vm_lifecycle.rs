//! End to end against real QEMU (TCG here, as on any host without working KVM): the
//! `ferry` binary as daemon and CLI inside a lab network namespace, the tiny test guest.

use anyhow::{Context, Result};
use ferry_lab::{pid_runs_qemu_of, Lab};
use serde_json::Value;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);

fn lab() -> Result<Lab> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    Ok(lab)
}

fn create_guest(lab: &Lab, name: &str, ip: &str, extra: &[&str]) -> Result<Value> {
    lab.create_test_vm(name, ip, extra)
}

fn state(lab: &Lab, name: &str) -> Result<(String, Option<i64>)> {
    lab.vm_state(name)
}

#[test]
fn vm_boots_answers_pings_console_and_survives_daemon_crash() -> Result<()> {
    let mut lab = lab()?;
    let vm = create_guest(
        &lab,
        "web1",
        "10.77.0.10",
        &[
            "--disk",
            "bus=virtio,size=64M",
            "--disk",
            "bus=scsi,size=32M,format=raw",
            "--cdrom",
            "empty",
            "--nic",
            "bridge=br0",
        ],
    )?;
    let mac = vm["spec"]["nics"][0]["mac"].as_str().unwrap().to_string();
    // Derived from the VM id and this host's CA: never a random collision.
    let id = u32::try_from(vm["id"].as_u64().unwrap())?;
    let ca = lab.ferry_json(&["cluster", "certs", "status"])?;
    let salt = ferry_types::mac_salt(ca["ca"]["fingerprint"].as_str().context("fingerprint")?);
    assert_eq!(
        Some(mac.clone()),
        ferry_types::derived_mac(salt, id, 0),
        "{vm}"
    );

    lab.ferry_ok(&["vm", "start", "web1"])?;
    lab.wait_console("web1", "FERRY-READY", BOOT)?;
    let (st, pid) = state(&lab, "web1")?;
    assert_eq!(st, "running");
    let pid = i32::try_from(pid.expect("running VM has a pid"))?;
    let tap = format!("tap{}i0", vm["id"]);
    let master = lab.ip(&["-o", "link", "show", &tap])?;
    assert!(
        String::from_utf8_lossy(&master.stdout).contains("master br0"),
        "tap not on br0"
    );
    assert!(lab.ping("10.77.0.10", 3), "guest does not answer pings");

    // Typing into the console: the guest's shell answers; both disks are there.
    let out = lab.guest_sh(
        "web1",
        "echo MARK-$((6*7)); ls /sys/block | tr '\\n' ' '; echo; cat /sys/class/net/eth0/address",
    )?;
    assert!(out.contains("MARK-42"), "console output: {out}");
    assert!(
        out.contains("vda") && out.contains("sda"),
        "disks not seen by the guest: {out}"
    );
    assert!(out.contains(&mac), "guest MAC differs from the spec: {out}");

    // The guest's control service (used by later checkers) answers over the network.
    let up = lab
        .cmd("curl")
        .args(["-s", "--max-time", "10", "http://10.77.0.10/cgi-bin/uptime"])
        .output()?;
    let up = String::from_utf8_lossy(&up.stdout).trim().to_string();
    assert!(
        up.parse::<f64>().is_ok_and(|u| u > 0.0),
        "control service answered {up:?}"
    );

    // On a terminal the console is raw and Ctrl-] detaches (script(1) provides the pty).
    let mut tty = lab
        .cmd("script")
        .args([
            "-qfec",
            &format!("ferry --socket {} vm console web1", lab.socket.display()),
            "/dev/null",
        ])
        .env(
            "PATH",
            format!(
                "{}:{}",
                std::path::Path::new(env!("CARGO_BIN_EXE_ferry"))
                    .parent()
                    .unwrap()
                    .display(),
                std::env::var("PATH")?
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        // Read the pty's output on a thread; type, wait for the answer, then detach.
        use std::io::{Read, Write};
        let mut stdout = tty.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let s2 = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let has = |needle: &str| String::from_utf8_lossy(&seen.lock().unwrap()).contains(needle);
        let mut stdin = tty.stdin.take().unwrap();
        let t = std::time::Instant::now();
        while !has("Ctrl-] detaches") && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stdin.write_all(b"echo TTY-$((3*3))\r")?;
        stdin.flush()?;
        while !has("TTY-9") && t.elapsed() < Duration::from_secs(40) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stdin.write_all(b"\x1d")?;
        stdin.flush()?;
        let status = tty.wait()?;
        drop(stdin);
        reader.join().unwrap();
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        assert!(status.success(), "console on a tty failed: {text}");
        assert!(
            text.contains("TTY-9") && text.contains("detached"),
            "tty console: {text}"
        );
    }

    // Pause and resume.
    lab.ferry_ok(&["vm", "pause", "web1"])?;
    assert_eq!(state(&lab, "web1")?.0, "paused");
    assert!(!lab.ping("10.77.0.10", 1), "paused guest answered");
    lab.ferry_ok(&["vm", "resume", "web1"])?;
    assert_eq!(state(&lab, "web1")?.0, "running");

    // The daemon crashes (SIGKILL) and comes back: the VM ran on and is re-adopted.
    lab.stop_daemon(true)?;
    assert!(
        pid_runs_qemu_of(pid, &lab.run_dir()),
        "QEMU died with the daemon"
    );
    assert!(
        lab.ping("10.77.0.10", 2),
        "guest unreachable while the daemon was down"
    );
    lab.start_daemon()?;
    let (st, pid2) = state(&lab, "web1")?;
    assert_eq!((st.as_str(), pid2), ("running", Some(pid as i64)));
    let hist = lab.ferry_ok(&["vm", "console", "web1", "--history"])?;
    assert!(
        hist.contains("FERRY-READY"),
        "console history lost over the restart"
    );
    let out = lab.guest_sh("web1", "echo AGAIN-$((7*7))")?;
    assert!(out.contains("AGAIN-49"), "console after restart: {out}");

    // A graceful daemon restart too.
    lab.stop_daemon(false)?;
    lab.start_daemon()?;
    assert_eq!(state(&lab, "web1")?.0, "running");

    // Deleting a running VM needs force.
    let o = lab.ferry(&["vm", "delete", "web1"])?;
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("running"));

    // ACPI shutdown: the guest powers off, the tap goes away.
    lab.ferry_ok(&["vm", "stop", "web1", "--timeout", "60"])?;
    let v = lab.ferry_json(&["vm", "show", "web1"])?;
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(!pid_runs_qemu_of(pid, &lab.run_dir()));
    assert!(lab.ip(&["link", "show", &tap]).is_err(), "tap left behind");

    // Events were kept.
    let ev = lab.ferry_json(&["events", "--vm", "web1"])?;
    let msgs: Vec<String> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        msgs.iter().any(|m| m.contains("stopped -> starting")),
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m.contains("re-adopted")), "{msgs:?}");

    lab.ferry_ok(&["vm", "delete", "web1"])?;
    assert!(lab.ferry(&["vm", "show", "web1"])?.status.code() == Some(1));
    Ok(())
}

#[test]
fn vm_dead_while_daemon_down_is_crashed_and_kill_reboot_work() -> Result<()> {
    let mut lab = lab()?;
    create_guest(
        &lab,
        "db1",
        "10.77.0.11",
        &["--nic", "bridge=br0,model=virtio"],
    )?;
    lab.ferry_ok(&["vm", "start", "db1"])?;
    lab.wait_console("db1", "FERRY-READY", BOOT)?;

    // Reboot: shutdown then start; a new QEMU boots the guest again.
    let (_, pid1) = state(&lab, "db1")?;
    lab.ferry_ok(&["vm", "reboot", "db1"])?;
    let (st, pid2) = state(&lab, "db1")?;
    assert_eq!(st, "running");
    assert_ne!(pid1, pid2);
    lab.wait_console("db1", "FERRY-READY", BOOT)?;

    // QEMU killed while the daemon runs: crashed.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid2.expect("a pid"))?),
        nix::sys::signal::SIGKILL,
    )?;
    let t = std::time::Instant::now();
    while state(&lab, "db1")?.0 != "crashed" && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = lab.ferry_json(&["vm", "show", "db1"])?;
    assert_eq!(v["state"], "crashed", "{v}");

    // Killed while the daemon is down: reported crashed after the restart, not lost.
    lab.ferry_ok(&["vm", "start", "db1"])?;
    let (_, pid3) = state(&lab, "db1")?;
    lab.stop_daemon(true)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid3.expect("a pid"))?),
        nix::sys::signal::SIGKILL,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    lab.start_daemon()?;
    let v = lab.ferry_json(&["vm", "show", "db1"])?;
    assert_eq!(v["state"], "crashed", "{v}");
    assert!(
        v["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("daemon was not running"),
        "{v}"
    );

    // Hard stop.
    lab.ferry_ok(&["vm", "start", "db1"])?;
    lab.ferry_ok(&["vm", "kill", "db1"])?;
    assert_eq!(state(&lab, "db1")?.0, "stopped");
    assert!(lab.qemu_pids().is_empty());

    // HA on a single host: a crash is restarted in place; a hard stop by the user is not.
    lab.ferry_ok(&["vm", "ha", "db1", "--ha", "restart"])?;
    lab.ferry_ok(&["vm", "start", "db1"])?;
    let (_, pid4) = state(&lab, "db1")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid4.expect("a pid"))?),
        nix::sys::signal::SIGKILL,
    )?;
    let t = std::time::Instant::now();
    loop {
        let (st, pid) = state(&lab, "db1")?;
        if st == "running" && pid != pid4 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "not restarted: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.wait_console("db1", "FERRY-READY", BOOT)?;
    lab.ferry_ok(&["vm", "kill", "db1"])?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(&lab, "db1")?.0, "stopped");
    Ok(())
}

#[test]
fn every_disk_bus_cdrom_nic_model_and_uefi_start_in_qemu() -> Result<()> {
    let lab = lab()?;
    lab.ferry_ok(&[
        "volume",
        "create",
        "local",
        "install.iso",
        "--size",
        "4M",
        "--format",
        "raw",
    ])?;
    // pc machine: virtio, SCSI, SATA (added AHCI) and IDE disks, IDE CD-ROM with an ISO, e1000.
    create_guest(
        &lab,
        "allbus",
        "10.77.0.12",
        &[
            "--disk",
            "bus=virtio,size=16M",
            "--disk",
            "bus=scsi,size=16M",
            "--disk",
            "bus=sata,size=16M",
            "--disk",
            "bus=ide,size=16M,cache=writeback",
            "--cdrom",
            "local/install.iso",
            "--nic",
            "bridge=br0,model=e1000",
        ],
    )?;
    lab.ferry_ok(&["vm", "start", "allbus"])?;
    lab.wait_console("allbus", "FERRY-READY", BOOT)?;
    // QEMU reports a block device for every disk: the metrics show their counters.
    let m = lab.metrics()?;
    for d in ["disk0", "disk1", "disk2", "disk3"] {
        assert!(
            m.contains(&format!(
                "ferry_vm_disk_read_bytes_total{{vm=\"allbus\",disk=\"{d}\"}}"
            )),
            "{d} missing:\n{m}"
        );
    }
    assert!(
        m.contains("ferry_vm_cpu_seconds_total{vm=\"allbus\"}"),
        "{m}"
    );
    // The guest (virtio drivers only) sees the virtio disk; the SCSI disk via virtio-scsi.
    let out = lab.guest_sh("allbus", "ls /sys/block | tr '\\n' ' '")?;
    assert!(out.contains("vda") && out.contains("sda"), "{out}");
    lab.ferry_ok(&["vm", "kill", "allbus"])?;

    // q35 with UEFI (OVMF) and SATA on the built-in AHCI.
    if std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists() {
        lab.ferry_ok(&[
            "vm",
            "create",
            "efi1",
            "--memory",
            "256M",
            "--machine",
            "q35",
            "--firmware",
            "uefi",
            "--disk",
            "bus=sata,size=16M",
            "--cdrom",
            "local/install.iso,bus=sata",
        ])?;
        lab.ferry_ok(&["vm", "start", "efi1"])?;
        assert_eq!(state(&lab, "efi1")?.0, "running");
        lab.ferry_ok(&["vm", "kill", "efi1"])?;
        let o = lab.ferry(&[
            "vm",
            "create",
            "efi2",
            "--memory",
            "256M",
            "--machine",
            "q35",
            "--disk",
            "bus=ide,size=16M",
        ])?;
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("q35 machine has no IDE"),
            "{o:?}"
        );
    }
    Ok(())
}

#[test]
fn websockets_stream_events_console_and_vnc() -> Result<()> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let lab = lab()?;
    create_guest(&lab, "ws1", "10.77.0.13", &[])?;
    // Over TCP nothing is trusted by address: the token goes along.
    let bearer = format!("Bearer {}", lab.token()?);
    let ws = |path: &str| -> Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut r = format!("ws://127.0.0.1:8470{path}").into_client_request()?;
        r.headers_mut().insert("authorization", bearer.parse()?);
        Ok(r)
    };
    ferry_lab::in_netns(&lab.ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let base = "127.0.0.1:8470";
                let (mut events, _) =
                    tokio_tungstenite::connect_async(ws("/api/v1/events/stream")?).await?;
                let c = reqwest::Client::new();
                let r = c
                    .post(format!("http://{base}/api/v1/vms/ws1/start"))
                    .header("authorization", &bearer)
                    .send()
                    .await?;
                assert_eq!(r.status().as_u16(), 202);
                let mut seen = vec![];
                while !seen
                    .iter()
                    .any(|m: &String| m.contains("starting -> running"))
                {
                    let m = tokio::time::timeout(Duration::from_secs(60), events.next())
                        .await?
                        .expect("event stream open")?;
                    let e: Value = serde_json::from_str(m.to_text()?)?;
                    seen.push(e["message"].as_str().unwrap_or("").to_string());
                }
                assert!(
                    seen.iter().any(|m| m.contains("stopped -> starting")),
                    "{seen:?}"
                );

                // The console websocket: history first, then live output; input is typed.
                let (mut con, _) =
                    tokio_tungstenite::connect_async(ws("/api/v1/vms/ws1/console")?).await?;
                let mut out = String::new();
                let t = std::time::Instant::now();
                while !out.contains("FERRY-READY") && t.elapsed() < BOOT {
                    if let Ok(Some(m)) =
                        tokio::time::timeout(Duration::from_secs(1), con.next()).await
                    {
                        out.push_str(&String::from_utf8_lossy(&m?.into_data()));
                    }
                }
                assert!(out.contains("FERRY-READY"), "{out}");
                con.send(Message::Text("echo WS-$((2+3))\n".into())).await?;
                while !out.contains("WS-5") && t.elapsed() < BOOT {
                    if let Ok(Some(m)) =
                        tokio::time::timeout(Duration::from_secs(1), con.next()).await
                    {
                        out.push_str(&String::from_utf8_lossy(&m?.into_data()));
                    }
                }
                assert!(out.contains("WS-5"), "{out}");

                // VNC over websocket: QEMU's RFB greeting comes through.
                let (mut vnc, _) =
                    tokio_tungstenite::connect_async(ws("/api/v1/vms/ws1/vnc")?).await?;
                let m = tokio::time::timeout(Duration::from_secs(10), vnc.next())
                    .await?
                    .expect("vnc open")?;
                let greeting = String::from_utf8_lossy(&m.into_data()).into_owned();
                assert!(greeting.starts_with("RFB 003.00"), "{greeting:?}");
                Ok::<_, anyhow::Error>(())
            })
    })??;
    lab.ferry_ok(&["vm", "kill", "ws1"])?;
    Ok(())
}

#[test]
fn bridges_made_by_ferry_keep_their_mac_when_ports_join() -> Result<()> {
    let lab = lab()?;
    lab.ferry_ok(&["net", "bridge", "create", "vmbr9"])?;
    let mac = |dev: &str| -> Result<String> {
        let o = lab.ip(&["-br", "link", "show", dev])?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string())
    };
    let before = mac("vmbr9")?;
    // A port with a lower MAC than the bridge's would take over an unset bridge MAC.
    lab.ip(&[
        "link",
        "add",
        "lowport",
        "address",
        "00:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "name",
        "lowpeer",
    ])?;
    lab.ip(&["link", "set", "lowport", "master", "vmbr9", "up"])?;
    assert_eq!(mac("vmbr9")?, before);
    assert_ne!(before, "00:00:00:00:00:01");
    Ok(())
}

/// A `host stop-all`/`start-all` report's steps as `vm:action` (a report that is not
/// one is an error).
fn steps(report: &Value) -> Result<Vec<String>> {
    let r: ferry_types::HostPowerReport = serde_json::from_value(report.clone())
        .with_context(|| format!("not a host power report: {report}"))?;
    Ok(r.steps
        .into_iter()
        .map(|s| format!("{}:{}", s.vm, s.action))
        .collect())
}

/// Each VM is in the state given.
fn assert_states(lab: &Lab, want: &[(&str, &str)]) -> Result<()> {
    for (vm, st) in want {
        assert_eq!(state(lab, vm)?.0, *st, "{vm}");
    }
    Ok(())
}

/// The result of the daemon's `host.boot` task once it ended.
fn boot_task(lab: &Lab) -> Result<Value> {
    let mut found = None;
    ferry_lab::wait_for("the boot task to end", Duration::from_secs(240), || {
        let tasks = lab.ferry_json(&["task", "list"])?;
        found = tasks
            .as_array()
            .and_then(|a| a.iter().find(|t| t["kind"] == "host.boot").cloned());
        Ok(found.as_ref().is_some_and(|t| t["state"] != "running"))
    })?;
    let t = found.context("no boot task")?;
    anyhow::ensure!(t["state"] == "succeeded", "boot task: {t}");
    Ok(t["result"].clone())
}

#[test]
fn host_shutdown_and_boot_follow_each_vms_startup_policy() -> Result<()> {
    let mut lab = lab()?;
    // db starts first and stops last; app is suspended by the shutdown and resumes at
    // boot without autostart; misc has no policy; late is autostart but stopped now.
    let nic = ["--nic", "bridge=br0"];
    let with = |extra: &[&'static str]| [&nic[..], extra].concat();
    create_guest(
        &lab,
        "db",
        "10.77.0.61",
        &with(&["--autostart", "on", "--startup", "order=1,up=2,down=60"]),
    )?;
    create_guest(
        &lab,
        "app",
        "10.77.0.62",
        &with(&["--startup", "order=2", "--on-host-shutdown", "suspend"]),
    )?;
    create_guest(&lab, "misc", "10.77.0.63", &with(&[]))?;
    create_guest(&lab, "late", "10.77.0.64", &with(&["--autostart", "on"]))?;
    let shown = lab.ferry_json(&["vm", "show", "db"])?;
    assert_eq!(shown["spec"]["startup"]["order"], 1, "{shown}");
    for vm in ["db", "app", "misc"] {
        lab.ferry_ok(&["vm", "start", vm])?;
    }
    for vm in ["db", "app", "misc"] {
        lab.wait_console(vm, "FERRY-READY", BOOT)?;
    }
    // The policy changes while the VM runs (the rest of a definition does not).
    lab.ferry_ok(&["vm", "edit", "misc", "--startup", "down=30"])?;
    let o = lab.ferry(&["vm", "edit", "misc", "--cpus", "2"])?;
    assert!(!o.status.success(), "a running VM's CPUs changed");
    lab.guest_sh("app", "echo kept-in-ram > /tmp/marker")?;

    // The host's shutdown: unordered first, then the highest order; nothing crashes.
    let report = lab.ferry_json(&["host", "stop-all"])?;
    assert_eq!(
        steps(&report)?,
        ["misc:shutdown", "app:suspend", "db:shutdown"],
        "{report}"
    );
    assert_states(
        &lab,
        &[("db", "stopped"), ("app", "suspended"), ("misc", "stopped")],
    )?;
    assert!(lab.qemu_pids().is_empty(), "a QEMU runs after stop-all");
    let o = lab.ferry(&["vm", "start", "late"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("shutting"), "{err}");
    let host = lab.ferry_json(&["host"])?;
    assert_eq!(host["shutting_down"], true, "{host}");

    // The machine boots again: the daemon's first start in the new boot starts db
    // (autostart, order 1), resumes app (order 2) and starts late (no order); misc
    // stays stopped.
    lab.stop_daemon(false)?;
    lab.new_boot()?;
    lab.start_daemon()?;
    let report = boot_task(&lab)?;
    assert_eq!(
        steps(&report)?,
        ["db:start", "app:resume", "late:start"],
        "{report}"
    );
    assert_states(
        &lab,
        &[
            ("db", "running"),
            ("app", "running"),
            ("late", "running"),
            ("misc", "stopped"),
        ],
    )?;
    // app went on where it was: its RAM came back from the suspend file.
    assert_eq!(lab.guest_sh("app", "cat /tmp/marker")?, "kept-in-ram");
    let misc = lab.ferry_json(&["vm", "show", "misc"])?;
    assert_ne!(misc["state"], "crashed", "{misc}");

    // A daemon restart in the same boot starts nothing again.
    lab.ferry_ok(&["vm", "stop", "late"])?;
    lab.stop_daemon(false)?;
    lab.start_daemon()?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&lab, "late")?.0, "stopped");

    // Power lost: the daemon and every QEMU die at once. At the next boot the VMs that
    // ran are reported as crashed with the host; the autostart ones start again.
    lab.ferry_ok(&["vm", "start", "late"])?;
    lab.wait_console("late", "FERRY-READY", BOOT)?;
    let pids = lab.qemu_pids();
    assert_eq!(pids.len(), 3, "db, app, late should run: {pids:?}");
    lab.stop_daemon(true)?;
    for p in &pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGKILL)?;
    }
    ferry_lab::wait_for("the QEMUs to end", Duration::from_secs(10), || {
        Ok(lab.qemu_pids().is_empty())
    })?;
    lab.new_boot()?;
    lab.start_daemon()?;
    let report = boot_task(&lab)?;
    assert_eq!(steps(&report)?, ["db:start", "late:start"], "{report}");
    let app = lab.ferry_json(&["vm", "show", "app"])?;
    assert_eq!(app["state"], "crashed", "{app}");
    assert!(
        app["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("host went down")),
        "{app}"
    );
    Ok(())
}
