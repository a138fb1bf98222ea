// Storage pools and their volumes.
import { useEffect, useState } from 'preact/hooks';
import { bytes, errText, get, type Volume } from './api';
import { useStore } from './store';
import { Bar } from './widgets';

export function PoolsPage() {
  const s = useStore();
  const [open, setOpen] = useState<string | null>(null);
  const [vols, setVols] = useState<Volume[]>([]);
  const [error, setError] = useState('');
  useEffect(() => {
    if (!open) return;
    get<Volume[]>(`/api/v1/pools/${encodeURIComponent(open)}/volumes`).then(setVols).catch((e) => setError(errText(e)));
  }, [open]);
  return (
    <div class="page">
      <h2>Storage pools</h2>
      <table class="grid" data-testid="pools">
        <thead><tr><th>Pool</th><th>Type</th><th>Path</th><th>Volumes</th><th>Space</th></tr></thead>
        <tbody>
          {s.pools.map((p) => (
            <tr class="click" onClick={() => setOpen(p.spec.name)}>
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
          <table class="grid">
            <thead><tr><th>Volume</th><th>Format</th><th>Size</th><th>Allocated</th></tr></thead>
            <tbody>{vols.map((v) => <tr><td>{v.name}</td><td>{v.format}</td><td>{bytes(v.virtual_bytes)}</td><td>{bytes(v.allocated_bytes)}</td></tr>)}</tbody>
          </table>
        </>
      )}
    </div>
  );
}
