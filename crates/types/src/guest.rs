//! What ferry tells a guest at boot (cloud-init, NoCloud) and what the guest tells
//! ferry back through the QEMU guest agent. Pure: validation here, the seed image in
//! `ferry_cloudinit`, the agent's protocol in `ferry_qmp::agent`.

use crate::validate::ValidationErrors;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use utoipa::ToSchema;

/// At most this many SSH keys.
pub const MAX_SSH_KEYS: usize = 32;
/// The longest SSH public key line (an RSA-16384 key is ~2.8 KiB).
pub const MAX_SSH_KEY_LEN: usize = 8192;
/// The largest user-data snippet.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// At most this many DNS servers and search domains each.
pub const MAX_DNS: usize = 4;

/// cloud-init (NoCloud): what a guest built from a cloud image learns at its first boot
/// — and again whenever this changes. ferry writes it to a small disk labelled `cidata`
/// at every start; the guest's instance id is a hash of the VM's name and this, so a
/// clone is a new instance (new SSH host keys) even with the same settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// The user made (with sudo); the image's default user when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The user's password as a crypt(3) hash (`$6$…`, `$y$…`: `mkpasswd`); never the
    /// password itself. Absent: no password (key login only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// SSH public keys allowed to log in as the user (`ssh-ed25519 AAAA… comment`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// The guest's host name (the VM's name when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Addresses per NIC (by index); a NIC not listed gets DHCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<CloudNet>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// DNS search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// More for cloud-init: a `#cloud-config` document or a script (`#!…`), given as
    /// vendor data — it runs, and where it sets what the fields above set, they win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// One NIC's address: `dhcp`, or a static address with its prefix and a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudNet {
    /// The NIC (`nics[i]`).
    #[serde(default)]
    pub nic: usize,
    /// `dhcp` or `ADDRESS/PREFIX` (IPv4 or IPv6).
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// A parsed `ADDRESS/PREFIX`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX (10.0.0.5/24) or dhcp"))?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("prefix {p:?} must be a number from 1 to {max}"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
        return Err(format!("{addr} cannot be a NIC's address"));
    }
    Ok((addr, prefix))
}

/// A host name: dot-separated labels of letters, digits and `-` (not at either end),
/// each 1–63 long, 253 in all.
pub fn check_hostname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters long".into());
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{label:?}: each dot-separated part is 1 to 63 characters"
            ));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!(
                "{label:?}: only letters, digits and '-' (not first or last) are allowed"
            ));
        }
    }
    Ok(())
}

/// The host name a VM named `name` gets when none is set: its name with what a host
/// name cannot hold (`_`, `.`) turned into `-`.
pub fn hostname_from(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let h = h.trim_matches('-');
    if h.is_empty() {
        "vm".into()
    } else {
        h.chars().take(63).collect()
    }
}

fn check_user(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        return Err(
            "a user name is 1 to 32 of a-z, 0-9, '_' and '-', starting with a letter or '_'".into(),
        );
    }
    if s == "root" {
        return Err("root cannot be the cloud-init user (its SSH login stays off)".into());
    }
    Ok(())
}

fn check_password_hash(s: &str) -> Result<(), String> {
    let schemes = [
        "$1$", "$5$", "$6$", "$y$", "$2b$", "$2y$", "$2a$", "$7$", "$gy$",
    ];
    if !schemes.iter().any(|p| s.starts_with(p)) {
        return Err("not a crypt(3) hash: give the hash of the password (`mkpasswd -m sha-512` or `openssl passwd -6`), never the password".into());
    }
    if s.len() > 512
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err("a crypt(3) hash is one line without spaces or ':'".into());
    }
    Ok(())
}

/// An OpenSSH public key line: `TYPE BASE64 [comment]`, one line.
pub fn check_ssh_key(s: &str) -> Result<(), String> {
    if s.len() > MAX_SSH_KEY_LEN || s.contains(['\n', '\r', '\0']) {
        return Err(format!("one line of at most {MAX_SSH_KEY_LEN} bytes"));
    }
    let mut parts = s.split_ascii_whitespace();
    let kind = parts.next().unwrap_or_default();
    let known = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !known.contains(&kind) {
        return Err(format!(
            "{kind:?} is not an SSH public key type (expected ssh-ed25519, ssh-rsa, ecdsa-sha2-…)"
        ));
    }
    let body = parts.next().unwrap_or_default();
    if body.len() < 16
        || !body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
    {
        return Err("the key's base64 part is missing or malformed".into());
    }
    Ok(())
}

impl CloudInit {
    /// Structural checks; `nics` is how many NICs the VM has.
    pub fn check(&self, e: &mut ValidationErrors, nics: usize) {
        let f = |n: &str| format!("cloud_init.{n}");
        if let Some(Err(r)) = self.user.as_deref().map(check_user) {
            e.push(f("user"), r);
        }
        if let Some(Err(r)) = self.password_hash.as_deref().map(check_password_hash) {
            e.push(f("password_hash"), r);
        }
        if self.password_hash.is_some() && self.user.is_none() {
            e.push(
                f("password_hash"),
                "a password goes with a user: name it (`user`)",
            );
        }
        if self.ssh_keys.len() > MAX_SSH_KEYS {
            e.push(f("ssh_keys"), format!("at most {MAX_SSH_KEYS} keys"));
        }
        for (i, k) in self.ssh_keys.iter().enumerate() {
            if let Err(r) = check_ssh_key(k) {
                e.push(f(&format!("ssh_keys[{i}]")), r);
            }
        }
        if let Some(Err(r)) = self.hostname.as_deref().map(check_hostname) {
            e.push(f("hostname"), r);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in self.network.iter().enumerate() {
            let field = f(&format!("network[{i}]"));
            if n.nic >= nics {
                e.push(
                    format!("{field}.nic"),
                    format!("the VM has no NIC {} (it has {nics})", n.nic),
                );
            }
            if !seen.insert(n.nic) {
                e.push(
                    format!("{field}.nic"),
                    format!("NIC {} is listed twice", n.nic),
                );
            }
            let addr = if n.ip == "dhcp" {
                None
            } else {
                match parse_cidr(&n.ip) {
                    Ok((a, _)) => Some(a),
                    Err(r) => {
                        e.push(format!("{field}.ip"), r);
                        continue;
                    }
                }
            };
            if let Some(gw) = &n.gw {
                match (gw.parse::<IpAddr>(), addr) {
                    (Err(_), _) => e.push(
                        format!("{field}.gw"),
                        format!("{gw:?} is not an IP address"),
                    ),
                    (Ok(_), None) => e.push(
                        format!("{field}.gw"),
                        "a gateway goes with a static address (DHCP brings its own)",
                    ),
                    (Ok(g), Some(a)) if g.is_ipv4() != a.is_ipv4() => e.push(
                        format!("{field}.gw"),
                        format!("{g} and {a} are of different IP versions"),
                    ),
                    _ => {}
                }
            }
        }
        if self.dns.len() > MAX_DNS {
            e.push(f("dns"), format!("at most {MAX_DNS} servers"));
        }
        for (i, d) in self.dns.iter().enumerate() {
            if d.parse::<IpAddr>().is_err() {
                e.push(
                    f(&format!("dns[{i}]")),
                    format!("{d:?} is not an IP address"),
                );
            }
        }
        if self.search.len() > MAX_DNS {
            e.push(f("search"), format!("at most {MAX_DNS} domains"));
        }
        for (i, d) in self.search.iter().enumerate() {
            if let Err(r) = check_hostname(d) {
                e.push(f(&format!("search[{i}]")), r);
            }
        }
        if let Some(u) = &self.user_data {
            if u.len() > MAX_USER_DATA {
                e.push(
                    f("user_data"),
                    format!("at most {} KiB", MAX_USER_DATA / 1024),
                );
            } else if !(u.starts_with("#cloud-config") || u.starts_with("#!")) {
                e.push(
                    f("user_data"),
                    "must start with #cloud-config (a cloud-config document) or #! (a script)",
                );
            } else if u.contains('\0') {
                e.push(f("user_data"), "contains a NUL byte");
            }
        }
    }
}

/// What the QEMU guest agent says about a running guest (`GET /vms/{name}/agent`).
/// Everything here comes from inside the guest: shown, never trusted for decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct GuestInfo {
    /// The guest's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<GuestOs>,
    /// Its network interfaces with their addresses (loopback left out).
    #[serde(default)]
    pub interfaces: Vec<GuestInterface>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Whether its file systems are frozen right now (`thawed` or `frozen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsfreeze: Option<String>,
}

/// The guest's operating system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct GuestOs {
    /// `Debian GNU/Linux 12 (bookworm)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    /// `debian`, `mswindows`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
}

/// One interface inside the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct GuestInterface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `ADDRESS/PREFIX`.
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(c: &CloudInit, nics: usize) -> Vec<String> {
        let mut e = ValidationErrors::default();
        c.check(&mut e, nics);
        e.0.into_iter()
            .map(|i| format!("{}: {}", i.field, i.reason))
            .collect()
    }

    #[test]
    fn a_full_config_passes() {
        let c = CloudInit {
            user: Some("admin".into()),
            password_hash: Some("$6$salt$abcdefghijklmnopqrstuv".into()),
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGf admin@x".into()],
            hostname: Some("web-1.example.org".into()),
            network: vec![
                CloudNet {
                    nic: 0,
                    ip: "10.0.0.5/24".into(),
                    gw: Some("10.0.0.1".into()),
                },
                CloudNet {
                    nic: 1,
                    ip: "dhcp".into(),
                    gw: None,
                },
            ],
            dns: vec!["10.0.0.1".into(), "2001:db8::1".into()],
            search: vec!["example.org".into()],
            user_data: Some("#cloud-config\nruncmd: [true]\n".into()),
        };
        assert_eq!(errs(&c, 2), Vec::<String>::new());
    }

    #[test]
    fn bad_fields_are_named() {
        let c = CloudInit {
            user: Some("Root!".into()),
            password_hash: Some("hunter2".into()),
            ssh_keys: vec!["ssh-ed25519 AAAA\nssh-rsa AAAA".into(), "rsa-key x".into()],
            hostname: Some("-bad-.x".into()),
            network: vec![
                CloudNet {
                    nic: 3,
                    ip: "10.0.0.5".into(),
                    gw: None,
                },
                CloudNet {
                    nic: 0,
                    ip: "dhcp".into(),
                    gw: Some("10.0.0.1".into()),
                },
                CloudNet {
                    nic: 0,
                    ip: "10.0.0.5/24".into(),
                    gw: Some("fe80::1".into()),
                },
            ],
            dns: vec!["dns.example".into()],
            search: vec!["a..b".into()],
            user_data: Some("runcmd: [true]".into()),
        };
        let e = errs(&c, 1).join("\n");
        for field in [
            "cloud_init.user:",
            "cloud_init.password_hash: not a crypt(3) hash",
            "cloud_init.ssh_keys[0]: one line",
            "cloud_init.ssh_keys[1]: \"rsa-key\" is not",
            "cloud_init.hostname:",
            "cloud_init.network[0].nic: the VM has no NIC 3",
            "cloud_init.network[0].ip:",
            "cloud_init.network[1].gw: a gateway goes with a static address",
            "cloud_init.network[2].nic: NIC 0 is listed twice",
            "cloud_init.network[2].gw: fe80::1 and 10.0.0.5 are of different IP versions",
            "cloud_init.dns[0]:",
            "cloud_init.search[0]:",
            "cloud_init.user_data: must start with",
        ] {
            assert!(e.contains(field), "{field} missing in:\n{e}");
        }
        assert!(errs(
            &CloudInit {
                user: Some("root".into()),
                ..Default::default()
            },
            0
        )[0]
        .contains("root cannot"));
    }

    #[test]
    fn cidrs_and_hostnames() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().1, 8);
        assert!(parse_cidr("2001:db8::5/64").is_ok());
        for bad in [
            "10.0.0.1/33",
            "10.0.0.1/0",
            "0.0.0.0/8",
            "127.0.0.1/8",
            "x/8",
            "10.0.0.1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(hostname_from("web_1.prod"), "web-1-prod");
        assert_eq!(hostname_from("__"), "vm");
        assert!(check_hostname(&hostname_from(&"a".repeat(80))).is_ok());
    }
}
