//! `ferry serve`'s settings, from four places in this order of precedence: its flags,
//! `FERRY_*` environment variables, the configuration file (`/etc/ferry/ferry.toml`, or
//! `--config`), the defaults. The file's keys are the flags' names with `_`
//! (`state_dir = "/var/lib/ferry"`, `labels = ["ssd", "rack1"]`, `plain_http = false`);
//! a key no flag has, a table, or a value of the wrong kind is refused with the reason,
//! before anything starts. `ferry config check` reads a file the same way and says what
//! the daemon would run with, and where each value comes from.
//!
//! How the file joins in: each of its settings becomes the flag's environment variable
//! unless the environment already has it, so clap's own order (flag, environment,
//! default) decides. The variables set that way are named in `FERRY_CONFIG_APPLIED`, so
//! a daemon that re-executes itself reads the file again instead of keeping old values.

use anyhow::{bail, Context, Result};
use clap::{ArgAction, FromArgMatches};
use ferry_agent::AccelSetting;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the daemon looks for its file when `--config` is not given.
pub const DEFAULT_FILE: &str = "/etc/ferry/ferry.toml";
/// The variables this process took from the file (comma-separated).
const APPLIED: &str = "FERRY_CONFIG_APPLIED";
/// A file larger than this is not a configuration file.
const MAX_FILE: u64 = 1 << 20;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The configuration file (TOML; keys are these options' names with `_`). Default
    /// /etc/ferry/ferry.toml when it exists.
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the REST API.
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:8470")]
    pub listen: SocketAddr,
    /// Store, pools and VM state.
    #[arg(long, env = "FERRY_STATE_DIR", default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    /// Sockets and pidfiles of running VMs.
    #[arg(long, env = "FERRY_RUN_DIR", default_value = "/run/ferry")]
    pub run_dir: PathBuf,
    /// auto (KVM where it really works, else TCG), kvm or tcg.
    #[arg(long, env = "FERRY_ACCEL", default_value = "auto")]
    pub accel: AccelSetting,
    /// The QEMU binary.
    #[arg(long, env = "FERRY_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// This host's name in the cluster (default: the hostname).
    #[arg(long, env = "FERRY_HOST_NAME")]
    pub host_name: Option<String>,
    /// The cluster file: JSON `{"hosts": [{"name", "api", "address"}]}`.
    #[arg(long, env = "FERRY_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// In an etcd cluster, let the HA watchdog also feed this hardware watchdog
    /// (e.g. /dev/watchdog): it stops feeding once the lease deadline passes, so the
    /// host is reset if its HA VMs could not be killed.
    #[arg(long, env = "FERRY_HARDWARE_WATCHDOG")]
    pub hardware_watchdog: Option<PathBuf>,
    /// Cores DRS plans with on this host (default: the machine's).
    #[arg(long, env = "FERRY_DRS_CPUS")]
    pub drs_cpus: Option<f64>,
    /// Memory DRS plans with on this host, e.g. `64G` (default: the machine's).
    #[arg(long, env = "FERRY_DRS_MEMORY")]
    pub drs_memory: Option<ferry_types::ByteSize>,
    /// A label VMs can require (`--host-label` of `vm create`); repeatable (in the
    /// environment: comma-separated).
    #[arg(long = "label", env = "FERRY_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// A CPU model VMs may use on this host; repeatable (in the environment:
    /// comma-separated). Default: every model its QEMU runs. The same list on every
    /// host gives the cluster one baseline (like vSphere's EVC).
    #[arg(long = "cpu-model", env = "FERRY_CPU_MODELS", value_delimiter = ',')]
    pub cpu_models: Vec<String>,
    /// Resource pools and VMs: under systemd the slice `NAME.slice` (VMs in scopes
    /// `NAME-vm-ID.scope`, pools in slices below it); elsewhere a cgroup directory of
    /// that name under the daemon's own cgroup.
    #[arg(long, env = "FERRY_CGROUP_ROOT", default_value = "ferry")]
    pub cgroup_root: String,
    /// The TCP port replicated pools' copies are written to, on this host's cluster
    /// address.
    #[arg(long, env = "FERRY_REPLICATION_PORT", default_value_t = ferry_agent::REPLICATION_PORT)]
    pub replication_port: u16,
    /// Serve the API over plain HTTP instead of HTTPS (only on a loopback address).
    #[arg(long, env = "FERRY_PLAIN_HTTP")]
    pub plain_http: bool,
    /// While this host tends etcd: seconds an etcd voter may be down before another
    /// host is voted in its place.
    #[arg(long, env = "FERRY_VOTER_REPLACE_AFTER", default_value_t = 300)]
    pub voter_replace_after: u64,
    /// The API's certificate for browsers and CLIs (PEM chain, e.g. from the site's CA
    /// or ACME), shown to clients that ask for another name than this host's; the other
    /// hosts keep getting the host certificate of the cluster CA. With --tls-key.
    #[arg(long, env = "FERRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "FERRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The file-restore helper VM's image (`ferry backup files`): a folder holding
    /// `vmlinux` and `initrd.img` (scripts/setup.sh builds one).
    #[arg(
        long,
        env = "FERRY_FILE_RESTORE_IMAGE",
        default_value = "/usr/lib/ferry/file-restore"
    )]
    pub file_restore_image: PathBuf,
    /// Where the kernel says which boot this is (VMs start at the first daemon start of
    /// each boot); a lab host's stand-in for a reboot.
    #[arg(
        long,
        env = "FERRY_BOOT_ID_FILE",
        default_value = "/proc/sys/kernel/random/boot_id",
        hide = true
    )]
    pub boot_id_file: PathBuf,
}

/// `ferry config …`
#[derive(clap::Subcommand, Debug)]
pub enum ConfigCmd {
    /// Read a configuration file as `ferry serve` would (default /etc/ferry/ferry.toml)
    /// and print the settings it gives, each with where it comes from.
    Check {
        /// The file (default: $FERRY_CONFIG, else /etc/ferry/ferry.toml).
        file: Option<PathBuf>,
    },
}

/// One option the file may set.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    /// The file's key: the option's name with `_`.
    pub key: String,
    pub env: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A switch: `true` or `false`.
    Flag,
    /// Repeatable: a list of strings (or one string).
    List,
    /// One value: a string or a number.
    One,
}

/// The options of `serve` a file may set (all but `config` and hidden ones).
pub fn known() -> Vec<Known> {
    let cmd = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_id() != "config")
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            let kind = match a.get_action() {
                ArgAction::SetTrue => Kind::Flag,
                ArgAction::Append => Kind::List,
                _ => Kind::One,
            };
            Some(Known {
                key: a.get_id().to_string(),
                env,
                kind,
            })
        })
        .collect()
}

/// A file's settings as environment values: (key, variable, value), by key.
pub fn parse(text: &str, known: &[Known]) -> Result<Vec<(String, String, String)>> {
    let table: toml::Table = text.parse().context("Not valid TOML")?;
    let mut out = vec![];
    for (key, value) in table {
        let Some(k) = known.iter().find(|k| k.key == key) else {
            let hint = if key.contains('-') {
                format!(" (keys use `_`: {})", key.replace('-', "_"))
            } else if key == "config" {
                " (a configuration file cannot name another)".to_string()
            } else {
                String::new()
            };
            bail!(
                "unknown key `{key}`{hint}; known keys: {}",
                known
                    .iter()
                    .map(|k| k.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let text = match (k.kind, &value) {
            (Kind::Flag, toml::Value::Boolean(b)) => b.to_string(),
            (Kind::Flag, _) => bail!("`{key}`: true or false, not {}", value.type_str()),
            (Kind::List, toml::Value::String(s)) => one_item(&key, s)?,
            (Kind::List, toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => one_item(&key, s),
                    other => bail!("`{key}`: a list of strings, not of {}", other.type_str()),
                })
                .collect::<Result<Vec<_>>>()?
                .join(","),
            (_, toml::Value::String(s)) => s.clone(),
            (Kind::One, toml::Value::Integer(i)) => i.to_string(),
            (Kind::One, toml::Value::Float(f)) => f.to_string(),
            (_, other) => bail!(
                "`{key}`: a string{}, not {}",
                if k.kind == Kind::One {
                    " or a number"
                } else {
                    " or a list of strings"
                },
                other.type_str()
            ),
        };
        if text.contains('\0') {
            bail!("`{key}`: a NUL character");
        }
        out.push((key, k.env.clone(), text));
    }
    Ok(out)
}

fn one_item(key: &str, s: &str) -> Result<String> {
    if s.contains(',') {
        bail!("`{key}`: `{s}` holds a comma; give each item as its own string");
    }
    Ok(s.to_string())
}

/// Reads the file for `serve` (`given`: `--config`/`FERRY_CONFIG`; otherwise the
/// default file if it exists) and puts its settings into this process's environment
/// where the environment lacks them. Must run before any other thread starts. Returns
/// the file read, if any.
pub fn apply(given: Option<&Path>) -> Result<Option<PathBuf>> {
    // Values an earlier run of this process took from the file are the file's again.
    if let Ok(prev) = std::env::var(APPLIED) {
        for v in prev.split(',').filter(|v| v.starts_with("FERRY_")) {
            std::env::remove_var(v);
        }
        std::env::remove_var(APPLIED);
    }
    let path = match given {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_FILE).exists() => PathBuf::from(DEFAULT_FILE),
        None => return Ok(None),
    };
    let settings = read(&path)?;
    let mut set = vec![];
    for (_, env, value) in settings {
        if std::env::var_os(&env).is_none() {
            std::env::set_var(&env, value);
            set.push(env);
        }
    }
    if !set.is_empty() {
        std::env::set_var(APPLIED, set.join(","));
    }
    Ok(Some(path))
}

/// For the CLI on this host: the daemon's socket in the run dir the configuration
/// file names (when neither `--socket` nor `FERRY_SOCKET` says otherwise), so
/// `ferry host stop-all` at the host's shutdown reaches a daemon with another run dir.
/// A file that cannot be read changes nothing here (`serve` says why).
pub fn cli_defaults() {
    if std::env::var_os("FERRY_SOCKET").is_some() {
        return;
    }
    let path = std::env::var_os("FERRY_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FILE));
    if !path.exists() {
        return;
    }
    let Ok(settings) = read(&path) else {
        return;
    };
    let run_dir = std::env::var_os("FERRY_RUN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            settings
                .iter()
                .find(|(k, _, _)| k == "run_dir")
                .map(|(_, _, v)| PathBuf::from(v))
        });
    if let Some(d) = run_dir {
        std::env::set_var("FERRY_SOCKET", d.join("api.sock"));
    }
}

/// A configuration file's settings, checked.
pub fn read(path: &Path) -> Result<Vec<(String, String, String)>> {
    let meta = std::fs::metadata(path).with_context(|| format!("Read {}", path.display()))?;
    if !meta.is_file() && path != Path::new("/dev/null") {
        bail!("{}: not a file", path.display());
    }
    if meta.len() > MAX_FILE {
        bail!("{}: larger than 1 MiB", path.display());
    }
    {
        use std::os::unix::fs::MetadataExt;
        // It names the QEMU binary and the API's key: only its owner may change it.
        if meta.is_file() && meta.mode() & 0o022 != 0 {
            bail!(
                "{}: others may write it (mode {:o}); chmod go-w it",
                path.display(),
                meta.mode() & 0o777
            );
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.is_file() && meta.uid() != 0 && meta.uid() != me {
            bail!(
                "{}: owned by uid {}, neither root nor this user",
                path.display(),
                meta.uid()
            );
        }
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("Read {}", path.display()))?;
    parse(&text, &known()).with_context(|| format!("{}", path.display()))
}

/// What can be checked of the settings before the daemon starts.
pub fn check(a: &ServeArgs) -> Result<()> {
    if let Some(c) = a.drs_cpus {
        if !(c.is_finite() && c > 0.0 && c <= 4096.0) {
            bail!("--drs-cpus {c}: give the cores DRS plans with (above 0)");
        }
    }
    if a.drs_memory.is_some_and(|m| m.0 < (64 << 20)) {
        bail!("--drs-memory: at least 64M");
    }
    for l in a.labels.iter().chain(std::iter::once(&a.cgroup_root)) {
        let mut errs = ferry_types::ValidationErrors::default();
        ferry_types::validate::check_name(&mut errs, "--label/--cgroup-root", l);
        errs.into_result()?;
    }
    if a.plain_http && !a.listen.ip().is_loopback() {
        bail!(
            "--plain-http: only on a loopback address (--listen {} is reachable from elsewhere)",
            a.listen
        );
    }
    if ["system", "user", "machine", "init", "-"].contains(&a.cgroup_root.as_str()) {
        bail!(
            "--cgroup-root {}: systemd's own slice; give a name of ferry's (default ferry)",
            a.cgroup_root
        );
    }
    if let Some(n) = &a.host_name {
        let mut errs = ferry_types::ValidationErrors::default();
        ferry_types::validate::check_name(&mut errs, "--host-name", n);
        errs.into_result()?;
    }
    for d in [&a.state_dir, &a.run_dir] {
        if !d.is_absolute() {
            bail!(
                "{}: the state and run dirs must be absolute paths",
                d.display()
            );
        }
    }
    Ok(())
}

/// `ferry config check [FILE]`: 0 when `serve` would accept the file, else the reason.
pub fn run(cmd: ConfigCmd) -> Result<()> {
    let ConfigCmd::Check { file } = cmd;
    let given = file.or_else(|| std::env::var_os("FERRY_CONFIG").map(PathBuf::from));
    let path = match apply(given.as_deref())? {
        Some(p) => {
            println!("{}: read", p.display());
            Some(p)
        }
        None => {
            println!("{DEFAULT_FILE}: absent; the defaults and the environment apply");
            None
        }
    };
    let from_file: Vec<String> = std::env::var(APPLIED)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    // The settings as the daemon would parse them (no flags: the file and environment).
    let mut cmd = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
    let m = cmd
        .try_get_matches_from_mut(["serve"])
        .map_err(|e| anyhow::anyhow!("{}", e.render().to_string().trim()))?;
    let a = ServeArgs::from_arg_matches(&m)
        .map_err(|e| anyhow::anyhow!("{}", e.render().to_string().trim()))?;
    check(&a)?;
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        ferry_pki::AdminCert::load(c, k)
            .context("Load the API's certificate (tls_cert/tls_key)")?;
    }
    println!("{:<22} {:<44} FROM", "SETTING", "VALUE");
    for k in known() {
        let source = match m.value_source(&k.key) {
            Some(clap::parser::ValueSource::EnvVariable) if from_file.contains(&k.env) => "file",
            Some(clap::parser::ValueSource::EnvVariable) => "environment",
            Some(clap::parser::ValueSource::DefaultValue) => "default",
            Some(_) => "flag",
            None => "unset",
        };
        let value = m
            .get_raw(&k.key)
            .map(|v| {
                v.map(|x| x.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "-".into());
        println!("{:<22} {:<44} {source}", k.key, value);
    }
    match path {
        Some(p) => println!("{}: ok", p.display()),
        None => println!("ok"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_serve_option_but_config_has_a_key_and_a_variable() {
        let k = known();
        for key in [
            "listen",
            "state_dir",
            "labels",
            "plain_http",
            "tls_cert",
            "accel",
        ] {
            assert!(k.iter().any(|x| x.key == key), "{key} missing");
        }
        assert!(!k
            .iter()
            .any(|x| x.key == "config" || x.key == "boot_id_file"));
        for x in &k {
            assert_eq!(x.env, format!("FERRY_{}", x.key.to_uppercase()), "{x:?}");
        }
        let cmd = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        for a in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
            assert!(
                a.get_env().is_some(),
                "--{:?} has no variable",
                a.get_long()
            );
        }
    }

    #[test]
    fn a_file_becomes_the_options_variables() {
        let s = parse(
            r#"
listen = "0.0.0.0:8470"
labels = ["ssd", "rack1"]
plain_http = false
drs_cpus = 8
voter_replace_after = 600
"#,
            &known(),
        )
        .unwrap();
        let get = |k: &str| s.iter().find(|x| x.0 == k).map(|x| x.2.as_str());
        assert_eq!(get("listen"), Some("0.0.0.0:8470"));
        assert_eq!(get("labels"), Some("ssd,rack1"));
        assert_eq!(get("plain_http"), Some("false"));
        assert_eq!(get("drs_cpus"), Some("8"));
        assert!(s.iter().any(|x| x.0 == "listen" && x.1 == "FERRY_LISTEN"));
    }

    #[test]
    fn unknown_keys_and_wrong_kinds_are_refused_with_the_reason() {
        let k = known();
        let err = |t: &str| format!("{:#}", parse(t, &k).unwrap_err());
        assert!(err("lisen = \"x\"").contains("unknown key `lisen`"));
        assert!(err("state-dir = \"/x\"").contains("keys use `_`: state_dir"));
        assert!(err("config = \"/x\"").contains("cannot name another"));
        assert!(err("plain_http = \"yes\"").contains("true or false"));
        assert!(err("labels = [1]").contains("list of strings"));
        assert!(err("labels = [\"a,b\"]").contains("comma"));
        assert!(err("listen = true").contains("not boolean"));
        assert!(err("[serve]\nlisten = \"x\"").contains("unknown key `serve`"));
        assert!(err("listen = ").contains("Not valid TOML"));
    }

    #[test]
    fn a_flag_is_taken_and_the_static_checks_refuse_bad_settings() {
        // (the order flag > environment > file runs in tests/config.rs, in processes
        // of their own: the environment is the process's)
        let cmd = || <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        let m = cmd()
            .try_get_matches_from(["serve", "--listen", "127.0.0.1:9000"])
            .unwrap();
        let a = ServeArgs::from_arg_matches(&m).unwrap();
        assert_eq!(a.listen.port(), 9000);
        assert!(check(&a).is_ok());
        let bad = ServeArgs {
            plain_http: true,
            listen: "0.0.0.0:1".parse().unwrap(),
            ..a.clone()
        };
        assert!(format!("{:#}", check(&bad).unwrap_err()).contains("loopback"));
        let bad = ServeArgs {
            state_dir: "relative".into(),
            ..a
        };
        assert!(check(&bad).is_err());
    }
}
