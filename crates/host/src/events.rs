//! The event log: every state change and QEMU event, kept (bounded) in the store and
//! streamed to subscribers.

use ferry_store::{Store, StoreJson};
use ferry_types::Event;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

const KEEP: usize = 1000;
use ferry_store::keys::host::EVENTS as PREFIX;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

struct Ring {
    seq: u64,
    recent: VecDeque<Event>,
}

#[derive(Clone)]
pub struct EventLog {
    ring: Arc<Mutex<Ring>>,
    tx: broadcast::Sender<Event>,
    store: Arc<dyn Store>,
}

impl EventLog {
    pub async fn load(store: Arc<dyn Store>) -> Result<EventLog, ferry_store::StoreError> {
        let recent: VecDeque<Event> = store
            .list_json::<Event>(PREFIX)
            .await?
            .into_iter()
            .collect();
        let seq = recent.back().map_or(0, |e| e.seq);
        let (tx, _) = broadcast::channel(512);
        Ok(EventLog {
            ring: Arc::new(Mutex::new(Ring { seq, recent })),
            tx,
            store,
        })
    }

    /// Records an event (in memory and broadcast now, in the store in the background).
    pub fn emit(&self, vm: Option<&str>, kind: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(vm = vm.unwrap_or(""), kind, %message, "event");
        let (ev, prune) = {
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            r.seq += 1;
            let ev = Event {
                seq: r.seq,
                time_ms: now_ms(),
                vm: vm.map(str::to_string),
                kind: kind.to_string(),
                message,
                user: crate::audit::actor(),
            };
            r.recent.push_back(ev.clone());
            let mut prune = vec![];
            while r.recent.len() > KEEP {
                if let Some(old) = r.recent.pop_front() {
                    prune.push(old.seq);
                }
            }
            (ev, prune)
        };
        let _ = self.tx.send(ev.clone());
        let store = self.store.clone();
        tokio::spawn(async move {
            let _ = store
                .put_json(&ferry_store::keys::host::event(ev.seq), &ev)
                .await;
            for s in prune {
                let _ = store.delete(&ferry_store::keys::host::event(s)).await;
            }
        });
    }

    /// Events after `after` (all kept ones with 0), optionally of one VM.
    pub fn list(&self, after: u64, vm: Option<&str>) -> Vec<Event> {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.recent
            .iter()
            .filter(|e| e.seq > after && vm.is_none_or(|v| e.vm.as_deref() == Some(v)))
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
