// Backups: the stores (usage, dedup factor, garbage collection, verify), the scheduled
// jobs, every backup with restore (also live) and file-level restore (browse a backup's
// files, download one or a folder); and a VM's own backups (its Backups tab).
import { useEffect, useState } from 'preact/hooks';
import type { components } from './api.gen';
import { bytes, call, errText, get, isLocal, post } from './api';
import { store, useStore } from './store';
import { Action, ErrorBox, Modal } from './widgets';
import { started, waitTask } from './tasks';

type S = components['schemas'];
type Backup = S['Backup'];
type BackupList = S['BackupList'];
type StoreDef = S['BackupStore'];
type StoreInfo = S['BackupStoreInfo'];
type Job = S['BackupJob'];
type Files = S['BackupFiles'];
type FileEntry = S['BackupFileEntry'];

const enc = encodeURIComponent;
const when = (unix: number) => new Date(unix * 1000).toLocaleString();
const val = (e: Event) => (e.target as HTMLInputElement).value;
const size = (b: Backup) => b.disks.reduce((a, d) => a + d.size, 0);
const mode = (b: Backup) => (b.disks.every((d) => d.mode === 'incremental') ? 'incremental' : 'full');

/** The backups table with its actions (restore, files, delete). */
function BackupTable(props: { backups: Backup[]; reload: () => void; testid: string }) {
  const [restore, setRestore] = useState<Backup | null>(null);
  const [browse, setBrowse] = useState<Backup | null>(null);
  const [check, setCheck] = useState<Backup | null>(null);
  return (
    <>
      <table class="grid" data-testid={props.testid}>
        <thead><tr><th>Backup</th><th>VM</th><th>Store</th><th>Taken</th><th>Size</th><th>Mode</th><th>Consistency</th><th /></tr></thead>
        <tbody>
          {props.backups.map((b) => (
            <tr data-id={b.id}>
              <td title={b.id}><code>{b.id.slice(0, 12)}</code>{b.protected ? ' 🔒' : ''}</td>
              <td>{b.vm}</td><td>{b.store}</td><td>{when(b.started)}</td><td>{bytes(size(b))}</td>
              <td title={b.disks.map((d) => `${d.name}: ${d.reason ?? d.mode}`).join('\n')}>{mode(b)}</td>
              <td>{b.consistency}{b.state !== 'complete' ? ` (${b.state})` : ''}</td>
              <td>
                <button onClick={() => setRestore(b)} data-testid="backup-restore">Restore</button>
                <button onClick={() => setBrowse(b)} data-testid="backup-files">Files</button>
                <button onClick={() => setCheck(b)} data-testid="backup-boot-check">Boot check</button>
                <Action label="Delete" confirm={`Delete backup ${b.id} of ${b.vm}? Garbage collection frees its chunks.`}
                  run={() => call('DELETE', `/api/v1/backups/${enc(b.id)}`).then(props.reload)} />
              </td>
            </tr>
          ))}
          {props.backups.length === 0 && <tr><td class="muted" colSpan={8}>No backups.</td></tr>}
        </tbody>
      </table>
      {restore && <RestoreDialog backup={restore} onClose={() => setRestore(null)} />}
      {browse && <FilesDialog backup={browse} onClose={() => setBrowse(null)} />}
      {check && <BootCheckDialog backup={check} onClose={() => setCheck(null)} />}
    </>
  );
}

/** Restore a backup as a new VM: on which host, into which pool, started or live. */
function RestoreDialog(props: { backup: Backup; onClose: () => void }) {
  const s = useStore();
  const b = props.backup;
  const [name, setName] = useState(`${b.vm}-restored`);
  const [host, setHost] = useState(s.hosts[0]?.name ?? '');
  const [pool, setPool] = useState('');
  const [start, setStart] = useState(false);
  const [live, setLive] = useState(false);
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  async function go() {
    setError('');
    setBusy(true);
    try {
      const body: S['BackupRestore'] = { as: name, start: start || live, live, ...(pool ? { pool } : {}) };
      const remote = isLocal(host) ? undefined : host;
      const id = await started(host, post(`/api/v1/backups/${enc(b.id)}/restore`, body, remote));
      // a live-restore's VM runs as soon as the task ends; a plain one once copied
      await waitTask(remote, id);
      props.onClose();
      location.hash = `#/vm/${enc(host)}/${enc(name)}`;
    } catch (e) { setError(errText(e)); } finally { setBusy(false); }
  }
  return (
    <Modal title={`Restore ${b.vm} from ${when(b.started)}`} onClose={props.onClose}>
      <label>New VM's name <input value={name} data-testid="restore-name" onInput={(e) => setName(val(e))} /></label>
      <label>Host <select value={host} onChange={(e) => setHost(val(e))}>{s.hosts.map((h) => <option>{h.name}</option>)}</select></label>
      <label>Pool <select value={pool} onChange={(e) => setPool(val(e))}>
        <option value="">as backed up (else default)</option>
        {s.pools.map((p) => <option>{p.spec.name}</option>)}
      </select></label>
      <label class="check"><input type="checkbox" checked={start || live} disabled={live} onChange={(e) => setStart((e.target as HTMLInputElement).checked)} /> Start it when restored</label>
      <label class="check"><input type="checkbox" checked={live} data-testid="restore-live" onChange={(e) => setLive((e.target as HTMLInputElement).checked)} /> Live-restore: start at once, the disks fill from the backup in the background</label>
      <ErrorBox error={error} />
      <div class="buttons"><button class="primary" disabled={!name || busy} onClick={go} data-testid="restore-go">{busy ? 'Restoring…' : 'Restore'}</button></div>
    </Modal>
  );
}

/** Boot a backup on throw-away overlays (no network) until its marker shows. */
function BootCheckDialog(props: { backup: Backup; onClose: () => void }) {
  const b = props.backup;
  const [marker, setMarker] = useState('login:');
  const [timeout, setTimeout_] = useState(300);
  const [result, setResult] = useState<S['BackupBootCheckResult'] | null>(null);
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  async function go() {
    setError('');
    setResult(null);
    setBusy(true);
    try {
      const id = await started(store.local, post(`/api/v1/backups/${enc(b.id)}/boot-check`, { marker, timeout_s: timeout }));
      const t = await waitTask(undefined, id);
      setResult(t.result as unknown as S['BackupBootCheckResult']);
    } catch (e) { setError(errText(e)); } finally { setBusy(false); }
  }
  return (
    <Modal title={`Boot check of ${b.vm}'s backup of ${when(b.started)}`} onClose={props.onClose}>
      <p class="muted">The backup boots on throw-away disks, its NICs on a network of their own, until the text below shows on its serial console.</p>
      <label>Ready marker <input value={marker} data-testid="boot-marker" onInput={(e) => setMarker(val(e))} /></label>
      <label>Seconds at most <input type="number" min={10} max={3600} value={timeout} onInput={(e) => setTimeout_(Number(val(e)))} /></label>
      <ErrorBox error={error} />
      {result && (
        <div data-testid="boot-result" class={result.booted ? '' : 'error'}>
          {result.booted ? `Up after ${result.seconds.toFixed(0)} s.` : `Not up: "${result.marker}" not seen within ${result.seconds.toFixed(0)} s.`}
          <pre class="log">{result.console}</pre>
        </div>
      )}
      <div class="buttons"><button class="primary" disabled={busy || !marker} onClick={go} data-testid="boot-go">{busy ? 'Booting…' : 'Boot it'}</button></div>
    </Modal>
  );
}

const icon: Record<string, string> = { disk: '🖴', volume: '▦', dir: '📁', file: '📄', symlink: '↪', other: '·' };

/** A backup's files: folders open, files and folders download (a folder as tar). A
 *  helper VM reads the backup; the first listing takes seconds. */
function FilesDialog(props: { backup: Backup; onClose: () => void }) {
  const b = props.backup;
  const [path, setPath] = useState('/');
  const [list, setList] = useState<Files | null>(null);
  const [error, setError] = useState('');
  const [loading, setLoading] = useState(false);
  useEffect(() => {
    setLoading(true);
    setError('');
    get<Files>(`/api/v1/backups/${enc(b.id)}/files?path=${enc(path)}`)
      .then(setList)
      .catch((e) => setError(errText(e)))
      .finally(() => setLoading(false));
  }, [path]);
  const join = (e: FileEntry) => (path === '/' ? `/${e.name}` : `${path}/${e.name}`);
  const opens = (e: FileEntry) => e.kind === 'disk' || e.kind === 'dir' || (e.kind === 'volume' && !e.error);
  const download = (p: string) => `/api/v1/backups/${enc(b.id)}/files/download?path=${enc(p)}`;
  const parts = path.split('/').filter(Boolean);
  return (
    <Modal title={`Files of ${b.vm}'s backup of ${when(b.started)}`} onClose={props.onClose}>
      <div class="crumbs" data-testid="files-path">
        <button class="link" onClick={() => setPath('/')}>backup</button>
        {parts.map((p, i) => <> / <button class="link" onClick={() => setPath(`/${parts.slice(0, i + 1).join('/')}`)}>{p}</button></>)}
        {parts.length >= 3 && <> · <a href={download(path)} download data-testid="files-download-folder">download this folder (tar)</a></>}
      </div>
      {loading && <div class="muted">{list ? 'Reading…' : 'Starting the helper VM that reads the backup…'}</div>}
      <ErrorBox error={error} />
      {list && (
        <table class="grid small" data-testid="files">
          <thead><tr><th>Name</th><th>Size</th><th>Modified</th><th>Mode</th><th /></tr></thead>
          <tbody>
            {list.entries.map((e) => (
              <tr data-name={e.name}>
                <td>{icon[e.kind]} {opens(e) && e.utf8
                  ? <button class="link" onClick={() => setPath(join(e))}>{e.name}</button>
                  : e.name}
                  {e.target && <span class="muted"> → {e.target}</span>}
                  {e.fs && <span class="muted"> ({e.fs})</span>}
                  {e.error && <span class="muted"> (unreadable: {e.error})</span>}
                </td>
                <td>{e.kind === 'dir' || e.kind === 'symlink' ? '' : bytes(e.size)}</td>
                <td>{e.mtime ? when(e.mtime) : ''}</td>
                <td>{e.mode ? e.mode.toString(8).padStart(4, '0') : ''}</td>
                <td>{(e.kind === 'file' || e.kind === 'dir') && e.utf8 && <a href={download(join(e))} download>{e.kind === 'dir' ? 'tar' : 'download'}</a>}</td>
              </tr>
            ))}
            {list.entries.length === 0 && <tr><td class="muted" colSpan={5}>Empty.</td></tr>}
          </tbody>
        </table>
      )}
      {list?.truncated && <div class="muted">More entries than one listing carries: the first {list.entries.length} shown (download the folder for all).</div>}
    </Modal>
  );
}

/** A VM's backups, and a backup now. */
export function VmBackups(props: { vm: string; host: string }) {
  const [list, setList] = useState<Backup[]>([]);
  const [stores, setStores] = useState<StoreDef[]>([]);
  const [store, setStore] = useState('');
  const [error, setError] = useState('');
  const load = () => get<BackupList>(`/api/v1/backups?vm=${enc(props.vm)}`).then((l) => setList(l.backups)).catch((e) => setError(errText(e)));
  useEffect(() => {
    load();
    get<StoreDef[]>('/api/v1/backup-stores').then((s) => { setStores(s); setStore((x) => x || (s[0]?.name ?? '')); }).catch((e) => setError(errText(e)));
  }, [props.vm]);
  const remote = isLocal(props.host) ? undefined : props.host;
  return (
    <div>
      <div class="form-row">
        <label>Store <select value={store} data-testid="backup-store" onChange={(e) => setStore(val(e))}>{stores.map((s) => <option>{s.name}</option>)}</select></label>
        <Action label="Back up now" testid="backup-now" class="primary" disabled={!store}
          run={async () => { await waitTask(remote, await started(props.host, post('/api/v1/backups', { vm: props.vm, store }, remote))); await load(); }} />
        {stores.length === 0 && <span class="muted">No backup store yet: define one under <a href="#/backups">Backups</a>.</span>}
      </div>
      <ErrorBox error={error} />
      <BackupTable backups={list} reload={load} testid="vm-backups" />
    </div>
  );
}

function keepText(k: S['BackupKeep'] | undefined): string {
  if (!k) return 'all';
  const parts = (['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const).filter((x) => k[x]).map((x) => `${x} ${k[x]}`);
  return parts.length ? parts.join(', ') : 'all';
}

/** Datacenter → Backups: stores, jobs, every backup. */
export function BackupsPage() {
  const [stores, setStores] = useState<StoreInfo[]>([]);
  const [jobs, setJobs] = useState<Job[]>([]);
  const [backups, setBackups] = useState<Backup[]>([]);
  const [error, setError] = useState('');
  const [ns, setNs] = useState({ name: '', path: '' });
  const [nj, setNj] = useState({ name: '', store: '', schedule: 'daily 02:00', vms: '', keepDaily: 7 });
  async function load() {
    try {
      const defs = await get<StoreDef[]>('/api/v1/backup-stores');
      const infos = await Promise.all(defs.map((d) => get<StoreInfo>(`/api/v1/backup-stores/${enc(d.name)}`).catch(() => null)));
      setStores(infos.filter((x): x is StoreInfo => !!x));
      setJobs(await get<Job[]>('/api/v1/backup-jobs'));
      setBackups((await get<BackupList>('/api/v1/backups')).backups);
    } catch (e) { setError(errText(e)); }
  }
  useEffect(() => { load(); }, []);
  async function task(p: Promise<{ task: string }>) {
    await waitTask(undefined, await started(store.local, p));
    await load();
  }
  return (
    <div class="page">
      <h2>Backups</h2>
      <ErrorBox error={error} />
      <h3>Stores</h3>
      <table class="grid" data-testid="backup-stores">
        <thead><tr><th>Store</th><th>Path</th><th>Backups</th><th>Stored</th><th>Of data</th><th>Dedup</th><th>Free</th><th /></tr></thead>
        <tbody>
          {stores.map((st) => (
            <tr data-name={st.name}>
              <td>{st.name}</td><td>{st.path}</td><td>{st.usage.backups}</td><td>{bytes(st.usage.stored_bytes)}</td>
              <td>{bytes(st.usage.logical_bytes)}</td><td data-testid="dedup">{st.usage.dedup_factor.toFixed(1)}×</td><td>{bytes(st.usage.free_bytes)}</td>
              <td>
                <Action label="Collect garbage" run={() => task(post(`/api/v1/backup-stores/${enc(st.name)}/gc`))} />
                <Action label="Verify" run={() => task(post(`/api/v1/backup-stores/${enc(st.name)}/verify`, {}))} />
                <Action label="Forget" confirm={`Forget store ${st.name}? Its folder and backups stay.`}
                  run={() => call('DELETE', `/api/v1/backup-stores/${enc(st.name)}`).then(load)} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <div class="form-row">
        <label>Name <input value={ns.name} data-testid="store-name" onInput={(e) => setNs({ ...ns, name: val(e) })} /></label>
        <label>Folder (on every host) <input value={ns.path} placeholder="/srv/backups" data-testid="store-path" onInput={(e) => setNs({ ...ns, path: val(e) })} /></label>
        <Action label="Add store" testid="store-create" disabled={!ns.name || !ns.path}
          run={() => post('/api/v1/backup-stores', ns).then(() => { setNs({ name: '', path: '' }); return load(); })} />
      </div>

      <h3>Jobs</h3>
      <table class="grid" data-testid="backup-jobs">
        <thead><tr><th>Job</th><th>Store</th><th>When (UTC)</th><th>VMs</th><th>Keep</th><th>Next</th><th>Last run</th><th /></tr></thead>
        <tbody>
          {jobs.map((j) => (
            <tr data-name={j.name}>
              <td>{j.name}{j.enabled ? '' : ' (off)'}</td><td>{j.store}</td><td>{j.schedule}</td>
              <td>{j.selection.all ? `all${j.selection.hosts?.length ? ` on ${j.selection.hosts.join(', ')}` : ''}` : (j.selection.vms ?? []).join(', ')}</td>
              <td>{keepText(j.keep)}</td>
              <td>{j.next_run ? when(j.next_run) : ''}</td>
              <td>{j.last_result ? `${when(j.last_result.ended)} on ${j.last_result.host}: ${j.last_result.backed_up.length} backed up${j.last_result.failed.length ? `, ${j.last_result.failed.length} failed (${j.last_result.failed.map((f) => `${f.vm}: ${f.error}`).join('; ')})` : ''}` : 'never'}</td>
              <td>
                <Action label="Run now" run={() => task(post(`/api/v1/backup-jobs/${enc(j.name)}/run`))} />
                <Action label="Delete" confirm={`Delete job ${j.name}? Its backups stay.`} run={() => call('DELETE', `/api/v1/backup-jobs/${enc(j.name)}`).then(load)} />
              </td>
            </tr>
          ))}
          {jobs.length === 0 && <tr><td class="muted" colSpan={8}>No jobs.</td></tr>}
        </tbody>
      </table>
      <div class="form-row">
        <label>Name <input value={nj.name} data-testid="job-name" onInput={(e) => setNj({ ...nj, name: val(e) })} /></label>
        <label>Store <select value={nj.store} onChange={(e) => setNj({ ...nj, store: val(e) })}><option value="" />{stores.map((s) => <option>{s.name}</option>)}</select></label>
        <label>When <input value={nj.schedule} title='"daily 02:00", "mon..fri 22:30", "*:15", "hourly", "4h" (UTC)' onInput={(e) => setNj({ ...nj, schedule: val(e) })} /></label>
        <label>VMs (comma-separated, or * for all) <input value={nj.vms} onInput={(e) => setNj({ ...nj, vms: val(e) })} /></label>
        <label>Keep daily <input type="number" min={0} value={nj.keepDaily} style={{ width: '60px' }} onInput={(e) => setNj({ ...nj, keepDaily: Number(val(e)) })} /></label>
        <Action label="Add job" testid="job-create" disabled={!nj.name || !nj.store || !nj.vms}
          run={() => {
            const all = nj.vms.trim() === '*';
            const spec: S['BackupJobSpec'] = {
              name: nj.name, store: nj.store, schedule: nj.schedule, enabled: true,
              selection: { all, hosts: [], vms: all ? [] : nj.vms.split(',').map((x) => x.trim()).filter(Boolean) },
              keep: { last: 0, hourly: 0, daily: nj.keepDaily, weekly: 0, monthly: 0, yearly: 0 },
            };
            return post('/api/v1/backup-jobs', spec).then(load);
          }} />
      </div>

      <h3>All backups</h3>
      <BackupTable backups={backups} reload={load} testid="all-backups" />
    </div>
  );
}

