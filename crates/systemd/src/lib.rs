//! systemd, where it is PID 1 (Debian's default): the processes ferry starts that must
//! outlive the daemon — each VM's QEMU, the etcd member, the HA watchdog — leave the
//! daemon's cgroup for transient scopes of their own (`StartTransientUnit` with their
//! pid, asked over D-Bus through `busctl`, as Proxmox does for `qemu.slice/ID.scope`).
//! `systemctl restart ferry` or a crash of the daemon then ends only the daemon; a
//! scope ends when its process does. Resource pools are slices whose limits systemd
//! writes (`systemctl set-property --runtime`): under cgroup v2 only systemd writes
//! the cgroup tree it owns (a populated cgroup takes no `subtree_control`).
//!
//! Without systemd (this lab: another PID 1, cgroup v1) nothing here is used:
//! [`booted`] says so and the callers keep their own ways.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{program}: {source}")]
    Run {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("systemd refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("process {pid} did not arrive in {unit} within 5 s (it is in {cgroup})")]
    NotMoved {
        pid: i32,
        unit: String,
        cgroup: String,
    },
    #[error("{0}: not a unit name ferry makes")]
    BadName(String),
}

type Result<T> = std::result::Result<T, SystemdError>;

/// Whether systemd is PID 1 (`sd_booted()`: `/run/systemd/system` exists).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// A string as one part of a unit name, escaped like `systemd-escape`: letters,
/// digits, `:`, `_` and `.` (not leading) stay, everything else is `\xNN` — a `-`
/// too, so a part never splits into slice levels.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The slice for `parts` below `root` (`ferry`, [`prod`, `web`] → `ferry-prod-web.slice`,
/// a child of `ferry-prod.slice`, a child of `ferry.slice`).
pub fn slice(root: &str, parts: &[&str]) -> String {
    let mut name = escape(root);
    for p in parts {
        name.push('-');
        name.push_str(&escape(p));
    }
    name.push_str(".slice");
    name
}

/// Whether `unit` is a name this crate would make (no path, no option-like start, no
/// spaces or quotes: it goes into argv).
fn plain_unit(unit: &str) -> bool {
    !unit.is_empty()
        && unit.len() <= 255
        && !unit.starts_with('-')
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:\\@".contains(&b))
        && (unit.ends_with(".scope") || unit.ends_with(".slice") || unit.ends_with(".service"))
}

/// A transient scope to ask systemd for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope<'a> {
    pub unit: &'a str,
    pub slice: &'a str,
    pub description: &'a str,
    /// Units this scope stops after at shutdown (it is ordered `Before=` them), e.g.
    /// `ferry-guests.service`, whose stop shuts the VMs down first.
    pub before: &'a [&'a str],
}

impl Scope<'_> {
    /// `busctl call`'s arguments for `StartTransientUnit` with the process `pid`.
    pub fn busctl_args(&self, pid: i32) -> Vec<String> {
        let mut a: Vec<String> = [
            "call",
            "--quiet",
            "--",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            self.unit,
            "fail",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let props = if self.before.is_empty() { 4 } else { 5 };
        a.push(props.to_string());
        for s in [
            "PIDs",
            "au",
            "1",
            &pid.to_string(),
            "Slice",
            "s",
            self.slice,
            "Description",
            "s",
            self.description,
            "CollectMode",
            "s",
            "inactive-or-failed",
        ] {
            a.push(s.to_string());
        }
        if !self.before.is_empty() {
            a.push("Before".into());
            a.push("as".into());
            a.push(self.before.len().to_string());
            a.extend(self.before.iter().map(|s| s.to_string()));
        }
        // no auxiliary units
        a.push("0".into());
        a
    }
}

/// The cgroup (v2 path) process `pid` is in.
pub fn cgroup_of(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

fn run(program: &'static str, args: &[String]) -> Result<std::process::Output> {
    Command::new(program)
        .args(args)
        .env("SYSTEMD_PAGER", "")
        .output()
        .map_err(|source| SystemdError::Run { program, source })
}

/// Moves the running process `pid` into a new scope (see [`Scope`]) and waits until
/// the kernel shows it there. A leftover failed unit of that name is reset first; a
/// live one keeps its name, and the scope is named `UNIT-PID.scope` instead.
pub fn move_to_scope(pid: i32, scope: &Scope<'_>) -> Result<String> {
    for u in [scope.unit, scope.slice] {
        if !plain_unit(u) {
            return Err(SystemdError::BadName(u.to_string()));
        }
    }
    let _ = run("systemctl", &["reset-failed".into(), scope.unit.into()]);
    let out = run("busctl", &scope.busctl_args(pid))?;
    let unit = if out.status.success() {
        scope.unit.to_string()
    } else {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !message.contains("already exists") {
            return Err(SystemdError::Refused {
                what: format!("scope {}", scope.unit),
                message,
            });
        }
        let other = format!("{}-{pid}.scope", scope.unit.trim_end_matches(".scope"));
        let out = run(
            "busctl",
            &Scope {
                unit: &other,
                ..scope.clone()
            }
            .busctl_args(pid),
        )?;
        if !out.status.success() {
            return Err(SystemdError::Refused {
                what: format!("scope {other}"),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        other
    };
    let want = format!("/{unit}");
    for _ in 0..250 {
        match cgroup_of(pid) {
            Some(c) if c.ends_with(&want) || c.contains(&format!("{want}/")) => return Ok(unit),
            None => return Ok(unit), // it ended meanwhile: nothing to keep
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err(SystemdError::NotMoved {
        pid,
        unit,
        cgroup: cgroup_of(pid).unwrap_or_default(),
    })
}

/// Sets properties of `unit` for this boot (`systemctl set-property --runtime`),
/// e.g. a slice's `CPUWeight=`, `CPUQuota=`, `MemoryMax=`, `MemoryLow=`.
pub fn set_properties(unit: &str, props: &[(&str, String)]) -> Result<()> {
    if !plain_unit(unit) {
        return Err(SystemdError::BadName(unit.to_string()));
    }
    let mut args = vec!["set-property".to_string(), "--runtime".into(), unit.into()];
    for (k, v) in props {
        if v.bytes().any(|b| b.is_ascii_whitespace() || b == 0) {
            return Err(SystemdError::BadName(format!("{k}={v}")));
        }
        args.push(format!("{k}={v}"));
    }
    let out = run("systemctl", &args)?;
    if !out.status.success() {
        return Err(SystemdError::Refused {
            what: format!("the properties of {unit}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Stops a unit (a pool's slice once its VMs are gone).
pub fn stop(unit: &str) -> Result<()> {
    if !plain_unit(unit) {
        return Err(SystemdError::BadName(unit.to_string()));
    }
    let out = run("systemctl", &["stop".into(), unit.into()])?;
    if !out.status.success() {
        return Err(SystemdError::Refused {
            what: format!("stopping {unit}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// One unit as `systemctl list-units` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub unit: String,
    /// `active`, `inactive`, `failed`, …
    pub active: String,
    /// `running`, `exited`, `dead`, …
    pub sub: String,
}

/// The loaded units whose names match `pattern` (a glob, e.g. `ferry*`).
pub fn units(pattern: &str) -> Result<Vec<UnitState>> {
    let out = run(
        "systemctl",
        &[
            "list-units".into(),
            "--all".into(),
            "--plain".into(),
            "--no-legend".into(),
            "--full".into(),
            pattern.into(),
        ],
    )?;
    Ok(parse_units(&String::from_utf8_lossy(&out.stdout)))
}

/// `systemctl list-units --plain --no-legend` lines: UNIT LOAD ACTIVE SUB DESCRIPTION.
pub fn parse_units(text: &str) -> Vec<UnitState> {
    text.lines()
        .filter_map(|l| {
            // a failed unit's line starts with a `●`
            let mut f = l.split_whitespace().skip_while(|w| *w == "●");
            let unit = f.next()?.to_string();
            let _load = f.next()?;
            Some(UnitState {
                unit,
                active: f.next()?.to_string(),
                sub: f.next()?.to_string(),
            })
        })
        .filter(|u| !u.unit.is_empty())
        .collect()
}

/// Whether the process writes to the journal (`JOURNAL_STREAM` names its stderr).
pub fn journal_stream() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(m) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(m.dev()) && ino.parse::<u64>().ok() == Some(m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_escape_like_systemd_escape() {
        assert_eq!(escape("web-tier"), "web\\x2dtier");
        assert_eq!(escape("a.b_c:d"), "a.b_c:d");
        assert_eq!(escape(".x"), "\\x2ex");
        assert_eq!(slice("ferry", &[]), "ferry.slice");
        assert_eq!(
            slice("ferry", &["prod", "web-tier"]),
            "ferry-prod-web\\x2dtier.slice"
        );
    }

    #[test]
    fn the_transient_scope_call_names_pid_slice_and_order() {
        let a = Scope {
            unit: "ferry-vm-3.scope",
            slice: "ferry-prod.slice",
            description: "ferry VM web (id 3)",
            before: &["ferry-guests.service"],
        }
        .busctl_args(4242);
        let s = a.join(" ");
        assert!(s.contains("-- org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager StartTransientUnit ssa(sv)a(sa(sv)) ferry-vm-3.scope fail 5 PIDs au 1 4242 Slice s ferry-prod.slice"), "{s}");
        assert!(s.ends_with("Before as 1 ferry-guests.service 0"), "{s}");
        // one argument each, whatever the description holds
        assert!(a.contains(&"ferry VM web (id 3)".to_string()));
    }

    #[test]
    fn unit_lists_parse() {
        let u = parse_units(
            "ferry.service loaded active running ferry daemon\n\
             ● ferry-vm-3.scope loaded failed failed ferry VM web\n\n",
        );
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].sub, "running");
        assert_eq!(u[1].unit, "ferry-vm-3.scope");
        assert_eq!(u[1].active, "failed");
    }

    proptest! {
        /// An escaped part holds no `-` (no slice level of its own), no `/`, and is
        /// a name [`set_properties`] and [`move_to_scope`] accept.
        #[test]
        fn escaped_parts_stay_one_level(s in "\\PC{0,12}") {
            let e = escape(&s);
            prop_assert!(!e.contains('-') && !e.contains('/'));
            let unit = slice("ferry", &[&s]);
            prop_assert!(plain_unit(&unit), "{unit}");
            prop_assert_eq!(unit.matches('-').count(), 1);
        }
    }
}
