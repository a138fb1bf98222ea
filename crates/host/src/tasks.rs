//! Tasks: long operations in the background with state, progress and a log. Kept in
//! memory while running (progress changes often) and written to the store when they end;
//! a task that was running when the daemon died is marked failed at the next start.

use crate::error::AgentError;
use crate::events::{now_ms, EventLog};
use ferry_store::{Store, StoreJson};
use ferry_types::{Task, TaskState};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use ferry_store::keys::host::TASKS as PREFIX;
const KEEP: usize = 500;

#[derive(Clone)]
pub struct Tasks {
    map: Arc<Mutex<HashMap<String, Task>>>,
    store: Arc<dyn Store>,
    events: EventLog,
}

/// Handed to a running task to report progress and log lines.
#[derive(Clone)]
pub struct TaskCtx {
    id: String,
    tasks: Tasks,
}

impl TaskCtx {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn log(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(task = %self.id, "{line}");
        self.tasks.update(&self.id, |t| t.log.push(line));
    }
    /// Sets what the task produced.
    pub fn result(&self, v: serde_json::Value) {
        self.tasks.update(&self.id, |t| t.result = Some(v));
    }
    pub fn progress(&self, p: f32) {
        self.tasks
            .update(&self.id, |t| t.progress = p.clamp(0.0, 1.0));
    }
}

impl Tasks {
    pub async fn load(
        store: Arc<dyn Store>,
        events: EventLog,
    ) -> Result<Tasks, ferry_store::StoreError> {
        let mut map = HashMap::new();
        for mut t in store.list_json::<Task>(PREFIX).await? {
            if t.state == TaskState::Running {
                t.state = TaskState::Failed;
                t.error = Some("The daemon stopped while the task ran".into());
                t.ended_ms = Some(now_ms());
                store.put_json(&format!("{PREFIX}{}", t.id), &t).await?;
            }
            map.insert(t.id.clone(), t);
        }
        Ok(Tasks {
            map: Arc::new(Mutex::new(map)),
            store,
            events,
        })
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Task)) {
        if let Some(t) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
        {
            f(t);
        }
    }

    pub fn get(&self, id: &str) -> Option<Task> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// All tasks, newest first.
    pub fn list(&self) -> Vec<Task> {
        let mut v: Vec<Task> = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(b.id.cmp(&a.id)));
        v
    }

    /// Starts `work` as a task and returns its id at once.
    pub fn spawn<F, Fut>(&self, kind: &str, target: &str, work: F) -> String
    where
        F: FnOnce(TaskCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let id = format!("{:x}-{:06x}", now_ms(), rand::random::<u32>() & 0xff_ffff);
        let task = Task {
            id: id.clone(),
            kind: kind.to_string(),
            target: target.to_string(),
            state: TaskState::Running,
            progress: 0.0,
            log: vec![],
            error: None,
            result: None,
            started_ms: now_ms(),
            ended_ms: None,
            user: crate::audit::actor(),
        };
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), task.clone());
        let tasks = self.clone();
        let ctx = TaskCtx {
            id: id.clone(),
            tasks: tasks.clone(),
        };
        let store = self.store.clone();
        tokio::spawn(crate::audit::carry(async move {
            let _ = store.put_json(&format!("{PREFIX}{}", task.id), &task).await;
            let vm = (task.kind.starts_with("vm.")).then_some(task.target.clone());
            tasks.events.emit(
                vm.as_deref(),
                "task",
                format!("{} started ({})", task.kind, task.id),
            );
            let r = work(ctx).await;
            tasks.update(&task.id, |t| {
                t.ended_ms = Some(now_ms());
                match &r {
                    Ok(()) => {
                        t.state = TaskState::Succeeded;
                        t.progress = 1.0;
                    }
                    Err(e) => {
                        t.state = TaskState::Failed;
                        t.error = Some(crate::error_chain(e).join(": "));
                    }
                }
            });
            let done = tasks.get(&task.id);
            if let Some(done) = done {
                let msg = match &done.error {
                    None => format!("{} succeeded ({})", done.kind, done.id),
                    Some(e) => format!("{} failed ({}): {e}", done.kind, done.id),
                };
                tasks.events.emit(vm.as_deref(), "task", msg);
                let _ = store.put_json(&format!("{PREFIX}{}", done.id), &done).await;
            }
            tasks.prune().await;
        }));
        id
    }

    async fn prune(&self) {
        let old: Vec<String> = {
            let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if m.len() <= KEEP {
                return;
            }
            let mut done: Vec<(u64, String)> = m
                .values()
                .filter(|t| t.state != TaskState::Running)
                .map(|t| (t.started_ms, t.id.clone()))
                .collect();
            done.sort();
            let n = m.len() - KEEP;
            let old: Vec<String> = done.into_iter().take(n).map(|(_, id)| id).collect();
            for id in &old {
                m.remove(id);
            }
            old
        };
        for id in old {
            let _ = self.store.delete(&format!("{PREFIX}{id}")).await;
        }
    }

    /// Waits until the task ends and returns it.
    pub async fn wait(&self, id: &str) -> Option<Task> {
        loop {
            let t = self.get(id)?;
            if t.state != TaskState::Running {
                return Some(t);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// `done / total` as a task's progress (0 when the total is unknown).
#[expect(
    clippy::cast_possible_truncation,
    reason = "a progress between 0 and 1 needs no more than f32's precision"
)]
pub fn fraction(done: u64, total: u64) -> f32 {
    if total == 0 {
        return 0.0;
    }
    (done.min(total) as f64 / total as f64) as f32
}
