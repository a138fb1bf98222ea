// A VM: state and actions (start, shut down, stop, reboot, pause/resume, migrate,
// clone, snapshot, template, delete), tabs for the summary and hardware (edit while
// stopped, move disks), serial and VNC consoles, graphs, snapshots and backups.
import { useEffect, useRef, useState } from 'preact/hooks';
import { bytes, call, errText, get, isLocal, post, type GuestInfo, type Snapshot, type SnapshotList, type Vm, type Volume } from './api';
import { store, useStore } from './store';
import { Action, ErrorBox, Modal } from './widgets';
import { SerialConsole } from './console';
import { VncConsole } from './vnc';
import { Graphs } from './graphs';
import { started, waitTask } from './tasks';
import { vmStatus } from './tree';
import { VmBackups } from './backups';

const enc = encodeURIComponent;

function act(host: string, name: string, what: string, body?: unknown) {
  return started(host, post(`/api/v1/vms/${enc(name)}/${what}`, body, isLocal(host) ? undefined : host));
}

export function VmPage(props: { host: string; name: string; tab: string }) {
  const s = useStore();
  const found = s.vm(props.host, props.name);
  const last = useRef<Vm | undefined>(found);
  if (found) last.current = found;
  const [dialog, setDialog] = useState('');
  // A VM that moved (migration, HA, maintenance): its page follows it, unless a dialog
  // (the migration's report) is still open.
  const elsewhere = found ? undefined : s.hosts.find((h) => h.name !== props.host && h.vms.some((v) => v.spec.name === props.name));
  useEffect(() => {
    if (elsewhere && !dialog) location.replace(`#/vm/${enc(elsewhere.name)}/${enc(props.name)}/${props.tab}`);
  }, [elsewhere?.name, dialog]);
  const vm = found ?? (dialog ? last.current : undefined);
  if (!vm) return <div class="page muted">{s.loaded ? `No VM ${props.name} on ${props.host}.` : 'Loading…'}</div>;
  const h = props.host;
  const n = props.name;
  const st = vm.state;
  const running = st === 'running' || st === 'paused';
  const base = `#/vm/${enc(h)}/${enc(n)}`;
  const tabs: [string, string][] = [['summary', 'Summary'], ['hardware', 'Hardware'], ['console', 'Console'], ['vnc', 'VNC'], ['graphs', 'Graphs'], ['snapshots', 'Snapshots'], ['backups', 'Backups']];
  const remote = !isLocal(h);
  let body;
  switch (props.tab) {
    case 'hardware': body = <Hardware vm={vm} host={h} />; break;
    case 'console': body = running ? <SerialConsole name={n} host={h} /> : <div class="muted">The VM is {st}: start it to use its console.</div>; break;
    case 'vnc': body = running ? <VncConsole name={n} host={h} /> : <div class="muted">The VM is {st}: start it to see its screen.</div>; break;
    case 'graphs': body = <Graphs path={`/api/v1/vms/${enc(n)}/metrics`} host={remote ? h : undefined} />; break;
    case 'snapshots': body = <Snapshots vm={vm} host={h} />; break;
    case 'backups': body = <VmBackups vm={n} host={h} />; break;
    default: body = <Summary vm={vm} host={h} />;
  }
  return (
    <div class="page">
      <h2 data-testid="vm-title"><span class={`dot ${vmStatus(vm)}`} /> {n} <span class="tag" data-testid="vm-state">{vmStatus(vm)}</span> <span class="muted small">on {h}</span></h2>
      {!vm.template && (
        <div class="toolbar" data-testid="vm-actions">
          <Action label="Start" testid="vm-start" disabled={running || st === 'starting'} run={() => act(h, n, 'start')} class="primary" />
          <Action label="Shut down" testid="vm-shutdown" disabled={!running} run={() => act(h, n, 'shutdown', {})} />
          <Action label="Stop" testid="vm-stop" disabled={!running && st !== 'starting'} confirm={`Stop ${n} at once (like pulling the plug)?`} run={() => act(h, n, 'stop')} />
          <Action label="Reboot" testid="vm-reboot" disabled={st !== 'running'} run={() => act(h, n, 'reboot', {})} />
          {st === 'paused'
            ? <Action label="Resume" testid="vm-resume" run={() => act(h, n, 'resume')} />
            : <Action label="Pause" testid="vm-pause" disabled={st !== 'running'} run={() => act(h, n, 'pause')} />}
          <button onClick={() => setDialog('migrate')} disabled={s.hosts.length < 2} data-testid="vm-migrate">Migrate</button>
          <button onClick={() => setDialog('clone')} data-testid="vm-clone">Clone</button>
          <Action label="Make template" disabled={st !== 'stopped'} confirm={`${n} becomes an immutable template (cloned, never started). Go on?`}
            run={() => post(`/api/v1/vms/${enc(n)}/template`, {}, remote ? h : undefined).then(() => store.soon())} />
          <button class="danger" onClick={() => setDialog('delete')} data-testid="vm-delete">Delete</button>
        </div>
      )}
      {vm.template && (
        <div class="toolbar">
          <button onClick={() => setDialog('clone')} data-testid="vm-clone">Clone</button>
          <button class="danger" onClick={() => setDialog('delete')} data-testid="vm-delete">Delete</button>
        </div>
      )}
      <div class="tabs">
        {tabs.map(([k, l]) => <a href={`${base}/${k}`} class={props.tab === k ? 'active' : ''} data-testid={`tab-${k}`}>{l}</a>)}
      </div>
      <div class="tab-body">{body}</div>
      {dialog === 'migrate' && <MigrateDialog vm={vm} host={h} onClose={() => setDialog('')} />}
      {dialog === 'clone' && <CloneDialog vm={vm} host={h} onClose={() => setDialog('')} />}
      {dialog === 'delete' && <DeleteDialog vm={vm} host={h} onClose={() => setDialog('')} />}
    </div>
  );
}

// What the guest agent says (the guest's host name, OS, addresses), or why it cannot.
function GuestAgent(props: { vm: Vm; host: string }) {
  const v = props.vm;
  const running = v.state === 'running' || v.state === 'paused';
  const [info, setInfo] = useState<GuestInfo | null>(null);
  const [error, setError] = useState('');
  const [tick, setTick] = useState(0);
  useEffect(() => {
    if (!v.spec.agent || !running) return;
    setError('');
    get<GuestInfo>(`/api/v1/vms/${enc(v.spec.name)}/agent`, isLocal(props.host) ? undefined : props.host)
      .then(setInfo).catch((e) => { setInfo(null); setError(errText(e)); });
  }, [v.spec.name, v.state, tick]);
  if (!v.spec.agent) return <span class="muted">off</span>;
  if (!running) return <span class="muted">on (the VM is {v.state})</span>;
  return (
    <div data-testid="guest-agent">
      {error && <div class="error">{error}</div>}
      {info && (
        <>
          <div>{info.hostname ?? '?'} — {info.os?.pretty_name ?? 'unknown OS'}{info.os?.kernel_release ? `, kernel ${info.os.kernel_release}` : ''}</div>
          {(info.interfaces ?? []).map((i) => <div class="small">{i.name} {i.mac ?? ''}: {(i.addresses ?? []).join(', ') || 'no address'}</div>)}
        </>
      )}
      <button class="small" onClick={() => setTick(tick + 1)}>Refresh</button>
    </div>
  );
}

function Summary(props: { vm: Vm; host: string }) {
  const v = props.vm;
  const ci = v.spec.cloud_init;
  return (
    <table class="kv" data-testid="vm-summary">
      <tbody>
        <tr><td>State</td><td>{v.state}{v.migration ? ` (migrating ${v.migration})` : ''}</td></tr>
        {v.last_exit && <tr><td>Last exit</td><td>{v.last_exit}</td></tr>}
        <tr><td>CPUs</td><td>{v.spec.cpus ?? 1}</td></tr>
        <tr><td>Memory</td><td>{bytes(v.spec.memory_mib * 1048576)}</td></tr>
        <tr><td>Disks</td><td>{(v.spec.disks ?? []).map((d, i) => <div>disk{i}: {d.bus} {d.pool}/{d.volume}</div>)}</td></tr>
        <tr><td>CD-ROMs</td><td>{(v.spec.cdroms ?? []).map((c, i) => <div>cdrom{i}: {c.volume ? `${c.pool}/${c.volume}` : 'empty'}</div>)}</td></tr>
        <tr><td>NICs</td><td>{(v.spec.nics ?? []).map((c, i) => <div>net{i}: {c.model ?? 'virtio'} on {c.bridge}, MAC {c.mac}</div>)}</td></tr>
        <tr><td>Boot order</td><td>{(v.spec.boot_order ?? []).join(', ') || 'disks, CD-ROMs, NICs'}</td></tr>
        <tr><td>Firmware</td><td data-testid="firmware">{v.spec.machine ?? 'pc'}, {v.spec.firmware === 'uefi' ? `UEFI${v.spec.secure_boot ? ' with Secure Boot' : ''}` : 'BIOS'}{v.spec.tpm ? ', TPM 2.0' : ''}</td></tr>
        <tr><td>Guest agent</td><td><GuestAgent vm={v} host={props.host} /></td></tr>
        {ci && <tr><td>cloud-init</td><td data-testid="cloud-init">{[ci.user && `user ${ci.user}`, `host name ${ci.hostname ?? '(the VM name)'}`,
          ...(ci.network ?? []).map((n) => `net${n.nic ?? 0} ${n.ip}${n.gw ? ` via ${n.gw}` : ''}`),
          (ci.ssh_keys ?? []).length ? `${(ci.ssh_keys ?? []).length} SSH key(s)` : ''].filter(Boolean).join(', ')}</td></tr>}
        {v.pid && <tr><td>QEMU</td><td>pid {v.pid}, {v.accel}</td></tr>}
        {v.clone_of && <tr><td>Clone of</td><td>{v.clone_of.vm} ({v.clone_of.linked ? 'linked' : 'full'})</td></tr>}
        {v.current_snapshot && <tr><td>Current snapshot</td><td>{v.current_snapshot}</td></tr>}
      </tbody>
    </table>
  );
}

function Hardware(props: { vm: Vm; host: string }) {
  const s = useStore();
  const v = props.vm;
  const n = v.spec.name;
  const remote = isLocal(props.host) ? undefined : props.host;
  const [cpus, setCpus] = useState(v.spec.cpus ?? 1);
  const [mem, setMem] = useState(v.spec.memory_mib);
  const [move, setMove] = useState<number | null>(null);
  const [disk, setDisk] = useState({ bus: 'virtio', size: '1G', pool: s.pools[0]?.spec.name ?? 'local' });
  const [nic, setNic] = useState({ bridge: '', model: 'virtio' });
  const [bridges, setBridges] = useState<string[]>([]);
  const [isos, setIsos] = useState<Volume[]>([]);
  useEffect(() => {
    get<{ name: string }[]>('/api/v1/bridges', remote).then((b) => setBridges(b.map((x) => x.name))).catch(() => setBridges([]));
    Promise.all(s.pools.map((p) => get<Volume[]>(`/api/v1/pools/${enc(p.spec.name)}/volumes`, remote).catch(() => [] as Volume[])))
      .then((l) => setIsos(l.flat().filter((x) => x.name.endsWith('.iso'))));
  }, [props.host, s.pools.length]);
  const stopped = v.state === 'stopped' && !v.template;
  const changeable = !v.template;
  const refresh = () => store.soon();
  return (
    <div>
      <h3>Processors and memory</h3>
      <div class="form-row">
        <label>CPUs <input type="number" min={1} value={cpus} disabled={!stopped} onInput={(e) => setCpus(Number((e.target as HTMLInputElement).value))} /></label>
        <label>Memory (MiB) <input type="number" min={16} value={mem} disabled={!stopped} onInput={(e) => setMem(Number((e.target as HTMLInputElement).value))} /></label>
        <Action label="Save" testid="vm-save" disabled={!stopped}
          run={() => call('PUT', `/api/v1/vms/${enc(n)}`, { ...v.spec, cpus, memory_mib: mem }, remote).then(refresh)} />
        {!stopped && <span class="muted small">Edited while stopped.</span>}
      </div>
      <h3>Disks</h3>
      <table class="grid" data-testid="disks">
        <thead><tr><th>Id</th><th>Bus</th><th>Volume</th><th>Cache</th><th /></tr></thead>
        <tbody>
          {(v.spec.disks ?? []).map((d, i) => (
            <tr data-volume={d.volume ?? ''}><td>disk{i}</td><td>{d.bus}</td><td>{d.pool}/{d.volume}</td><td>{d.cache ?? 'none'}</td>
              <td>
                <button onClick={() => setMove(i)} disabled={!changeable}>Move disk</button>
                <Action label="Grow" disabled={!changeable} run={async () => {
                  const size = window.prompt(`New size of disk${i} (larger than now, e.g. 2G)`);
                  if (size) { await post(`/api/v1/pools/${enc(d.pool ?? '')}/volumes/${enc(d.volume ?? '')}/resize`, { size }, remote); refresh(); }
                }} />
                <Action label="Detach" disabled={!changeable} confirm={`Detach disk${i} from ${n}? (The volume stays in its pool.)`}
                  run={() => call('DELETE', `/api/v1/vms/${enc(n)}/disks/${i}`, undefined, remote).then(refresh)} />
              </td></tr>
          ))}
        </tbody>
      </table>
      <div class="form-row">
        <label>Bus <select value={disk.bus} onChange={(e) => setDisk({ ...disk, bus: (e.target as HTMLSelectElement).value })}>{['virtio', 'scsi', 'sata', 'ide'].map((b) => <option>{b}</option>)}</select></label>
        <label>Size <input name="new-disk-size" value={disk.size} onInput={(e) => setDisk({ ...disk, size: (e.target as HTMLInputElement).value })} /></label>
        <label>Pool <select value={disk.pool} onChange={(e) => setDisk({ ...disk, pool: (e.target as HTMLSelectElement).value })}>{s.pools.map((p) => <option>{p.spec.name}</option>)}</select></label>
        <Action label="Add disk" testid="disk-add" disabled={!changeable} run={() => post(`/api/v1/vms/${enc(n)}/disks`, disk, remote).then(refresh)} />
        <span class="muted small">Hot-plugged while running (virtio, SCSI).</span>
      </div>
      <h3>CD-ROMs</h3>
      <table class="grid">
        <tbody>
          {(v.spec.cdroms ?? []).map((c, i) => (
            <tr><td>cdrom{i}</td><td>{c.bus ?? 'ide'}</td>
              <td><select value={c.volume ? `${c.pool}/${c.volume}` : ''} disabled={!changeable} onChange={(e) => {
                const val = (e.target as HTMLSelectElement).value;
                const [pool, volume] = val ? val.split('/') : [null, null];
                call('PUT', `/api/v1/vms/${enc(n)}/cdroms/${i}`, { bus: c.bus, pool, volume }, remote).then(refresh).catch((err) => window.alert(errText(err)));
              }}><option value="">empty</option>{isos.map((x) => <option value={`${x.pool}/${x.name}`}>{x.pool}/{x.name}</option>)}</select></td></tr>
          ))}
          {(v.spec.cdroms ?? []).length === 0 && <tr><td class="muted">No CD-ROM drive (the wizard or ferry vm edit adds one).</td></tr>}
        </tbody>
      </table>
      <h3>Network</h3>
      <table class="grid">
        <tbody>
          {(v.spec.nics ?? []).map((c, i) => (
            <tr><td>net{i}</td><td>{c.model ?? 'virtio'}</td><td>{c.bridge}</td><td>{c.mac}</td>
              <td><Action label="Remove" disabled={!changeable} confirm={`Remove net${i} from ${n}?`} run={() => call('DELETE', `/api/v1/vms/${enc(n)}/nics/${i}`, undefined, remote).then(refresh)} /></td></tr>
          ))}
        </tbody>
      </table>
      <div class="form-row">
        <label>Bridge <select value={nic.bridge} onChange={(e) => setNic({ ...nic, bridge: (e.target as HTMLSelectElement).value })}><option value="" disabled>pick one</option>{bridges.map((b) => <option>{b}</option>)}</select></label>
        <label>Model <select value={nic.model} onChange={(e) => setNic({ ...nic, model: (e.target as HTMLSelectElement).value })}>{['virtio', 'e1000'].map((b) => <option>{b}</option>)}</select></label>
        <Action label="Add NIC" disabled={!changeable || !nic.bridge} run={() => post(`/api/v1/vms/${enc(n)}/nics`, nic, remote).then(refresh)} />
      </div>
      {move !== null && <MoveDialog vm={v} host={props.host} index={move} onClose={() => setMove(null)} />}
    </div>
  );
}

function MoveDialog(props: { vm: Vm; host: string; index: number; onClose: () => void }) {
  const s = useStore();
  const [pool, setPool] = useState(s.pools[0]?.spec.name ?? '');
  const [error, setError] = useState('');
  const [progress, setProgress] = useState('');
  async function go() {
    setError('');
    try {
      const id = await started(props.host, post(`/api/v1/vms/${enc(props.vm.spec.name)}/disks/${props.index}/move`, { pool }, isLocal(props.host) ? undefined : props.host));
      await waitTask(isLocal(props.host) ? undefined : props.host, id, (t) => setProgress(`${Math.round(t.progress * 100)}%`));
      props.onClose();
    } catch (e) { setError(errText(e)); }
  }
  return (
    <Modal title={`Move disk${props.index} of ${props.vm.spec.name}`} onClose={props.onClose}>
      <label>Target pool <select value={pool} onChange={(e) => setPool((e.target as HTMLSelectElement).value)}>
        {s.pools.map((p) => <option value={p.spec.name}>{p.spec.name}</option>)}</select></label>
      {progress && <div>Copying: {progress}</div>}
      <ErrorBox error={error} />
      <div class="buttons"><button class="primary" onClick={go}>Move</button></div>
    </Modal>
  );
}

function MigrateDialog(props: { vm: Vm; host: string; onClose: () => void }) {
  const s = useStore();
  const others = s.hosts.filter((h) => h.name !== props.host);
  const [to, setTo] = useState(others[0]?.name ?? '');
  const [withStorage, setWithStorage] = useState(false);
  const [error, setError] = useState('');
  const [progress, setProgress] = useState<number | null>(null);
  const [report, setReport] = useState<Record<string, unknown> | null>(null);
  const running = props.vm.state === 'running' || props.vm.state === 'paused';
  async function go() {
    setError('');
    setReport(null);
    const remote = isLocal(props.host) ? undefined : props.host;
    try {
      const path = running ? 'migrate' : 'move';
      const body = running ? { to, with_storage: withStorage } : { to };
      const id = await started(props.host, post(`/api/v1/vms/${enc(props.vm.spec.name)}/${path}`, body, remote));
      setProgress(0);
      const t = await waitTask(remote, id, (t) => setProgress(t.progress));
      setReport((t.result as Record<string, unknown>) ?? { result: 'done' });
    } catch (e) { setError(errText(e)); }
  }
  return (
    <Modal title={`${running ? 'Live-migrate' : 'Move'} ${props.vm.spec.name}`} onClose={props.onClose}>
      <label>Target host <select value={to} data-testid="migrate-target" onChange={(e) => setTo((e.target as HTMLSelectElement).value)}>
        {others.map((h) => <option value={h.name}>{h.name}</option>)}</select></label>
      {running && <label class="check"><input type="checkbox" checked={withStorage} onChange={(e) => setWithStorage((e.target as HTMLInputElement).checked)} /> Copy local disks along</label>}
      {progress !== null && !report && !error && <div class="bar"><div class="fill" style={{ width: `${progress * 100}%` }} /><span>{Math.round(progress * 100)}%</span></div>}
      {report && <MigrationReport report={report} />}
      <ErrorBox error={error} />
      <div class="buttons">
        {report ? <button onClick={props.onClose}>Close</button> : <button class="primary" onClick={go} disabled={!to}>Migrate</button>}
      </div>
    </Modal>
  );
}

/** The final report of a migration: the figures an admin looks at first, then the rest. */
function MigrationReport(props: { report: Record<string, unknown> }) {
  const r = props.report;
  const num = (k: string) => (typeof r[k] === 'number' ? (r[k] as number) : undefined);
  const head: [string, string | undefined][] = [
    ['Moved', r.from && r.to ? `${r.from} → ${r.to}` : undefined],
    ['Downtime', num('downtime_ms') != null ? `${num('downtime_ms')} ms` : undefined],
    ['Total time', num('total_ms') != null ? `${num('total_ms')} ms` : undefined],
    ['Memory sent', num('ram_transferred_bytes') != null ? `${bytes(num('ram_transferred_bytes')!)} of ${bytes(num('ram_total_bytes') ?? 0)} in ${num('passes') ?? '?'} passes` : undefined],
    ['Disk copied', num('disk_transferred_bytes') ? bytes(num('disk_transferred_bytes')!) : undefined],
    ['Post-copy', r.postcopy ? 'yes' : undefined],
  ];
  return (
    <table class="grid small" data-testid="migrate-report"><tbody>
      {head.filter(([, v]) => v).map(([k, v]) => <tr><th>{k}</th><td>{v}</td></tr>)}
      {Object.entries(r).map(([k, v]) => <tr class="muted"><td>{k}</td><td>{typeof v === 'object' ? JSON.stringify(v) : String(v)}</td></tr>)}
    </tbody></table>
  );
}

function CloneDialog(props: { vm: Vm; host: string; onClose: () => void }) {
  const [name, setName] = useState(`${props.vm.spec.name}-clone`);
  const [linked, setLinked] = useState(props.vm.template);
  const [error, setError] = useState('');
  async function go() {
    setError('');
    try {
      await started(props.host, post(`/api/v1/vms/${enc(props.vm.spec.name)}/clone`, { name, linked }, isLocal(props.host) ? undefined : props.host));
      props.onClose();
    } catch (e) { setError(errText(e)); }
  }
  return (
    <Modal title={`Clone ${props.vm.spec.name}`} onClose={props.onClose}>
      <label>Name <input value={name} onInput={(e) => setName((e.target as HTMLInputElement).value)} /></label>
      <label class="check"><input type="checkbox" checked={linked} disabled={!props.vm.template} onChange={(e) => setLinked((e.target as HTMLInputElement).checked)} /> Linked clone (templates only: disks are overlays, instant)</label>
      <ErrorBox error={error} />
      <div class="buttons"><button class="primary" onClick={go}>Clone</button></div>
    </Modal>
  );
}

function DeleteDialog(props: { vm: Vm; host: string; onClose: () => void }) {
  const [typed, setTyped] = useState('');
  const [keep, setKeep] = useState(false);
  const [error, setError] = useState('');
  const running = props.vm.state !== 'stopped' && props.vm.state !== 'crashed';
  async function go() {
    setError('');
    try {
      const q = `force=${running}&keep_disks=${keep}`;
      await call('DELETE', `/api/v1/vms/${enc(props.vm.spec.name)}?${q}`, undefined, isLocal(props.host) ? undefined : props.host);
      store.soon();
      location.hash = '#/';
    } catch (e) { setError(errText(e)); }
  }
  return (
    <Modal title={`Delete ${props.vm.spec.name}`} onClose={props.onClose}>
      <p>This removes the VM{keep ? '' : ' and its disks'}{running ? '; it is running and will be stopped first' : ''}. Type its name to confirm.</p>
      <input value={typed} data-testid="delete-confirm" onInput={(e) => setTyped((e.target as HTMLInputElement).value)} />
      <label class="check"><input type="checkbox" checked={keep} onChange={(e) => setKeep((e.target as HTMLInputElement).checked)} /> Keep the disks</label>
      <ErrorBox error={error} />
      <div class="buttons"><button class="danger" disabled={typed !== props.vm.spec.name} onClick={go} data-testid="delete-go">Delete</button></div>
    </Modal>
  );
}

function Snapshots(props: { vm: Vm; host: string }) {
  const n = props.vm.spec.name;
  const remote = isLocal(props.host) ? undefined : props.host;
  const [list, setList] = useState<SnapshotList | null>(null);
  const [error, setError] = useState('');
  const [name, setName] = useState('');
  const [mem, setMem] = useState(true);
  const load = () => get<SnapshotList>(`/api/v1/vms/${enc(n)}/snapshots`, remote).then(setList).catch((e) => setError(errText(e)));
  useEffect(() => { load(); }, [n, props.vm.state]);
  const depth = (sn: Snapshot): number => {
    let d = 0;
    let p = sn.parent;
    while (p && d < 50) { d++; p = list?.snapshots.find((x) => x.name === p)?.parent; }
    return d;
  };
  const running = props.vm.state === 'running' || props.vm.state === 'paused';
  async function then(p: Promise<string>) {
    const id = await p;
    await waitTask(remote, id);
    await load();
  }
  return (
    <div>
      <div class="form-row">
        <label>Name <input value={name} data-testid="snapshot-name" onInput={(e) => setName((e.target as HTMLInputElement).value)} /></label>
        <label class="check"><input type="checkbox" checked={mem && running} disabled={!running} onChange={(e) => setMem((e.target as HTMLInputElement).checked)} /> With memory</label>
        <Action label="Take snapshot" testid="snapshot-create" disabled={!name}
          run={() => then(started(props.host, post(`/api/v1/vms/${enc(n)}/snapshots`, { name, with_memory: mem && running }, remote))).then(() => setName(''))} />
      </div>
      <ErrorBox error={error} />
      <table class="grid" data-testid="snapshot-list">
        <thead><tr><th>Snapshot</th><th>Memory</th><th>Taken</th><th /></tr></thead>
        <tbody>
          {list?.snapshots.map((sn) => (
            <tr data-name={sn.name}>
              <td style={{ paddingLeft: `${8 + depth(sn) * 18}px` }}>{depth(sn) ? '└ ' : ''}{sn.name}{list.current === sn.name ? ' (you are here)' : ''}</td>
              <td>{sn.with_memory ? 'yes' : 'no'}</td>
              <td>{new Date(sn.created_ms).toLocaleString()}</td>
              <td>
                <Action label="Revert" confirm={`Revert ${n} to ${sn.name}? Changes since are lost.`}
                  run={() => then(started(props.host, post(`/api/v1/vms/${enc(n)}/snapshots/${enc(sn.name)}/revert`, {}, remote)))} />
                <Action label="Delete" confirm={`Delete snapshot ${sn.name}?`}
                  run={() => then(started(props.host, call('DELETE', `/api/v1/vms/${enc(n)}/snapshots/${enc(sn.name)}`, undefined, remote)))} />
              </td>
            </tr>
          ))}
          {list && list.snapshots.length === 0 && <tr><td class="muted">No snapshots.</td></tr>}
        </tbody>
      </table>
    </div>
  );
}
