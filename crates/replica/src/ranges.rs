//! Serialises overlapping writes: two writes to the same bytes never run at once, so
//! every copy applies them in the same order (writes that do not overlap commute).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next: AtomicU64,
    freed: Notify,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock
            .held
            .lock()
            .expect("ranges")
            .retain(|(_, _, id)| *id != self.id);
        self.lock.freed.notify_waiters();
    }
}

impl RangeLock {
    pub async fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let (start, end) = (offset, offset.saturating_add(len.max(1)));
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut h = self.held.lock().expect("ranges");
                if !h.iter().any(|(s, e, _)| *s < end && start < *e) {
                    let id = self.next.fetch_add(1, Ordering::Relaxed);
                    h.push((start, end, id));
                    return RangeGuard { lock: self, id };
                }
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn overlapping_ranges_wait() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 100).await;
        let _other = l.lock(100, 10).await; // adjacent: no wait
        let l2 = l.clone();
        let t = tokio::spawn(async move {
            let _g = l2.lock(50, 10).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!t.is_finished());
        drop(g);
        t.await.unwrap();
    }
}
