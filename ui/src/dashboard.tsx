// The start page: VMs by state, each host's CPU and memory, recent tasks and events
// (with who caused them).
import { hostState, useStore } from './store';
import { Bar, CpuBar } from './widgets';
import { ago, bytes } from './api';
import { vmStatus } from './tree';
import { TaskList } from './tasks';

export function Dashboard() {
  const s = useStore();
  const counts: Record<string, number> = {};
  let total = 0;
  for (const h of s.hosts) for (const v of h.vms) { const st = vmStatus(v); counts[st] = (counts[st] ?? 0) + 1; total++; }
  const order = ['running', 'paused', 'migrating', 'starting', 'shutting_down', 'suspended', 'crashed', 'stopped', 'template'];
  return (
    <div class="page">
      <h2>Overview</h2>
      <div class="tiles" data-testid="status-counts">
        <div class="tile"><b>{total}</b><span>VMs</span></div>
        {order.filter((k) => counts[k]).map((k) => (
          <div class={`tile ${k}`} data-state={k}><b>{counts[k]}</b><span><span class={`dot ${k}`} /> {k.replace('_', ' ')}</span></div>
        ))}
        <div class="tile"><b>{s.hosts.length}</b><span>hosts</span></div>
      </div>
      <h3>Hosts</h3>
      <table class="grid" data-testid="hosts">
        <thead><tr><th>Host</th><th>State</th><th>VMs</th><th>CPU</th><th>Memory of VMs</th><th>Host memory</th><th>Accel</th></tr></thead>
        <tbody>
          {s.hosts.map((h) => (
            <tr>
              <td><a href={`#/host/${encodeURIComponent(h.name)}`}>{h.name}</a></td>
              <td><span class={`dot ${hostState(h)}`} /> {hostState(h)}</td>
              <td>{h.info ? `${h.info.vms_running} running / ${h.info.vms_defined}` : '—'}</td>
              <td>{h.info && <CpuBar info={h.info} />}</td>
              <td>{h.info && <Bar value={h.info.vm_memory_bytes} max={h.info.memory_bytes} label={`${bytes(h.info.vm_memory_bytes)} of ${bytes(h.info.memory_bytes)}`} />}</td>
              <td>{h.info && <Bar value={h.info.memory_bytes - h.info.memory_available_bytes} max={h.info.memory_bytes} label={`${bytes(h.info.memory_bytes - h.info.memory_available_bytes)} used`} />}</td>
              <td>{h.info?.accel ?? ''}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <div class="cols">
        <div>
          <h3>Recent tasks</h3>
          <TaskList tasks={s.tasks.slice(0, 8)} />
        </div>
        <div>
          <h3>Recent events</h3>
          <table class="grid small" data-testid="events">
            <tbody>
              {s.events.slice(0, 12).map((e) => (
                <tr><td class="muted nowrap">{ago(e.time_ms)}</td><td>{e.vm ?? ''}</td><td>{e.kind}</td><td>{e.message}</td><td class="muted nowrap" title="Who caused it">{e.user ?? ''}</td></tr>
              ))}
            </tbody>
          </table>
        </div>
      </div>
    </div>
  );
}
