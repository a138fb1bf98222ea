//! The agent's background tasks, each with a visible last run, last error and next
//! run (`ferry host status`, `GET /api/v1/host`): a loop that silently fails (a lease
//! that is not renewed, a revocation list that is not synced) shows here.

use ferry_types::BackgroundTask;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Loops(Mutex<BTreeMap<&'static str, BackgroundTask>>);

impl Loops {
    /// Records one run of loop `name` (every `every`): its outcome and when it runs next.
    pub fn report<E: std::fmt::Display>(
        &self,
        name: &'static str,
        every: Duration,
        outcome: Result<(), E>,
    ) {
        let now = crate::events::now_ms();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let t = m.entry(name).or_insert_with(|| BackgroundTask {
            name: name.to_string(),
            ..BackgroundTask::default()
        });
        t.every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        t.runs += 1;
        t.last_run_ms = Some(now);
        t.next_run_ms = Some(now + t.every_ms);
        match outcome {
            Ok(()) => t.last_ok_ms = Some(now),
            Err(e) => {
                t.failures += 1;
                t.last_error = Some(e.to_string());
                t.last_error_ms = Some(now);
            }
        }
    }

    pub fn list(&self) -> Vec<BackgroundTask> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_loop_keeps_its_last_error_and_counts() {
        let l = Loops::default();
        l.report("crl", Duration::from_secs(2), Ok::<(), String>(()));
        l.report("crl", Duration::from_secs(2), Err("etcd unreachable"));
        l.report("crl", Duration::from_secs(2), Ok::<(), String>(()));
        let t = &l.list()[0];
        assert_eq!((t.runs, t.failures), (3, 1));
        assert_eq!(t.last_error.as_deref(), Some("etcd unreachable"));
        assert!(t.last_ok_ms >= t.last_error_ms);
        assert_eq!(t.next_run_ms, t.last_run_ms.map(|r| r + 2000));
    }
}
