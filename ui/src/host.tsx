// A host: facts, CPU/memory bars, graphs of the last hour, maintenance mode, its VMs.
import { hostState, useStore } from './store';
import { Action, Bar, CpuBar } from './widgets';
import { Graphs } from './graphs';
import { VList } from './vlist';
import { bytes, isLocal, post } from './api';
import { vmStatus } from './tree';
import { started } from './tasks';

export function HostPage(props: { host: string }) {
  const s = useStore();
  const h = s.hosts.find((x) => x.name === props.host);
  if (!h) return <div class="page muted">{s.loaded ? `No host ${props.host} in the cluster.` : 'Loading…'}</div>;
  const i = h.info;
  const target = isLocal(h.name) ? undefined : h.name;
  return (
    <div class="page">
      <h2><span class={`dot ${hostState(h)}`} /> Host {h.name} <span class="tag" data-testid="host-state">{hostState(h)}</span></h2>
      {h.error && <div class="error">{h.error}</div>}
      {i && (
        <>
          <div class="toolbar">
            {i.maintenance
              ? <Action label="Leave maintenance" testid="host-activate" run={() => started(h.name, post('/api/v1/host/activate', {}, target))} />
              : <Action label="Maintenance mode" testid="host-maintenance" confirm={`Evacuate ${h.name}: its VMs are migrated to other hosts and nothing new starts here. Go on?`}
                  run={() => started(h.name, post('/api/v1/host/maintenance', {}, target))} />}
          </div>
          <table class="kv">
            <tbody>
              <tr><td>Hostname</td><td>{i.hostname}</td></tr>
              <tr><td>Acceleration</td><td>{i.accel}</td></tr>
              <tr><td>QEMU</td><td>{i.qemu_version}</td></tr>
              <tr><td>CPUs</td><td>{i.cpus}</td></tr>
              <tr><td>VMs</td><td>{i.vms_running} running of {i.vms_defined}</td></tr>
              <tr><td>CPU busy</td><td><CpuBar info={i} /></td></tr>
              <tr><td>Memory of VMs</td><td><Bar value={i.vm_memory_bytes} max={i.memory_bytes} label={`${bytes(i.vm_memory_bytes)} of ${bytes(i.memory_bytes)}`} /></td></tr>
              <tr><td>Host memory used</td><td><Bar value={i.memory_bytes - i.memory_available_bytes} max={i.memory_bytes} label={`${bytes(i.memory_bytes - i.memory_available_bytes)} of ${bytes(i.memory_bytes)}`} /></td></tr>
            </tbody>
          </table>
        </>
      )}
      <h3>Load, last hour</h3>
      <Graphs path="/api/v1/host/metrics" host={target} />
      <h3>VMs ({h.vms.length})</h3>
      <div class="vm-table">
        <div class="vhead"><span>Name</span><span>State</span><span>CPUs</span><span>Memory</span></div>
        <VList items={h.vms} rowHeight={26} testid="host-vms" row={(v) => (
          <a class="vline" href={`#/vm/${encodeURIComponent(h.name)}/${encodeURIComponent(v.spec.name)}`}>
            <span>{v.spec.name}</span><span><span class={`dot ${vmStatus(v)}`} /> {vmStatus(v)}</span>
            <span>{v.spec.cpus ?? 1}</span><span>{bytes(v.spec.memory_mib * 1048576)}</span>
          </a>
        )} />
      </div>
    </div>
  );
}
