use super::*;
use ferry_types::guest::CloudNet;
use proptest::prelude::*;

fn spec(name: &str, c: CloudInit) -> VmSpec {
    let mut s: VmSpec = serde_json::from_value(json!({
        "name": name, "memory_mib": 256,
        "nics": [{"bridge": "br0", "mac": "0A:11:22:33:44:55"}, {"bridge": "br1", "mac": "0a:11:22:33:44:56"}]
    }))
    .unwrap();
    s.cloud_init = Some(c);
    s
}

fn doc(text: &str) -> Value {
    let body = text.strip_prefix("#cloud-config\n").unwrap_or(text);
    serde_json::from_str(body).unwrap()
}

fn full() -> CloudInit {
    CloudInit {
        user: Some("admin".into()),
        password_hash: Some("$6$salt$hash".into()),
        ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGf me@x".into()],
        hostname: Some("web1.example.org".into()),
        network: vec![CloudNet {
            nic: 0,
            ip: "10.0.0.5/24".into(),
            gw: Some("10.0.0.1".into()),
        }],
        dns: vec!["10.0.0.1".into()],
        search: vec!["example.org".into()],
        user_data: Some("#!/bin/sh\necho hi\n".into()),
    }
}

#[test]
fn documents_say_what_the_spec_says() {
    let s = render(&spec("web1", full())).unwrap();
    let u = doc(&s.user_data);
    assert!(s.user_data.starts_with("#cloud-config\n"));
    assert_eq!(u["hostname"], "web1");
    assert_eq!(u["fqdn"], "web1.example.org");
    assert_eq!(u["users"][0]["name"], "admin");
    assert_eq!(u["users"][0]["hashed_passwd"], "$6$salt$hash");
    assert_eq!(u["users"][0]["lock_passwd"], false);
    assert_eq!(u["users"][0]["ssh_authorized_keys"][0], full().ssh_keys[0]);
    let n: Value = serde_json::from_str(&s.network_config).unwrap();
    assert_eq!(n["version"], 1);
    let c = &n["config"];
    assert_eq!(c[0]["mac_address"], "0a:11:22:33:44:55");
    assert_eq!(c[0]["subnets"][0]["address"], "10.0.0.5/24");
    assert_eq!(c[0]["subnets"][0]["gateway"], "10.0.0.1");
    assert_eq!(c[1]["name"], "eth1");
    assert_eq!(c[1]["subnets"][0]["type"], "dhcp");
    assert_eq!(c[2]["type"], "nameserver");
    assert_eq!(c[2]["search"][0], "example.org");
    let m: Value = serde_json::from_str(&s.meta_data).unwrap();
    assert_eq!(m["instance-id"], s.instance_id.as_str());
    assert_eq!(m["local-hostname"], "web1.example.org");
    assert_eq!(s.vendor_data.as_deref(), Some("#!/bin/sh\necho hi\n"));
}

#[test]
fn no_user_means_the_image_default_user_with_the_keys() {
    let c = CloudInit {
        ssh_keys: full().ssh_keys,
        ..Default::default()
    };
    let s = render(&spec("db_2", c)).unwrap();
    let u = doc(&s.user_data);
    assert_eq!(u["users"][0], "default");
    assert_eq!(u["ssh_authorized_keys"][0], full().ssh_keys[0]);
    assert_eq!(u["hostname"], "db-2", "the VM's name as a host name");
    assert!(s.vendor_data.is_none());
    assert!(render(&VmSpec {
        cloud_init: None,
        ..spec("x", CloudInit::default())
    })
    .is_none());
}

#[test]
fn a_clone_or_a_change_is_a_new_instance() {
    let a = render(&spec("a", full())).unwrap();
    assert_eq!(a, render(&spec("a", full())).unwrap(), "deterministic");
    let b = render(&spec("b", full())).unwrap();
    assert_ne!(a.instance_id, b.instance_id, "same settings, other VM");
    let mut changed = full();
    changed.network[0].ip = "10.0.0.6/24".into();
    assert_ne!(
        a.instance_id,
        render(&spec("a", changed)).unwrap().instance_id
    );
}

#[test]
fn the_disk_is_fat_labelled_cidata_with_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("seed.img");
    let s = render(&spec("web1", full())).unwrap();
    write_image(&s, &p).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), IMAGE_SIZE);
    let mut files = read_image(&p).unwrap();
    files.sort();
    let mut want: Vec<(String, String)> = s
        .files()
        .into_iter()
        .map(|(n, c)| (n.to_string(), c.to_string()))
        .collect();
    want.sort();
    assert_eq!(files, want);
    // The label where blkid (cloud-init's ds-identify) reads it: the boot sector.
    let raw = std::fs::read(&p).unwrap();
    assert!(raw.windows(11).any(|w| w == LABEL), "label in the image");
    if let Ok(o) = std::process::Command::new("blkid")
        .args(["-o", "value", "-s", "LABEL"])
        .arg(&p)
        .output()
    {
        if o.status.success() {
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "CIDATA");
        }
    }
    // Written again: replaced whole, no leftovers of the first.
    let mut short = full();
    short.user_data = None;
    let s2 = render(&spec("web1", short)).unwrap();
    write_image(&s2, &p).unwrap();
    let names: Vec<String> = read_image(&p).unwrap().into_iter().map(|f| f.0).collect();
    assert!(!names.contains(&"vendor-data".to_string()), "{names:?}");
    assert!(!dir.path().join("seed.new").exists());
}

proptest! {
    /// Whatever text the fields carry, each stays a string of its document: the
    /// documents parse and say exactly what was given.
    #[test]
    fn user_text_never_changes_the_documents_shape(
        comment in "\\PC{0,40}", hash in "[^\\s:]{0,40}", host in "[a-z]{1,10}", user in "[a-z]{1,8}",
    ) {
        let c = CloudInit {
            user: Some(user.clone()),
            password_hash: Some(format!("$6${hash}")),
            ssh_keys: vec![format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 {comment}")],
            hostname: Some(host.clone()),
            ..Default::default()
        };
        let s = render(&spec("p", c)).unwrap();
        let u = doc(&s.user_data);
        prop_assert_eq!(u.as_object().unwrap().len(), 4);
        prop_assert_eq!(&u["users"][0]["name"], &json!(user));
        prop_assert_eq!(&u["users"][0]["hashed_passwd"], &json!(format!("$6${hash}")));
        prop_assert_eq!(&u["users"][0]["ssh_authorized_keys"][0], &json!(format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 {comment}")));
        prop_assert_eq!(&u["hostname"], &json!(host));
        prop_assert!(!s.user_data[14..].contains("\n#"), "no YAML comment line can start inside");
    }
}
