// Tasks: every long operation (start, migrate, snapshot, ...) is a task with progress
// and a log; a failed one shows the server's reason. The panel at the bottom lists the
// recent ones, each with who started it (a user, `host:NAME` for another host of the
// cluster, `ferry` for the daemon's own work); a click opens the log.
import { useEffect, useState } from 'preact/hooks';
import { ago, get, type Task } from './api';
import { store, useStore, type HostTask } from './store';
import { Modal } from './widgets';

/** Follows a task an action started: it shows in the panel; returns its id. */
export async function started(host: string, p: Promise<{ task: string }>): Promise<string> {
  const { task } = await p;
  store.track(host, task);
  return task;
}

/** Waits for a task to end; throws with its error when it failed. */
export async function waitTask(host: string | undefined, id: string, onUpdate?: (t: Task) => void): Promise<Task> {
  for (;;) {
    const t = await get<Task>(`/api/v1/tasks/${id}`, host);
    onUpdate?.(t);
    if (t.state !== 'running') {
      store.soon();
      if (t.state === 'failed') throw new Error(t.error ?? 'failed');
      return t;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

function Progress(props: { t: Task }) {
  const pct = Math.round(props.t.progress * 100);
  return (
    <div class={`bar task ${props.t.state}`}>
      <div class="fill" style={{ width: `${props.t.state === 'running' ? pct : 100}%` }} />
      <span>{props.t.state === 'running' ? `${pct}%` : props.t.state}</span>
    </div>
  );
}

export function TaskDialog(props: { task: HostTask; onClose: () => void }) {
  const [t, setT] = useState<Task>(props.task);
  useEffect(() => {
    let live = true;
    const load = () => get<Task>(`/api/v1/tasks/${props.task.id}`, props.task.host).then((x) => live && setT(x)).catch(() => undefined);
    load();
    const i = setInterval(load, 1000);
    return () => { live = false; clearInterval(i); };
  }, [props.task.id]);
  return (
    <Modal title={`Task ${t.kind} ${t.target}`} onClose={props.onClose}>
      <div class="task-detail" data-testid="task-detail">
        <Progress t={t} />
        <div class="muted small" data-testid="task-started">Started {new Date(t.started_ms).toLocaleString()}{t.user ? ` by ${t.user}` : ''}</div>
        {t.error && <div class="error" role="alert">{t.error}</div>}
        <pre class="log">{t.log.join('\n')}</pre>
        {t.result != null && (
          <div>
            <b>Result</b>
            <table class="grid small" data-testid="task-result">
              <tbody>
                {Object.entries(t.result as Record<string, unknown>).map(([k, v]) => (
                  <tr><td>{k}</td><td>{typeof v === 'object' ? JSON.stringify(v) : String(v)}</td></tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
      </div>
    </Modal>
  );
}

export function TaskList(props: { tasks: HostTask[] }) {
  const [open, setOpen] = useState<HostTask | null>(null);
  return (
    <>
      <table class="grid small tasks" data-testid="task-list">
        <tbody>
          {props.tasks.map((t) => (
            <tr onClick={() => setOpen(t)} class="click" data-kind={t.kind} data-state={t.state}>
              <td class="nowrap muted">{ago(t.started_ms)}</td>
              <td>{t.host}</td>
              <td>{t.kind}</td>
              <td>{t.target}</td>
              <td class="muted nowrap" data-testid="task-user" title="Who started it">{t.user ?? ''}</td>
              <td class="w"><Progress t={t} /></td>
              <td class="error-cell">{t.error ?? ''}</td>
            </tr>
          ))}
          {props.tasks.length === 0 && <tr><td class="muted">No tasks yet.</td></tr>}
        </tbody>
      </table>
      {open && <TaskDialog task={open} onClose={() => setOpen(null)} />}
    </>
  );
}

export function TaskPanel() {
  const s = useStore();
  return <TaskList tasks={s.tasks.slice(0, 4)} />;
}

export function TasksPage() {
  const s = useStore();
  return (
    <div class="page">
      <h2>Tasks</h2>
      <TaskList tasks={s.tasks} />
    </div>
  );
}
