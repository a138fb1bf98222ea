//! Turning command-line options (`--disk bus=virtio,size=10G`) into the JSON of a VmSpec.
//! Unknown keys are passed through, so the daemon's validation names them.

use crate::SpecArgs;
use anyhow::{bail, Context, Result};
use ferry_types::{ByteSize, VmSpec};
use serde_json::{json, Map, Value};

/// `k=v,k=v,flag` into a JSON object; `flags` are keys that stand alone as `true`.
fn kv(s: &str, flags: &[&str]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => {
                m.insert(k.trim().to_string(), json!(v.trim()));
            }
            None if flags.contains(&part) => {
                m.insert(part.to_string(), json!(true));
            }
            None => bail!("expected key=value in {s:?}, found {part:?}"),
        }
    }
    Ok(m)
}

fn memory_mib(s: &str) -> Result<u64> {
    if s.chars().all(|c| c.is_ascii_digit()) {
        return s.parse().context("memory");
    }
    let b: ByteSize = s.parse()?;
    if !b.0.is_multiple_of(1 << 20) {
        bail!("memory must be a whole number of MiB, not {s}");
    }
    Ok(b.as_mib())
}

/// One `--disk` option as JSON.
pub fn disk_json(d: &str) -> Result<Value> {
    let mut m = kv(d, &["readonly", "nonpersistent"])?;
    for flag in ["readonly", "nonpersistent"] {
        if let Some(Value::String(s)) = m.get(flag) {
            let b = s == "true" || s == "on" || s == "1";
            m.insert(flag.into(), json!(b));
        }
    }
    for k in ["iops", "mbps", "iops_max", "mbps_max", "burst_s"] {
        if let Some(Value::String(s)) = m.get(k) {
            let v: u64 = s
                .parse()
                .with_context(|| format!("--disk {k}={s}: not a whole number"))?;
            m.insert(k.into(), json!(v));
        }
    }
    Ok(Value::Object(m))
}

/// One `--nic` option as JSON.
pub fn nic_json(n: &str) -> Result<Value> {
    let mut m = kv(n, &[])?;
    for k in ["vlan", "mtu"] {
        if let Some(Value::String(s)) = m.get(k) {
            let v: u32 = s
                .parse()
                .with_context(|| format!("--nic {k}={s}: not a number"))?;
            m.insert(k.into(), json!(v));
        }
    }
    if let Some(Value::String(s)) = m.remove("link") {
        let down = match s.as_str() {
            "up" => false,
            "down" => true,
            _ => bail!("--nic link={s}: use up or down"),
        };
        m.insert("link_down".into(), json!(down));
    }
    Ok(Value::Object(m))
}

/// One `--cdrom` option as JSON.
pub fn cdrom_json(s: &str) -> Result<Value> {
    cdrom(s)
}

fn cdrom(s: &str) -> Result<Value> {
    if s == "empty" || s == "none" {
        return Ok(json!({}));
    }
    let (first, rest) = s.split_once(',').unwrap_or((s, ""));
    let mut m = kv(rest, &[])?;
    if first.contains('=') {
        m.extend(kv(first, &[])?);
    } else {
        let (pool, vol) = first
            .split_once('/')
            .context("a CD-ROM is POOL/VOLUME, key=value options, or `empty`")?;
        m.insert("pool".into(), json!(pool));
        m.insert("volume".into(), json!(vol));
    }
    Ok(Value::Object(m))
}

/// `--cloud-init` options (applied in order over `base`) as the spec's `cloud_init`
/// (null: `off`). Files (`ssh-key=`, `user-data=`) are read here.
pub fn cloud_init_json(opts: &[String], base: Option<Value>) -> Result<Value> {
    let mut c = base.unwrap_or(json!({}));
    let mut keys_given = false;
    let mut dns_given = false;
    for opt in opts {
        if opt == "off" || opt == "none" {
            c = Value::Null;
            continue;
        }
        if c.is_null() {
            c = json!({});
        }
        for part in opt.split(',').filter(|p| !p.is_empty()) {
            let (k, val) = part
                .split_once('=')
                .with_context(|| format!("--cloud-init: expected key=value, found {part:?}"))?;
            let (k, val) = (k.trim(), val.trim());
            match k {
                "user" => c["user"] = json!(val),
                "password-hash" | "password_hash" => c["password_hash"] = json!(val),
                "hostname" => c["hostname"] = json!(val),
                "ssh-key" | "ssh_key" => {
                    let text = std::fs::read_to_string(val)
                        .with_context(|| format!("--cloud-init ssh-key={val}: cannot read"))?;
                    if !keys_given {
                        c["ssh_keys"] = json!([]);
                        keys_given = true;
                    }
                    for line in text.lines().map(str::trim) {
                        if !line.is_empty() && !line.starts_with('#') {
                            if let Some(a) = c["ssh_keys"].as_array_mut() {
                                a.push(json!(line));
                            }
                        }
                    }
                }
                "dns" | "search" => {
                    if !dns_given {
                        c["dns"] = json!([]);
                        c["search"] = json!([]);
                        dns_given = true;
                    }
                    if let Some(a) = c[k].as_array_mut() {
                        a.push(json!(val));
                    }
                }
                "user-data" | "user_data" => {
                    let text = std::fs::read_to_string(val)
                        .with_context(|| format!("--cloud-init user-data={val}: cannot read"))?;
                    c["user_data"] = json!(text);
                }
                _ => {
                    let (what, n) = if let Some(n) = k.strip_prefix("ip") {
                        ("ip", n)
                    } else if let Some(n) = k.strip_prefix("gw") {
                        ("gw", n)
                    } else {
                        bail!("--cloud-init: unknown key {k:?} (user, password-hash, ssh-key, hostname, ip, gw, dns, search, user-data)");
                    };
                    let nic: usize = if n.is_empty() {
                        0
                    } else {
                        n.parse().with_context(|| {
                            format!("--cloud-init {k}: ipN/gwN take a NIC number")
                        })?
                    };
                    if !c["network"].is_array() {
                        c["network"] = json!([]);
                    }
                    let list = c["network"].as_array_mut().context("network")?;
                    let i = match list.iter().position(|e| e["nic"] == json!(nic)) {
                        Some(i) => i,
                        None => {
                            list.push(json!({"nic": nic, "ip": "dhcp"}));
                            list.len() - 1
                        }
                    };
                    list[i][what] = json!(val);
                }
            }
        }
    }
    Ok(c)
}

/// The spec JSON for create (`base` None) or edit (options replace, devices are added).
pub fn spec_json(name: &str, a: &SpecArgs, base: Option<&VmSpec>) -> Result<Value> {
    let mut v = match base {
        Some(b) => serde_json::to_value(b)?,
        None => json!({"name": name, "cpus": 1, "memory_mib": 512}),
    };
    if let Some(c) = a.cpus {
        v["cpus"] = json!(c);
    }
    if let Some(m) = &a.memory {
        v["memory_mib"] = json!(memory_mib(m)?);
    }
    let push = |v: &mut Value, key: &str, items: Vec<Value>| {
        if !items.is_empty() {
            let arr = v.get_mut(key).and_then(Value::as_array_mut);
            match arr {
                Some(arr) => arr.extend(items),
                None => v[key] = Value::Array(items),
            }
        }
    };
    let mut disks = vec![];
    for d in &a.disks {
        disks.push(disk_json(d)?);
    }
    push(&mut v, "disks", disks);
    push(
        &mut v,
        "cdroms",
        a.cdroms.iter().map(|c| cdrom(c)).collect::<Result<_>>()?,
    );
    push(
        &mut v,
        "nics",
        a.nics.iter().map(|n| nic_json(n)).collect::<Result<_>>()?,
    );
    if let Some(b) = &a.boot {
        v["boot_order"] = json!(b.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>());
    }
    if let Some(x) = &a.arch {
        v["arch"] = json!(x);
    }
    if let Some(m) = &a.machine {
        v["machine"] = json!(m);
    }
    if let Some(m) = &a.machine_version {
        v["machine_version"] = json!(m);
    }
    if let Some(c) = &a.cpu {
        v["cpu"] = json!(c);
    }
    for (k, x) in [
        ("tablet", &a.tablet),
        ("rng", &a.rng),
        ("balloon", &a.balloon),
    ] {
        if let Some(x) = x {
            v[k] = json!(match x.as_str() {
                "on" => true,
                "off" => false,
                _ => bail!("--{k} {x}: use on or off"),
            });
        }
    }
    for (k, flag, x) in [
        ("agent", "agent", &a.agent),
        ("tpm", "tpm", &a.tpm),
        ("secure_boot", "secure-boot", &a.secure_boot),
    ] {
        if let Some(x) = x {
            v[k] = json!(match x.as_str() {
                "on" => true,
                "off" => false,
                _ => bail!("--{flag} {x}: use on or off"),
            });
        }
    }
    if !a.cloud_init.is_empty() {
        let base = v.get("cloud_init").cloned().filter(|c| !c.is_null());
        v["cloud_init"] = cloud_init_json(&a.cloud_init, base)?;
    }
    if let Some(f) = &a.firmware {
        v["firmware"] = json!(f);
    }
    if a.kernel.is_some() || a.initrd.is_some() || a.append.is_some() {
        let mut k = v.get("direct_boot").cloned().unwrap_or(json!({}));
        if let Some(x) = &a.kernel {
            k["kernel"] = json!(x);
        }
        if let Some(x) = &a.initrd {
            k["initrd"] = json!(x);
        }
        if let Some(x) = &a.append {
            k["cmdline"] = json!(x);
        }
        v["direct_boot"] = k;
    }
    if let Some(d) = &a.description {
        v["description"] = json!(d);
    }
    if a.autostart.is_some() || a.startup.is_some() || a.on_host_shutdown.is_some() {
        let mut cur: ferry_types::Startup =
            serde_json::from_value(v.get("startup").cloned().unwrap_or(json!({})))?;
        if let Some(x) = &a.autostart {
            cur.autostart = match x.as_str() {
                "on" | "yes" | "true" => true,
                "off" | "no" | "false" => false,
                _ => bail!("--autostart {x}: use on or off"),
            };
        }
        if let Some(x) = &a.startup {
            cur = ferry_types::Startup::parse_notation(x, cur)
                .map_err(|e| anyhow::anyhow!("--startup {x}: {e}"))?;
        }
        if let Some(x) = a.on_host_shutdown {
            cur.on_host_shutdown = x;
        }
        v["startup"] = serde_json::to_value(cur)?;
    }
    if a.ha.any() {
        let mut cur: ferry_types::HaPolicy =
            serde_json::from_value(v.get("ha").cloned().unwrap_or(json!({})))?;
        a.ha.apply(&mut cur);
        v["ha"] = serde_json::to_value(cur)?;
    }
    let p = &a.placement;
    let mut rules = v.get("placement").cloned().unwrap_or(json!({}));
    if let Some(g) = &p.affinity {
        rules["affinity"] = if g.is_empty() { Value::Null } else { json!(g) };
    }
    if !p.anti_affinity.is_empty() {
        rules["anti_affinity"] = json!(p.anti_affinity);
    }
    if !p.host_labels.is_empty() {
        rules["host_labels"] = json!(p.host_labels);
    }
    if !p.hosts.is_empty() {
        rules["hosts"] = json!(p.hosts);
    }
    if let Some(x) = &p.pinned {
        rules["pinned"] = json!(match x.as_str() {
            "yes" | "true" => true,
            "no" | "false" => false,
            _ => anyhow::bail!("--drs-pinned {x}: use yes or no"),
        });
    }
    v["placement"] = rules;
    if let Some(rp) = &p.resource_pool {
        v["resource_pool"] = if rp.is_empty() {
            Value::Null
        } else {
            json!(rp)
        };
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_json_parses_devices() {
        let a = SpecArgs {
            cpus: Some(2),
            memory: Some("1G".into()),
            disks: vec!["bus=scsi,size=10G,readonly".into()],
            cdroms: vec!["local/debian.iso,bus=sata".into(), "empty".into()],
            nics: vec!["bridge=vmbr0,model=e1000".into()],
            boot: Some("cdrom0,disk0".into()),
            ..Default::default()
        };
        let v = spec_json("web1", &a, None).unwrap();
        assert_eq!(v["memory_mib"], 1024);
        assert_eq!(
            v["disks"][0],
            json!({"bus": "scsi", "size": "10G", "readonly": true})
        );
        assert_eq!(
            v["cdroms"][0],
            json!({"pool": "local", "volume": "debian.iso", "bus": "sata"})
        );
        assert_eq!(v["cdroms"][1], json!({}));
        assert_eq!(v["nics"][0]["model"], "e1000");
        let spec: VmSpec = serde_json::from_value(v).unwrap();
        spec.validate().unwrap();
    }

    #[test]
    fn spec_json_rejects_garbage() {
        let a = SpecArgs {
            disks: vec!["bus".into()],
            ..Default::default()
        };
        assert!(spec_json("x", &a, None).is_err());
        let a = SpecArgs {
            memory: Some("lots".into()),
            ..Default::default()
        };
        assert!(spec_json("x", &a, None).is_err());
        let a = SpecArgs {
            cdroms: vec!["noslash".into()],
            ..Default::default()
        };
        assert!(spec_json("x", &a, None).is_err());
    }

    #[test]
    fn cloud_init_options_build_and_edit_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id.pub");
        std::fs::write(
            &key,
            "# mine\nssh-ed25519 AAAAC3Nza me@x\n\nssh-rsa AAAAB3Nza other\n",
        )
        .unwrap();
        let k = key.display();
        let c = cloud_init_json(
            &[format!("user=admin,ssh-key={k},hostname=c1,ip=10.0.0.5/24,gw=10.0.0.1,dns=10.0.0.1,dns=10.0.0.2,ip1=dhcp")],
            None,
        )
        .unwrap();
        assert_eq!(c["user"], "admin");
        assert_eq!(
            c["ssh_keys"],
            json!(["ssh-ed25519 AAAAC3Nza me@x", "ssh-rsa AAAAB3Nza other"])
        );
        assert_eq!(
            c["network"],
            json!([{"nic": 0, "ip": "10.0.0.5/24", "gw": "10.0.0.1"}, {"nic": 1, "ip": "dhcp"}])
        );
        assert_eq!(c["dns"], json!(["10.0.0.1", "10.0.0.2"]));
        let parsed: ferry_types::CloudInit = serde_json::from_value(c.clone()).unwrap();
        assert_eq!(parsed.hostname.as_deref(), Some("c1"));
        // an edit changes what it names
        let e = cloud_init_json(&["ip=10.0.0.6/24,hostname=c2".into()], Some(c)).unwrap();
        assert_eq!(
            e["network"][0],
            json!({"nic": 0, "ip": "10.0.0.6/24", "gw": "10.0.0.1"})
        );
        assert_eq!(e["hostname"], "c2");
        assert_eq!(e["user"], "admin");
        assert!(cloud_init_json(&["off".into()], Some(e)).unwrap().is_null());
        for bad in ["colour=red", "ssh-key=/nonexistent/key", "ipx=dhcp", "user"] {
            assert!(cloud_init_json(&[bad.into()], None).is_err(), "{bad}");
        }
    }
}
