//! Write locks of volumes on a shared pool. A volume may be open read-write on one host
//! only: `{pool}/.locks/{volume}.json` names the holder (host, VM) and a generation
//! that grows with every change of hands; every read-modify-write of it runs under an
//! exclusive `flock` of `{volume}.guard` next to it, so hosts that mount the same
//! directory never both win. Until the cluster store takes this role, these files are
//! the authority.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLock {
    /// The host that may write.
    pub host: String,
    pub vm: String,
    /// Grows with every acquire or transfer; never reused.
    pub generation: u64,
    /// Set when the holder released it (the generation stays).
    #[serde(default)]
    pub released: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("Volume {volume} is in use by VM {vm} on host {host} (lock generation {generation})")]
    Held {
        volume: String,
        host: String,
        vm: String,
        generation: u64,
    },
    #[error("Lock of volume {volume}: {what}")]
    Io {
        volume: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The locks of one shared pool directory.
#[derive(Debug, Clone)]
pub struct LockDir {
    dir: PathBuf,
}

impl LockDir {
    pub fn new(pool_dir: impl AsRef<Path>) -> LockDir {
        LockDir {
            dir: pool_dir.as_ref().join(".locks"),
        }
    }

    fn io(volume: &str, what: &str) -> impl FnOnce(std::io::Error) -> LockError {
        let (volume, what) = (volume.to_string(), what.to_string());
        move |source| LockError::Io {
            volume,
            what,
            source,
        }
    }

    /// Runs `f` on the current lock under the volume's guard; writes what it returns.
    fn update<T>(
        &self,
        volume: &str,
        f: impl FnOnce(Option<VolumeLock>) -> Result<(Option<VolumeLock>, T), LockError>,
    ) -> Result<T, LockError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(volume, "create the lock dir"))?;
        let guard = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!("{volume}.guard")))
            .map_err(Self::io(volume, "open the guard"))?;
        let _g = nix::fcntl::Flock::lock(guard, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Self::io(volume, "flock the guard")(e.into()))?;
        let cur = self.read(volume)?;
        let (new, out) = f(cur.clone())?;
        if new != cur {
            if let Some(l) = new {
                let path = self.dir.join(format!("{volume}.json"));
                let tmp = self.dir.join(format!(".{volume}.json.tmp"));
                std::fs::write(&tmp, serde_json::to_vec(&l).expect("lock serialises"))
                    .and_then(|_| std::fs::rename(&tmp, &path))
                    .map_err(Self::io(volume, "write the lock"))?;
            }
        }
        Ok(out)
    }

    /// The lock of `volume`, if it was ever taken.
    pub fn read(&self, volume: &str) -> Result<Option<VolumeLock>, LockError> {
        match std::fs::read(self.dir.join(format!("{volume}.json"))) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(volume, "read the lock")(e)),
        }
    }

    /// Takes the lock for `vm` on `host`; succeeds again for the same holder (a restart
    /// on the same host), fails with the holder's name for anyone else.
    pub fn acquire(&self, volume: &str, host: &str, vm: &str) -> Result<VolumeLock, LockError> {
        self.update(volume, |cur| match cur {
            Some(l) if !l.released && (l.host != host || l.vm != vm) => Err(LockError::Held {
                volume: volume.into(),
                host: l.host,
                vm: l.vm,
                generation: l.generation,
            }),
            Some(l) if !l.released => Ok((Some(l.clone()), l)),
            cur => {
                let l = VolumeLock {
                    host: host.into(),
                    vm: vm.into(),
                    generation: cur.map_or(1, |c| c.generation + 1),
                    released: false,
                };
                Ok((Some(l.clone()), l))
            }
        })
    }

    /// Gives the lock up if `host` holds it.
    pub fn release(&self, volume: &str, host: &str) -> Result<(), LockError> {
        self.update(volume, |cur| match cur {
            Some(mut l) if l.host == host && !l.released => {
                l.released = true;
                Ok((Some(l), ()))
            }
            cur => Ok((cur, ())),
        })
    }

    /// Moves the lock from `from` to `to` (live migration's switchover), keeping the VM.
    /// Fails if `from` does not hold it.
    pub fn transfer(&self, volume: &str, from: &str, to: &str) -> Result<VolumeLock, LockError> {
        self.update(volume, |cur| match cur {
            Some(l) if !l.released && l.host == from => {
                let n = VolumeLock {
                    host: to.into(),
                    vm: l.vm,
                    generation: l.generation + 1,
                    released: false,
                };
                Ok((Some(n.clone()), n))
            }
            Some(l) if !l.released && l.host == to => Ok((Some(l.clone()), l)),
            Some(l) => Err(LockError::Held {
                volume: volume.into(),
                host: if l.released {
                    "(nobody: released)".into()
                } else {
                    l.host
                },
                vm: l.vm,
                generation: l.generation,
            }),
            None => Err(LockError::Io {
                volume: volume.into(),
                what: "transfer".into(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no lock to transfer"),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_generations_grow_and_transfer_moves_it() {
        let d = tempfile::tempdir().unwrap();
        let a = LockDir::new(d.path());
        // Two handles on the same directory stand for two hosts.
        let b = LockDir::new(d.path());
        let l = a.acquire("v", "h1", "web").unwrap();
        assert_eq!(l.generation, 1);
        assert_eq!(a.acquire("v", "h1", "web").unwrap().generation, 1);
        match b.acquire("v", "h2", "web") {
            Err(LockError::Held { host, vm, .. }) => {
                assert_eq!((host.as_str(), vm.as_str()), ("h1", "web"))
            }
            other => panic!("{other:?}"),
        }
        assert!(
            b.acquire("v", "h1", "other").is_err(),
            "another VM on the same host"
        );
        let t = a.transfer("v", "h1", "h2").unwrap();
        assert_eq!((t.host.as_str(), t.generation), ("h2", 2));
        assert!(a.acquire("v", "h1", "web").is_err(), "h1 lost it");
        a.release("v", "h1").unwrap(); // not the holder: no effect
        assert!(!b.read("v").unwrap().unwrap().released);
        b.release("v", "h2").unwrap();
        assert_eq!(a.acquire("v", "h1", "web").unwrap().generation, 3);
        assert!(
            b.transfer("v", "h2", "h3").is_err(),
            "h2 no longer holds it"
        );
        // Repeating a finished transfer (a retry after a crash) is fine.
        assert_eq!(b.transfer("v", "h2", "h1").unwrap().generation, 3);
    }

    #[test]
    fn racing_hosts_get_one_winner() {
        let d = tempfile::tempdir().unwrap();
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let p = d.path().to_path_buf();
                    s.spawn(move || {
                        LockDir::new(p)
                            .acquire("v", &format!("h{i}"), "web")
                            .is_ok()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap() as usize).sum()
        });
        assert_eq!(wins, 1);
    }
}
