// Storage pools and their volumes; uploading an image or ISO from the browser (in
// pieces, going on after a broken piece) and having the daemon download one from a URL.
import { useEffect, useState } from 'preact/hooks';
import { bytes, errText, get, post, upload, type Volume } from './api';
import { useStore } from './store';
import { Bar } from './widgets';
import { waitTask } from './tasks';

const enc = encodeURIComponent;

function Transfer(props: { pool: string; done: () => void }) {
  const [file, setFile] = useState<File | null>(null);
  const [name, setName] = useState('');
  const [url, setUrl] = useState('');
  const [sha, setSha] = useState('');
  const [progress, setProgress] = useState<number | null>(null);
  const [msg, setMsg] = useState('');
  const [error, setError] = useState('');
  const val = (e: Event) => (e.target as HTMLInputElement).value;
  async function run(what: () => Promise<string>, label: string) {
    setError('');
    setMsg('');
    setProgress(0);
    try {
      const task = await what();
      setMsg(`${label}: checking and importing…`);
      await waitTask(undefined, task);
      setMsg(`${label}: volume ${name} ready`);
      props.done();
    } catch (e) {
      setError(errText(e));
    } finally {
      setProgress(null);
    }
  }
  return (
    <div class="form" data-testid="transfer">
      <h4>Upload an image or ISO</h4>
      <div class="form-row">
        <label>File <input type="file" name="upload-file" onChange={(e) => {
          const f = (e.target as HTMLInputElement).files?.[0] ?? null;
          setFile(f);
          if (f && !name) setName(f.name.replace(/[^A-Za-z0-9_.-]/g, '-'));
        }} /></label>
        <label>Volume name <input name="volume-name" value={name} onInput={(e) => setName(val(e))} /></label>
        <button class="primary" disabled={!file || !name || progress !== null} data-testid="upload-start"
          onClick={() => file && run(() => upload(props.pool, name, file, setProgress), 'upload')}>Upload</button>
      </div>
      <h4>Download from a URL (the daemon fetches it)</h4>
      <div class="form-row">
        <label>URL <input name="download-url" value={url} onInput={(e) => setUrl(val(e))} placeholder="https://…/image.qcow2" /></label>
        <label>SHA-256 (optional) <input name="download-sha" value={sha} onInput={(e) => setSha(val(e))} /></label>
        <button disabled={!url || !name || progress !== null} data-testid="download-start"
          onClick={() => run(() => post<{ task: string }>(`/api/v1/pools/${enc(props.pool)}/download`, { name, url, sha256: sha || undefined }).then((t) => t.task), 'download')}>Download</button>
      </div>
      {progress !== null && <Bar value={progress} max={1} label={`${Math.round(progress * 100)} %`} />}
      {msg && <div class="muted" data-testid="transfer-msg">{msg}</div>}
      {error && <div class="error" role="alert">{error}</div>}
    </div>
  );
}

export function PoolsPage() {
  const s = useStore();
  const [open, setOpen] = useState<string | null>(null);
  const [vols, setVols] = useState<Volume[]>([]);
  const [error, setError] = useState('');
  const [tick, setTick] = useState(0);
  useEffect(() => {
    if (!open) return;
    get<Volume[]>(`/api/v1/pools/${enc(open)}/volumes`).then(setVols).catch((e) => setError(errText(e)));
  }, [open, tick]);
  return (
    <div class="page">
      <h2>Storage pools</h2>
      <table class="grid" data-testid="pools">
        <thead><tr><th>Pool</th><th>Type</th><th>Path</th><th>Volumes</th><th>Space</th></tr></thead>
        <tbody>
          {s.pools.map((p) => (
            <tr class="click" onClick={() => setOpen(p.spec.name)} data-testid={`pool-${p.spec.name}`}>
              <td>{p.spec.name}</td><td>{p.spec.type ?? 'dir'}{p.spec.hosts?.length ? ` (${p.spec.hosts.join(', ')})` : ''}</td><td>{p.spec.path}</td><td>{p.volumes}</td>
              <td><Bar value={p.capacity_bytes - p.available_bytes} max={p.capacity_bytes} label={`${bytes(p.available_bytes)} free of ${bytes(p.capacity_bytes)}`} /></td>
            </tr>
          ))}
        </tbody>
      </table>
      {error && <div class="error">{error}</div>}
      {open && (
        <>
          <h3>Volumes of {open}</h3>
          <table class="grid" data-testid="volumes">
            <thead><tr><th>Volume</th><th>Format</th><th>Size</th><th>Allocated</th></tr></thead>
            <tbody>{vols.map((v) => <tr><td>{v.name}</td><td>{v.format}</td><td>{bytes(v.virtual_bytes)}</td><td>{bytes(v.allocated_bytes)}</td></tr>)}</tbody>
          </table>
          <Transfer pool={open} done={() => setTick(tick + 1)} />
        </>
      )}
    </div>
  );
}
