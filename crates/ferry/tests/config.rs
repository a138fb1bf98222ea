//! `ferry serve`'s configuration file and environment, through the binary: a flag wins
//! over a `FERRY_*` variable, a variable over the file, the file over the defaults; a
//! bad file stops the daemon with the reason before it touches anything.

use anyhow::Result;
use std::process::{Command, Output};

fn ferry(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.args(args);
    // nothing of the caller's FERRY_* settings
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    Ok(c.output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn config_check_names_where_each_setting_comes_from() -> Result<()> {
    let d = tempfile::tempdir()?;
    let f = d.path().join("ferry.toml");
    std::fs::write(
        &f,
        "listen = \"0.0.0.0:8470\"\naccel = \"tcg\"\nlabels = [\"ssd\", \"rack1\"]\n",
    )?;
    let path = f.to_str().unwrap_or_default();
    let o = ferry(&["config", "check", path], &[("FERRY_ACCEL", "kvm")])?;
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = |key: &str| {
        t.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(line("listen"), ["listen", "0.0.0.0:8470", "file"], "{t}");
    assert_eq!(line("accel"), ["accel", "kvm", "environment"], "{t}");
    assert_eq!(line("labels"), ["labels", "ssd,rack1", "file"], "{t}");
    assert_eq!(
        line("state_dir"),
        ["state_dir", "/var/lib/ferry", "default"],
        "{t}"
    );
    Ok(())
}

#[test]
fn bad_files_are_refused_with_the_reason_and_change_nothing() -> Result<()> {
    let d = tempfile::tempdir()?;
    let state = d.path().join("state");
    let f = d.path().join("ferry.toml");
    let path = f.to_str().unwrap_or_default();
    let state_line = format!("state_dir = \"{}\"\n", state.display());
    for (body, reason) in [
        ("lisen = \"127.0.0.1:1\"\n", "unknown key `lisen`"),
        ("plain-http = true\n", "keys use `_`: plain_http"),
        ("plain_http = \"yes\"\n", "true or false"),
        ("listen = \n", "Not valid TOML"),
        ("listen = \"nowhere\"\n", "invalid socket address"),
    ] {
        std::fs::write(&f, format!("{state_line}{body}"))?;
        let o = ferry(&["serve", "--config", path], &[])?;
        let t = text(&o);
        assert!(!o.status.success() && t.contains(reason), "{body}: {t}");
        let o = ferry(&["config", "check", path], &[])?;
        assert!(!o.status.success() && text(&o).contains(reason), "{body}");
        assert!(!state.exists(), "{body}: the daemon made its state dir");
    }
    let o = ferry(&["serve", "--config", "/nonexistent/ferry.toml"], &[])?;
    assert!(!o.status.success() && text(&o).contains("/nonexistent/ferry.toml"));
    Ok(())
}

#[test]
fn a_flag_wins_over_the_environment_which_wins_over_the_file() -> Result<()> {
    // plain HTTP is allowed on loopback only: which address the check names shows
    // which source was taken. Every case stops at that check, before anything starts.
    let d = tempfile::tempdir()?;
    let state = d.path().join("state");
    let f = d.path().join("ferry.toml");
    std::fs::write(
        &f,
        format!(
            "state_dir = \"{}\"\nplain_http = true\nlisten = \"0.0.0.1:1\"\n",
            state.display()
        ),
    )?;
    let path = f.to_str().unwrap_or_default();
    let o = ferry(&["serve", "--config", path], &[])?;
    assert!(text(&o).contains("--listen 0.0.0.1:1"), "{}", text(&o));
    let env = [("FERRY_LISTEN", "0.0.0.2:2")];
    let o = ferry(&["serve", "--config", path], &env)?;
    assert!(text(&o).contains("--listen 0.0.0.2:2"), "{}", text(&o));
    let o = ferry(&["serve", "--config", path, "--listen", "0.0.0.3:3"], &env)?;
    assert!(text(&o).contains("--listen 0.0.0.3:3"), "{}", text(&o));
    // The environment names the file too.
    let o = ferry(&["serve"], &[("FERRY_CONFIG", path)])?;
    assert!(text(&o).contains("--listen 0.0.0.1:1"), "{}", text(&o));
    assert!(!state.exists());
    Ok(())
}

#[test]
fn the_watchdog_stopped_closes_the_hardware_watchdog_with_the_magic_v() -> Result<()> {
    // A file stands in for /dev/watchdog: fed with NULs while disarmed, closed with
    // `V` when the watchdog's scope is stopped (SIGTERM), so a slow power-off is no reset.
    let d = tempfile::tempdir()?;
    let dev = d.path().join("watchdog-device");
    std::fs::write(&dev, b"")?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("watchdog")
        .arg("--run-dir")
        .arg(d.path())
        .arg("--device")
        .arg(&dev)
        .spawn()?;
    let t = std::time::Instant::now();
    while std::fs::read(&dev)?.is_empty() && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let st = child.wait()?;
    let fed = std::fs::read(&dev)?;
    assert!(st.success(), "{st}");
    assert!(fed.starts_with(b"\0"), "never fed: {fed:?}");
    assert_eq!(fed.last(), Some(&b'V'), "no magic close: {fed:?}");
    Ok(())
}
