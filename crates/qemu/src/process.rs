//! Detached QEMU processes and their run dir (pidfile, QMP, serial and VNC sockets).

use crate::QemuError;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The files of one running VM.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPaths {
    /// The VM's run dir: the daemon's (QEMU's own user cannot make or replace
    /// anything in it, so nothing the daemon reads or writes here can be a link).
    pub dir: PathBuf,
    /// Where QEMU makes its sockets: its own (connections to them are checked for
    /// the QEMU process at the other end).
    pub sockets: PathBuf,
    /// Written by the daemon once QEMU answers.
    pub pidfile: PathBuf,
    pub qmp: PathBuf,
    pub serial: PathBuf,
    /// Made by the daemon, appended to by QEMU.
    pub serial_log: PathBuf,
    pub vnc: PathBuf,
    /// The guest agent's channel (a VM with `agent`).
    pub qga: PathBuf,
    /// The cloud-init seed disk, written by the daemon at each start.
    pub cloud_init: PathBuf,
    /// swtpm's control socket (a VM with a TPM) and its pidfile, swtpm's own.
    pub tpm: PathBuf,
    pub swtpm_pid: PathBuf,
    /// QEMU's standard output and error, a file the daemon opened for it.
    pub log: PathBuf,
}

impl RunPaths {
    pub fn new(dir: impl Into<PathBuf>) -> RunPaths {
        let dir = dir.into();
        let sockets = dir.join("qemu");
        RunPaths {
            pidfile: dir.join("qemu.pid"),
            qmp: sockets.join("qmp.sock"),
            serial: sockets.join("serial.sock"),
            serial_log: dir.join("serial.log"),
            vnc: sockets.join("vnc.sock"),
            qga: sockets.join("qga.sock"),
            cloud_init: dir.join("cloud-init.img"),
            tpm: sockets.join("tpm.sock"),
            swtpm_pid: sockets.join("swtpm.pid"),
            log: dir.join("qemu.log"),
            sockets,
            dir,
        }
    }

    /// Makes the dirs and removes stale sockets and pidfile of an earlier run.
    pub fn prepare(&self) -> Result<(), QemuError> {
        for d in [&self.dir, &self.sockets] {
            std::fs::create_dir_all(d).map_err(|source| QemuError::RunDir {
                path: d.display().to_string(),
                source,
            })?;
        }
        for f in [
            &self.pidfile,
            &self.qmp,
            &self.serial,
            &self.vnc,
            &self.qga,
            &self.tpm,
            &self.swtpm_pid,
        ] {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }
}

/// Where QEMU's standard output and error are while the launcher runs.
const LOG_FD: i32 = 3;

/// Who QEMU runs as: set before it is executed (its seccomp filter forbids changing
/// it later), with no other groups than these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`kvm` on hosts where it opens `/dev/kvm`).
    pub groups: Vec<u32>,
}

/// Run on the launcher's pid before it becomes QEMU (see [`spawn_detached`]).
pub type BeforeExec<'a> = &'a (dyn Fn(i32) -> Result<(), String> + Send + Sync);

/// What QEMU's launcher does besides executing QEMU (see [`spawn_detached`]): the
/// open files QEMU inherits, where the process is placed first, the companion it runs.
#[derive(Default)]
pub struct Launcher<'a> {
    pub fds: &'a [(i32, std::os::fd::OwnedFd)],
    pub before_exec: Option<BeforeExec<'a>>,
    pub companion: &'a [OsString],
}

/// Starts QEMU detached from the daemon (its own session, reparented away from the
/// daemon, stdout and stderr in `qemu.log` of the run dir) and returns its pid once QEMU
/// has initialised: its QMP monitor greets. The launcher stops itself before it
/// executes QEMU (same pid); `before_exec` runs then — where the process goes (its
/// systemd scope, its pool's cgroup) is decided before QEMU makes anything, KVM's
/// kernel threads included, which stay in the cgroup they were made in. If it fails,
/// the launcher is killed and QEMU never runs. If QEMU ends before that, the error carries
/// its own message. (QEMU's `-daemonize` would do this, but it forks and calls setsid,
/// which the seccomp sandbox forbids.) `run_as`: the user and groups QEMU runs as (the
/// launcher drops to them before anything is executed); `fds`: open files QEMU
/// inherits, each at the descriptor number given (every other descriptor is closed on
/// exec) — these three in `launcher`. `companion`: a program the launcher runs (as the same user, in the same
/// place, with only standard input, output and error — the log) just before it
/// becomes QEMU, which must return once it is ready (a daemon: swtpm for the TPM); if
/// it fails, QEMU is not started.
pub async fn spawn_detached(
    binary: &str,
    argv: &[OsString],
    run: &RunPaths,
    run_as: Option<&RunAs>,
    launcher: Launcher<'_>,
) -> Result<i32, QemuError> {
    let Launcher {
        fds,
        before_exec,
        companion,
    } = launcher;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    run.prepare()?;
    let log = &run.log;
    let log_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .map_err(|source| QemuError::RunDir {
            path: log.display().to_string(),
            source,
        })?;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"setsid sh -c 'kill -STOP $$ && { [ -z "$FERRY_COMPANION" ] || eval "$FERRY_COMPANION"; } && unset FERRY_COMPANION && exec "$@"' sh "$@" >&3 2>&3 3>&- </dev/null & echo $!"#)
        .arg("sh")
        .arg(binary)
        .args(argv)
        .current_dir(&run.dir)
        // Nothing of the daemon's environment (tokens, proxies) reaches QEMU.
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    if !companion.is_empty() {
        cmd.env("FERRY_COMPANION", companion_line(companion)?);
    }
    // Sources and targets, fixed before the fork (nothing may allocate after it).
    let mut moves = [(-1i32, -1i32); 64];
    let mut n = 0;
    for (to, f) in fds
        .iter()
        .map(|(to, f)| (*to, f.as_raw_fd()))
        .chain(std::iter::once((LOG_FD, log_file.as_raw_fd())))
    {
        if n == moves.len() {
            return Err(QemuError::Start {
                stderr: "too many descriptors for QEMU".into(),
            });
        }
        moves[n] = (f, to);
        n += 1;
    }
    let ids = run_as.map(|r| {
        (
            nix::unistd::Uid::from_raw(r.uid),
            nix::unistd::Gid::from_raw(r.gid),
            r.groups
                .iter()
                .map(|g| nix::unistd::Gid::from_raw(*g))
                .collect::<Vec<_>>(),
        )
    });
    // SAFETY: the closure runs in the forked child before exec and only makes system
    // calls (fcntl, dup2, setgroups, setgid, setuid) on values prepared above.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may sit on a target number), then into
            // place without close-on-exec.
            let mut high = [-1i32; 64];
            for i in 0..n {
                high[i] = libc::fcntl(moves[i].0, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..n {
                if libc::dup2(high[i], moves[i].1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
    let out = cmd.output().await.map_err(|source| QemuError::Spawn {
        binary: binary.to_string(),
        source,
    })?;
    let pid: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| QemuError::Start {
            stderr: "the launcher gave no pid".into(),
        })?;
    // The launcher waits, stopped, until it may become QEMU.
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    let mut stopped = false;
    for _ in 0..2000 {
        match proc_state(pid) {
            Some('T') => {
                stopped = true;
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            None => break,
        }
    }
    if !stopped {
        kill(pid);
        return Err(QemuError::Start {
            stderr: "the launcher did not wait to become QEMU".into(),
        });
    }
    if let Some(f) = before_exec {
        if let Err(e) = f(pid) {
            kill(pid);
            return Err(QemuError::Start { stderr: e });
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    );
    let failed = || QemuError::Start {
        stderr: std::fs::read_to_string(log)
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "QEMU exited without a message".into()),
    };
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if greets(&run.qmp, pid).await {
            write_pidfile(&run.pidfile, pid).map_err(|source| QemuError::RunDir {
                path: run.pidfile.display().to_string(),
                source,
            })?;
            return Ok(pid);
        }
        // Just started by us: its pid cannot have been reused yet.
        if !pid_running(pid) {
            return Err(failed());
        }
        if tokio::time::Instant::now() > deadline {
            let _ = kill_and_wait(pid, &run.qmp).await;
            return Err(QemuError::Start {
                stderr: format!("QEMU did not answer on its monitor within {START_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shell line that runs `argv` with every descriptor above standard error closed
/// (QEMU's taps and vhost-net must not stay open in a daemon that outlives it; bash,
/// because POSIX sh cannot name descriptors above 9).
fn companion_line(argv: &[OsString]) -> Result<String, QemuError> {
    const CLOSE_ALL: &str = r#"for f in /proc/$$/fd/*; do n=${f##*/}; case $n in 0|1|2) ;; *) eval "exec $n>&-" ;; esac; done; exec "$@""#;
    let mut words = vec![
        "bash".to_string(),
        "-c".into(),
        CLOSE_ALL.into(),
        "companion".into(),
    ];
    for a in argv {
        words.push(
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| QemuError::Start {
                    stderr: format!("{} is not UTF-8", a.to_string_lossy()),
                })?,
        );
    }
    shlex::try_join(words.iter().map(String::as_str)).map_err(|e| QemuError::Start {
        stderr: format!("cannot quote the companion's command line: {e}"),
    })
}

/// A process's state letter from `/proc/PID/stat` (`T`: stopped).
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// How long QEMU may take to initialise.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's record of QEMU's pid (QEMU cannot write into the run dir).
fn write_pidfile(path: &Path, pid: i32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(format!("{pid}\n").as_bytes())
}

/// Whether `pid` is at the other end of a connection to a unix socket (the socket
/// lives in a folder QEMU's user owns, so its path alone proves nothing).
pub fn peer_is(stream: &tokio::net::UnixStream, pid: i32) -> bool {
    stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .is_some_and(|p| p == pid)
}

/// Whether QEMU `pid` accepts a connection on its QMP socket and sends the greeting
/// (it has finished initialising). The connection is closed again; QEMU takes the
/// next one.
async fn greets(qmp: &Path, pid: i32) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = tokio::net::UnixStream::connect(qmp).await else {
        return false;
    };
    if !peer_is(&s, pid) {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"{\"QMP\"") || buf[..n].starts_with(b"{ \"QMP\"")
    )
}

/// The pid of the QEMU of this run dir, if its pidfile names a live QEMU that uses this
/// run dir's QMP socket (so a reused pid is never mistaken for our VM).
pub fn read_pid(run: &RunPaths) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(&run.pidfile)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    pid_alive(pid, &run.qmp).then_some(pid)
}

/// True if `pid` runs (is not a zombie).
fn pid_running(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// True if `pid` runs (not a zombie) and its command line mentions `qmp_path`.
pub fn pid_alive(pid: i32, qmp_path: &Path) -> bool {
    if !pid_running(pid) {
        return false;
    }
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let needle = qmp_path.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// SIGKILLs the process and waits (up to 10 s) until it is gone.
pub async fn kill_and_wait(pid: i32, qmp_path: &Path) -> Result<(), QemuError> {
    if pid_alive(pid, qmp_path) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for _ in 0..1000 {
        if !pid_alive(pid, qmp_path) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(QemuError::NoExit { pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_companion_runs_with_its_words_intact() {
        let line = companion_line(&[
            "printf".into(),
            "%s|".into(),
            "a b".into(),
            "'$(id)'".into(),
        ])
        .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 7</dev/null 9</dev/null; {line}"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|'$(id)'|");
        // descriptors above standard error are closed before it runs
        let line = companion_line(&["ls".into(), "/proc/self/fd".into()]).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 7</dev/null 9</dev/null; {line}"))
            .output()
            .unwrap();
        let fds: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert!(
            !fds.contains(&"7".to_string()) && !fds.contains(&"9".to_string()),
            "{fds:?}"
        );
    }

    #[test]
    fn pid_alive_checks_cmdline_not_just_pid() {
        let me = std::process::id() as i32;
        assert!(!pid_alive(me, Path::new("/nonexistent/qmp.sock")));
        assert!(!pid_alive(0, Path::new("/x")));
        assert!(!pid_alive(-5, Path::new("/x")));
    }

    #[tokio::test]
    async fn spawn_failure_reports_qemu_message() {
        let d = tempfile::tempdir().unwrap();
        let run = RunPaths::new(d.path().join("r"));
        let r = spawn_detached(
            "qemu-system-x86_64",
            &["-no-such-option".into()],
            &run,
            None,
            Launcher::default(),
        )
        .await;
        match r {
            Err(QemuError::Start { stderr }) => {
                assert!(stderr.contains("no-such-option"), "{stderr}")
            }
            r => panic!("{r:?}"),
        }
    }
}
