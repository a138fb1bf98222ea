//! Attacks on a host, tried as an attacker would against real QEMU and the real daemon:
//! each of these tests failed on the code before the hole was closed.

use anyhow::{ensure, Context, Result};
use ferry_lab::Lab;
use std::path::Path;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);
const SECRET: &str = "FERRY-HOST-SECRET-7f3a";

/// A guest owns the bytes of its raw disk, so it can write a qcow2 header naming a host
/// file as the disk's backing file. If the next start let QEMU (or `qemu-img info`) probe
/// the format, the guest would read that host file through its disk. The format is
/// ferry's record, so the header stays data: the host file is never opened and the guest
/// sees the bytes it wrote.
#[test]
fn a_qcow2_header_written_into_a_raw_disk_opens_no_host_file() -> Result<()> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let secret = lab.state_dir().join("host-secret");
    std::fs::write(&secret, SECRET.repeat(1 << 14))?;
    let vm = lab.create_test_vm(
        "probe",
        "10.77.0.20",
        &["--disk", "bus=virtio,size=16M,format=raw"],
    )?;
    let vol = lab
        .state_dir()
        .join(format!("pools/local/vm-{}-disk-0", vm["id"]));
    ensure!(vol.is_file(), "no volume at {}", vol.display());
    // What the guest could write with dd: the header `qemu-img create` makes.
    std::fs::remove_file(&vol)?;
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&vol)
        .arg("16M")
        .status()?;
    ensure!(made.success(), "qemu-img create");

    let listed = lab.ferry_json(&["volume", "list", "local"])?;
    let v = listed
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vol_name(&vol)))
        .cloned()
        .unwrap_or_default();
    ensure!(v["format"] == "raw", "volume listed as {v}");

    lab.ferry_ok(&["vm", "start", "probe"])?;
    lab.wait_console("probe", "FERRY-READY", BOOT)?;
    let (_, pid) = lab.vm_state("probe")?;
    let pid = pid.expect("running VM has a pid");
    // QEMU runs under its seccomp filter (mode 2).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
        "QEMU {pid} runs without seccomp: {status}"
    );
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let target = std::fs::read_link(fd?.path()).unwrap_or_default();
        ensure!(target != secret, "QEMU {pid} holds the host file open");
    }
    let out = lab.guest_sh(
        "probe",
        &format!("echo HEAD-$(head -c 3 /dev/vda); echo COUNT-$(grep -c {SECRET} /dev/vda)"),
    )?;
    ensure!(
        out.contains("HEAD-QFI"),
        "guest does not see its own bytes: {out}"
    );
    ensure!(out.contains("COUNT-0"), "guest reads the host file: {out}");
    lab.ferry_ok(&["vm", "kill", "probe"])?;
    Ok(())
}

fn vol_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A guest on a host's bridge takes another cluster host's address (and could take its
/// MAC) and calls the API without credentials: before, the host trusted that address
/// and the guest could list VMs and make a pool on `/etc` — root on the host. Now no
/// address is trusted: 401, and nothing is made. The same from the host itself over
/// loopback (an SSH tunnel, a local user, a page doing DNS rebinding): 401.
#[test]
fn a_guest_with_a_hosts_address_gets_nothing_from_the_api() -> Result<()> {
    // A static cluster: its hosts trusted each other's listed addresses the same way as
    // an etcd cluster's, and taking h2's address does not cost h1 its quorum.
    let lab = ferry_lab::ClusterLab::for_test_with(
        env!("CARGO_BIN_EXE_ferry"),
        2,
        ferry_lab::LabOptions {
            etcd: false,
            ..Default::default()
        },
    )?;
    let h1 = lab.cli("h1")?;
    let h2_addr = lab.host("h2")?.addr.clone();
    let h1_addr = lab.host("h1")?.addr.clone();
    let vm = h1.boot_vm("intruder", "10.78.0.120", &[])?;
    let mac = vm["spec"]["nics"][0]["mac"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api = format!("https://{h1_addr}:{}", ferry_lab::API_PORT);
    let plain = format!("http://{h1_addr}:{}", ferry_lab::API_PORT);
    // The guest takes h2's address; h1 believes it (what a gratuitous ARP from the guest
    // achieves, made certain here so the request really arrives from that address).
    h1.guest_sh(
        "intruder",
        &format!("ip addr del 10.78.0.120/24 dev eth0; ip addr add {h2_addr}/24 dev eth0; echo ok"),
    )?;
    let ns = lab.host("h1")?.ns.clone();
    let neigh = std::process::Command::new("ip")
        .args(["-n", &ns, "neigh", "replace", &h2_addr, "lladdr", &mac])
        .args(["dev", "br0", "nud", "permanent"])
        .status()?;
    ensure!(neigh.success(), "ip neigh replace");
    let out = h1.guest_sh(
        "intruder",
        &format!(
            "busybox wget -q -O - {plain}/api/v1/vms 2>&1 | head -c 300; echo; \
             busybox wget -q -O - --header 'content-type: application/json' \
               --post-data '{{\"name\":\"etc\",\"kind\":\"dir\",\"path\":\"/etc\"}}' \
               {plain}/api/v1/pools 2>&1 | head -c 300; echo END"
        ),
    )?;
    let _ = std::process::Command::new("ip")
        .args(["-n", &ns, "neigh", "del", &h2_addr, "dev", "br0"])
        .status();
    ensure!(
        out.contains("END"),
        "the guest's shell did not finish: {out}"
    );
    ensure!(
        !out.contains("\"spec\""),
        "the guest read the VM list: {out}"
    );
    let pools = h1.ferry_json(&["pool", "list"])?;
    ensure!(
        !pools.to_string().contains("\"/etc\""),
        "a pool on /etc was made: {pools}"
    );
    // A process on h1 itself, over TCP (loopback and its own address alike), with an
    // HTTPS client but neither a token nor a certificate of the cluster: 401.
    let curl = |args: &[&str], url: &str| -> Result<String> {
        let o = h1
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .arg(url)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    for url in [
        format!("{api}/api/v1/vms"),
        format!("https://127.0.0.1:{}/api/v1/vms", ferry_lab::API_PORT),
    ] {
        let code = curl(&["-k"], &url)?;
        ensure!(
            code == "401" || code == "000",
            "{url} answered {code} without credentials"
        );
    }
    // A certificate of another CA (any host can make one): refused at the handshake.
    let other = tempfile::tempdir()?;
    let rogue = ferry_pki::HostPki::ensure(other.path(), "h2", &[h2_addr.parse()?])?;
    let (c, k) = (rogue.cert_path(), rogue.key_path());
    let code = curl(
        &[
            "-k",
            "--cert",
            c.to_str().unwrap(),
            "--key",
            k.to_str().unwrap(),
        ],
        &format!("{api}/api/v1/vms"),
    )?;
    ensure!(
        code != "200",
        "a foreign CA's certificate was let in ({code})"
    );
    // h2's real certificate: h1 knows h2 by it (how the hosts call each other).
    let h2pki = lab.state_dir("h2").join(ferry_pki::PKI_DIR);
    let code = curl(
        &[
            "--cacert",
            lab.ca_file().to_str().unwrap(),
            "--cert",
            h2pki.join("host.crt").to_str().unwrap(),
            "--key",
            h2pki.join("host.key").to_str().unwrap(),
        ],
        &format!("{api}/api/v1/vms"),
    )?;
    ensure!(code == "200", "h2's certificate was refused ({code})");
    h1.ferry_ok(&["vm", "kill", "intruder"])?;
    Ok(())
}

/// A guest that changes its MAC (to take another machine's place on the bridge) sends
/// nothing more: its tap drops every frame whose source is not the NIC's MAC.
#[test]
fn a_guest_sends_only_from_its_own_mac() -> Result<()> {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    lab.boot_vm("mac", "10.77.0.21", &[])?;
    let own = lab.guest_sh("mac", "ping -c 2 -W 2 10.77.0.1 >/dev/null && echo REACHED")?;
    ensure!(
        own.contains("REACHED"),
        "the guest cannot reach the host: {own}"
    );
    let out = lab.guest_sh(
        "mac",
        "ip link set eth0 down; ip link set eth0 address 52:54:00:de:ad:01; ip link set eth0 up; \
         ping -c 3 -W 2 10.77.0.1 >/dev/null && echo REACHED || echo BLOCKED",
    )?;
    ensure!(
        out.contains("BLOCKED"),
        "a foreign source MAC got through: {out}"
    );
    lab.ferry_ok(&["vm", "kill", "mac"])?;
    // The tap's rule goes with the tap.
    let rules = lab
        .cmd("nft")
        .args(["list", "table", "bridge", "ferry"])
        .output()?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    ensure!(
        !rules.contains("chain tap"),
        "a rule outlived its tap: {rules}"
    );
    Ok(())
}

/// In an etcd cluster every link is TLS with the cluster's certificates: etcd refuses a
/// client without one, a host knows another by its certificate, and a certificate that
/// belongs to no current member — renewed since, or of a host that left — is refused.
#[test]
fn certificates_of_renewed_or_departed_hosts_are_refused() -> Result<()> {
    let lab = ferry_lab::ClusterLab::for_test(env!("CARGO_BIN_EXE_ferry"), 2)?;
    let h1 = lab.cli("h1")?;
    let h2 = lab.cli("h2")?;
    let api = lab.host("h1")?.api();
    let h1_addr = lab.host("h1")?.addr.clone();
    let keep = tempfile::tempdir()?;
    let save = |name: &str| -> Result<(String, String)> {
        let src = lab.state_dir("h2").join(ferry_pki::PKI_DIR);
        let c = keep.path().join(format!("{name}.crt"));
        let k = keep.path().join(format!("{name}.key"));
        std::fs::copy(src.join("host.crt"), &c)?;
        std::fs::copy(src.join("host.key"), &k)?;
        Ok((c.display().to_string(), k.display().to_string()))
    };
    let ca = lab.ca_file().display().to_string();
    // As h2 (its certificate), from h1's namespace: what h2's daemon does.
    let as_h2 = |cert: &(String, String)| -> Result<String> {
        let o = h1
            .cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
            ])
            .args(["--cert", &cert.0, "--key", &cert.1])
            .arg(format!("{api}/api/v1/vms"))
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    // etcd: TLS only, and only with a certificate of the cluster.
    let etcd = format!("https://{h1_addr}:2379/v3/kv/range");
    let o = h1
        .cmd("curl")
        .args([
            "-s",
            "-k",
            "-X",
            "POST",
            "-d",
            r#"{"key":"Lw==","range_end":"MA=="}"#,
        ])
        .arg(&etcd)
        .output()?;
    let body = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        !body.contains("\"kvs\""),
        "etcd answered without a certificate: {body}"
    );
    let o = h1
        .cmd("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-d",
            r#"{"key":"Lw==","range_end":"MA=="}"#,
        ])
        .arg(etcd.replace("https://", "http://"))
        .output()?;
    let body = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        !body.contains("\"kvs\""),
        "etcd answered plain HTTP: {body}"
    );

    // etcd through etcdctl with h2's certificate: what h2's daemon can do there.
    let etcd_at = |at: &str, cert: &(String, String)| -> Result<bool> {
        let o = h1
            .cmd("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &format!("https://{at}:2379")])
            .args(["--cacert", &ca, "--cert", &cert.0, "--key", &cert.1])
            .args(["--dial-timeout", "3s", "--command-timeout", "3s"])
            .args(["get", "--prefix", "--keys-only", "/ferry/cluster/members/"])
            .output()?;
        Ok(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("members/h1"))
    };
    let etcd_as = |cert: &(String, String)| etcd_at(&h1_addr, cert);
    let h2_addr = lab.host("h2")?.addr.clone();
    // Refused: by the API (401: not a member's current certificate) or already in
    // the handshake (000: the revocation list names it).
    let refused_tls = |code: &str| code == "401" || code == "000";
    let first = save("first")?;
    ensure!(as_h2(&first)? == "200", "h2's certificate was refused");
    ensure!(etcd_as(&first)?, "etcd refused h2's certificate");
    // h2's migration identity (whose key QEMU holds while it migrates) opens neither
    // the API nor etcd.
    let pki2 = lab.state_dir("h2").join(ferry_pki::PKI_DIR);
    let mig = (
        pki2.join("migration.crt").display().to_string(),
        pki2.join("migration.key").display().to_string(),
    );
    ensure!(Path::new(&mig.0).is_file(), "h2 made no migration identity");
    let code = as_h2(&mig)?;
    ensure!(
        code != "200",
        "the API took h2's migration certificate: {code}"
    );
    ensure!(!etcd_as(&mig)?, "etcd took h2's migration certificate");
    // Renewed: the old certificate is refused, the new one works.
    let st = h2.ferry_json(&["cluster", "certs", "renew"])?;
    ensure!(st["host"]["serial"].is_string(), "{st}");
    std::thread::sleep(Duration::from_secs(4));
    let second = save("second")?;
    ensure!(
        as_h2(&second)? == "200",
        "h2's renewed certificate was refused"
    );
    ensure!(
        refused_tls(&as_h2(&first)?),
        "h2's old certificate still works after the renewal"
    );
    // etcd knows hosts by the CN (h2 still has its user there): the revocation list
    // h1 signs keeps the old certificate out.
    let crl_lists = |serial: &str| -> Result<bool> {
        let st = h1.ferry_json(&["cluster", "certs", "status"])?;
        Ok(st["revoked"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s == serial)))
    };
    let first_serial = ferry_pki::serial_pem(&std::fs::read_to_string(&first.0)?)?;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !crl_lists(&first_serial)? {
        ensure!(
            std::time::Instant::now() < until,
            "h1's revocation list does not name h2's renewed certificate"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure!(
        !etcd_as(&first)?,
        "etcd still takes h2's certificate from before the renewal"
    );
    // And the API's handshake refuses it now (not only the member check after it).
    ensure!(
        as_h2(&first)? == "000",
        "the API's TLS took a certificate its revocation list names"
    );
    ensure!(etcd_as(&second)?, "etcd refused h2's renewed certificate");
    // The loops behind it show how they fare (ferry host status).
    let tasks = h1.ferry_json(&["host", "status"])?;
    for name in ["lease", "revocation-list", "ha-local"] {
        let t = tasks
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == name))
            .with_context(|| format!("no background task {name}: {tasks}"))?;
        ensure!(
            t["runs"].as_u64().is_some_and(|r| r > 0) && t["last_ok_ms"].is_u64(),
            "background task {name} never ran well: {t}"
        );
    }
    // The cluster still works across both hosts with the new certificate.
    let hosts = h1.ferry_json(&["cluster", "status"])?;
    ensure!(
        hosts["members"].as_array().map(Vec::len) == Some(2),
        "{hosts}"
    );
    // h1 forwards to h2 over mutual TLS (h2 now shows its renewed certificate).
    let hosts = h1.ferry_json(&["host", "list"])?;
    let h2_info = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["host"]["name"] == "h2"))
        .map(|h| h["info"].clone());
    ensure!(
        h2_info.as_ref().is_some_and(|i| i.is_object()),
        "h1 cannot reach h2: {hosts}"
    );
    // The founder holds the CA key: it may not leave before the others.
    h1.ferry_fails(&["cluster", "leave"], "leaves last")?;
    // Departed: h2 leaves; its certificate is refused.
    h2.ferry_ok(&["cluster", "leave"])?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        refused_tls(&as_h2(&second)?),
        "a departed host's certificate still works"
    );
    ensure!(
        !etcd_as(&second)?,
        "a departed host's certificate still opens etcd"
    );
    // h2 joins again under its name (etcd gives the name a user again): its old
    // certificate stays out, the new one works.
    lab.join_host("h2", false)?;
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let third = loop {
        if let Ok(st) = h2.ferry_json(&["cluster", "certs", "status"]) {
            if st["crl_number"].as_u64().is_some() {
                break save("third")?;
            }
        }
        ensure!(std::time::Instant::now() < until, "h2 did not come back");
        std::thread::sleep(Duration::from_millis(500));
    };
    ensure!(etcd_as(&third)?, "etcd refused h2's new certificate");
    // On both members: h2's own, new etcd got the list with its certificate.
    for at in [&h1_addr, &h2_addr] {
        ensure!(
            !etcd_at(at, &second)?,
            "h2's certificate from before it left opens etcd on {at} after it rejoined"
        );
    }
    ensure!(
        refused_tls(&as_h2(&second)?),
        "h2's certificate from before it left opens the API after it rejoined"
    );
    let second_serial = ferry_pki::serial_pem(&std::fs::read_to_string(&second.0)?)?;
    ensure!(
        crl_lists(&second_serial)?,
        "the list does not name the departed certificate"
    );
    Ok(())
}

/// An admin's own certificate (`--tls-cert/--tls-key`): browsers and CLIs that ask for
/// the site's name get it; the other hosts (and a host joining) still get the host
/// certificate of the cluster CA, so the cluster forms and works as before.
#[test]
fn an_admin_certificate_serves_people_while_hosts_keep_theirs() -> Result<()> {
    let site_dir = tempfile::tempdir()?;
    let site = ferry_pki::HostPki::ensure(site_dir.path(), "ferry.example", &[])?;
    let mut serve_args = std::collections::BTreeMap::new();
    serve_args.insert(
        "h1".to_string(),
        vec![
            "--tls-cert".to_string(),
            site.cert_path().display().to_string(),
            "--tls-key".to_string(),
            site.key_path().display().to_string(),
        ],
    );
    // h2 joins through h1 (no name asked: the host certificate, pinned by fingerprint).
    let lab = ferry_lab::ClusterLab::for_test_with(
        env!("CARGO_BIN_EXE_ferry"),
        2,
        ferry_lab::LabOptions {
            serve_args,
            ..Default::default()
        },
    )?;
    let h1 = lab.cli("h1")?;
    let addr = lab.host("h1")?.addr.clone();
    let site_ca = site.ca_path().display().to_string();
    let code = |args: &[&str]| -> Result<String> {
        let o = h1
            .cmd("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    // A browser at the site's name, trusting the site's CA only.
    let at = format!("ferry.example:8470:{addr}:8470");
    ensure!(
        code(&[
            "--cacert",
            &site_ca,
            "--connect-to",
            &at,
            "https://ferry.example:8470/api/v1/session"
        ])? == "200",
        "the site's certificate was not served"
    );
    // The same client at the host's address gets the cluster's certificate, which the
    // site's CA does not vouch for.
    ensure!(
        code(&[
            "--cacert",
            &site_ca,
            &format!("https://{addr}:8470/api/v1/session")
        ])? == "000",
        "the site's CA accepted the host certificate"
    );
    // The hosts still reach each other.
    let hosts = h1.ferry_json(&["host", "list"])?;
    ensure!(
        hosts
            .as_array()
            .is_some_and(|a| a.iter().all(|h| h["info"].is_object()) && a.len() == 2),
        "the hosts do not reach each other: {hosts}"
    );
    Ok(())
}

/// Users over HTTPS in a cluster, as people use them: root (on a host's socket) makes
/// users and grants; they log in from elsewhere with a password or call with a token;
/// an Operator cannot delete a pool, an Auditor cannot start a VM; one login is good on
/// every host; what they do carries their name, on the host that did it too.
#[test]
fn users_log_in_and_are_held_to_their_grants() -> Result<()> {
    let lab = ferry_lab::ClusterLab::for_test(env!("CARGO_BIN_EXE_ferry"), 2)?;
    let h1 = lab.cli("h1")?;
    let h2 = lab.cli("h2")?;
    let home = tempfile::tempdir()?;
    let pw = home.path().join("pw");
    std::fs::write(&pw, "alice-password-1\n")?;
    let pw_s = pw.display().to_string();
    h1.ferry_ok(&["user", "add", "alice", "--password-file", &pw_s])?;
    h1.ferry_ok(&["user", "add", "bob"])?;
    h1.ferry_ok(&["acl", "grant", "Operator", "/", "alice"])?;
    h1.ferry_ok(&["acl", "grant", "Auditor", "/", "bob"])?;
    h1.ferry_fails(&["acl", "grant", "Operator", "/etc", "bob"], "not a path")?;
    h1.ferry_fails(&["acl", "grant", "Owner", "/", "bob"], "role Owner")?;
    let made = h1.ferry_json(&["token", "create", "bob", "ro"])?;
    let bob_token = home.path().join("bob.token");
    let value = made["value"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no token value in {made}"))?;
    std::fs::write(&bob_token, value)?;
    // Users and grants are the cluster's: h2 lists what h1 made.
    let users = h2.ferry_json(&["user", "list"])?;
    ensure!(
        users.as_array().is_some_and(|u| u.len() == 3),
        "h2 sees other users: {users}"
    );
    h1.boot_vm("t1", "10.78.0.150", &[])?;
    h1.ferry_ok(&["vm", "kill", "t1"])?;
    h2.create_test_vm("t2", "10.78.0.151", &[])?;

    let ca = lab.ca_file().display().to_string();
    let server = |h: &str| -> Result<String> { Ok(lab.host(h)?.api()) };
    // The CLI from elsewhere (a client namespace), with its own HOME for the session.
    let remote = |h: &str, args: &[&str]| -> Result<std::process::Output> {
        Ok(lab
            .client_cmd(env!("CARGO_BIN_EXE_ferry"))
            .env("HOME", home.path())
            .env_remove("FERRY_TOKEN")
            .args(["--server", &server(h)?, "--ca", &ca])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()?)
    };
    let ok = |h: &str, args: &[&str]| -> Result<String> {
        let o = remote(h, args)?;
        ensure!(
            o.status.success(),
            "ferry {args:?} on {h}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let refused = |h: &str, args: &[&str], needle: &str| -> Result<()> {
        let o = remote(h, args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(
            !o.status.success() && err.contains(needle),
            "ferry {args:?} on {h}: {err}"
        );
        Ok(())
    };
    // Nobody logged in: nothing.
    refused("h1", &["vm", "list"], "401")?;
    let wrong = home.path().join("wrong");
    std::fs::write(&wrong, "not-her-password")?;
    let wrong_s = wrong.display().to_string();
    refused(
        "h1",
        &["login", "--user", "alice", "--password-file", &wrong_s],
        "Wrong user name or password",
    )?;
    ok(
        "h1",
        &["login", "--user", "alice", "--password-file", &pw_s],
    )?;
    let kept = std::fs::metadata(home.path().join(".config/ferry/sessions.json"))?;
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&kept.permissions()) & 0o077 == 0,
        "the session file is readable by others"
    );
    // An Operator starts VMs but cannot delete a pool or make a VM.
    ok("h1", &["vm", "start", "t1"])?;
    refused("h1", &["pool", "delete", "shared"], "may not")?;
    refused(
        "h1",
        &["vm", "create", "nope", "--memory", "64M"],
        "may not",
    )?;
    ensure!(
        h1.ferry_ok(&["pool", "list"])?.contains("shared"),
        "a refused delete changed something"
    );
    // Her ticket from h1 is good on h2 (one cluster, one key).
    let sessions: serde_json::Value = serde_json::from_slice(&std::fs::read(
        home.path().join(".config/ferry/sessions.json"),
    )?)?;
    let ticket = sessions[server("h1")?.as_str()]["ticket"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("ferry login kept no ticket: {sessions}"))?
        .to_string();
    let ticket_file = home.path().join("ticket");
    std::fs::write(&ticket_file, &ticket)?;
    ok(
        "h2",
        &[
            "--token-file",
            &ticket_file.display().to_string(),
            "vm",
            "list",
        ],
    )?;
    // An Auditor reads and cannot start a VM.
    let bob_s = bob_token.display().to_string();
    ok("h2", &["--token-file", &bob_s, "vm", "list"])?;
    refused(
        "h1",
        &["--token-file", &bob_s, "vm", "kill", "t1"],
        "may not",
    )?;
    ensure!(
        h1.vm_state("t1")?.0 == "running",
        "the Auditor's kill did something"
    );
    // Who did it: alice's start on h1, and through h1 on h2 (the web UI's path).
    let task = h1
        .ferry_json(&["task", "list"])?
        .as_array()
        .and_then(|a| a.iter().find(|t| t["kind"] == "vm.start").cloned())
        .ok_or_else(|| anyhow::anyhow!("no vm.start task on h1"))?;
    ensure!(task["user"] == "alice", "the start is not alice's: {task}");
    let o = lab
        .client_cmd("curl")
        .args(["-s", "-w", "%{http_code}", "--cacert", &ca])
        .args(["-X", "POST", "-H"])
        .arg(format!("Authorization: Bearer {ticket}"))
        .arg(format!(
            "{}/api/v1/nodes/h2/api/v1/vms/t2/start",
            server("h1")?
        ))
        .output()?;
    let code = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(code.ends_with("202"), "alice's start through h1: {code}");
    let mut by = None;
    for _ in 0..50 {
        let ev = h2.ferry_json(&["events", "--vm", "t2"])?;
        by = ev
            .as_array()
            .and_then(|a| {
                a.iter().find(|e| {
                    e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("vm.start started"))
                })
            })
            .map(|e| e["user"].clone());
        if by.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        by == Some(serde_json::json!("alice")),
        "h2 did not record alice: {by:?}"
    );
    h2.ferry_ok(&["vm", "kill", "t2"])?;
    // Through the proxy, a path that another host would resolve elsewhere (escaped
    // dot segments) is refused here, and no grant is made.
    let grant = r#"{"path":"/","user":"alice","role":"Administrator"}"#;
    for sneaky in [
        "/api/v1/nodes/h2/api/v1/vms/t2/snapshots/..%2F..%2F..%2Faccess%2Facl%3F/revert",
        "/api/v1/nodes/h2/api/v1/vms/t2/../../access/acl",
    ] {
        let o = lab
            .client_cmd("curl")
            .args(["-s", "--path-as-is", "-w", "%{http_code}", "--cacert", &ca])
            .args([
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                grant,
                "-H",
            ])
            .arg(format!("Authorization: Bearer {ticket}"))
            .arg(format!("{}{sneaky}", server("h1")?))
            .output()?;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        ensure!(
            out.ends_with("403") || out.ends_with("400"),
            "{sneaky}: {out}"
        );
    }
    let acl = h1.ferry_json(&["acl", "list"])?;
    ensure!(
        !acl.to_string().contains("Administrator"),
        "alice made herself Administrator: {acl}"
    );
    // Her logout ends the ticket on every host, not only in her CLI's file.
    ok("h1", &["logout"])?;
    refused(
        "h2",
        &[
            "--token-file",
            &ticket_file.display().to_string(),
            "vm",
            "list",
        ],
        "401",
    )?;
    // Revoked: refused at once, on every host; a deleted user's session ends.
    h1.ferry_ok(&["token", "revoke", "bob", "ro"])?;
    refused("h2", &["--token-file", &bob_s, "vm", "list"], "401")?;
    h2.ferry_ok(&["user", "delete", "alice"])?;
    refused("h1", &["vm", "list"], "401")?;
    Ok(())
}

/// Each VM's QEMU is a user of its own (no capabilities, no new privileges, seccomp
/// filter on), and that user reaches its own VM's files only: not another VM's disk,
/// not the host's key or admin token. (Before, every QEMU ran as root.)
#[test]
fn each_vms_qemu_runs_as_its_own_user_and_reaches_only_its_files() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_ferry"))?;
    lab.start_daemon()?;
    let gid = nix::unistd::Group::from_name("ferry-qemu")?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| anyhow::anyhow!("no group ferry-qemu (scripts/setup.sh)"))?;
    let mut vms = vec![];
    for (name, ip) in [("qa", "10.77.0.21"), ("qb", "10.77.0.22")] {
        let vm = lab.create_test_vm(name, ip, &["--disk", "bus=virtio,size=16M,format=raw"])?;
        lab.ferry_ok(&["vm", "start", name])?;
        lab.wait_console(name, "FERRY-READY", BOOT)?;
        let id = vm["id"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| anyhow::anyhow!("no VM id in {vm}"))?;
        let pid = lab.vm_state(name)?.1.expect("a running VM has a pid");
        let vol = lab.state_dir().join(format!("pools/local/vm-{id}-disk-0"));
        vms.push((name, 1_900_000_000 + id, pid, vol));
    }
    for (name, uid, pid, vol) in &vms {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |k: &str| -> Vec<String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        ensure!(
            field("Uid:") == vec![uid.to_string(); 4],
            "{name}'s QEMU runs as {:?}, not {uid}",
            field("Uid:")
        );
        ensure!(
            field("Gid:") == vec![gid.to_string(); 4],
            "{name}: gid {:?}",
            field("Gid:")
        );
        ensure!(
            !field("Groups:").contains(&"0".to_string()),
            "{name} keeps root's group"
        );
        for (k, want) in [
            ("Seccomp:", "2"),
            ("NoNewPrivs:", "1"),
            ("CapEff:", "0000000000000000"),
        ] {
            ensure!(
                field(k) == vec![want.to_string()],
                "{name}: {k} {:?}",
                field(k)
            );
        }
        let m = std::fs::metadata(vol)?;
        ensure!(
            m.uid() == *uid && m.mode() & 0o777 == 0o600,
            "{name}'s disk is {}:{} {:o}",
            m.uid(),
            m.gid(),
            m.mode()
        );
    }
    // As qa's QEMU user: its own disk opens; qb's disk, the host key and the admin
    // token do not.
    let (_, uid_a, _, vol_a) = &vms[0];
    let (_, _, _, vol_b) = &vms[1];
    let read_as = |path: &Path| -> Result<bool> {
        Ok(std::process::Command::new("setpriv")
            .arg(format!("--reuid={uid_a}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .args(["head", "-c", "1"])
            .arg(path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?
            .success())
    };
    ensure!(
        read_as(vol_a)?,
        "qa's user cannot read its own disk (the check is broken)"
    );
    for other in [
        vol_b.clone(),
        lab.state_dir().join("admin-token"),
        lab.state_dir().join(ferry_pki::PKI_DIR).join("host.key"),
    ] {
        ensure!(
            !read_as(&other)?,
            "qa's QEMU user reads {}",
            other.display()
        );
    }
    for (name, ..) in &vms {
        lab.ferry_ok(&["vm", "kill", name])?;
    }
    Ok(())
}
