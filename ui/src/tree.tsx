// The resource tree: cluster → hosts → VMs and templates, then pools and backups. Virtualised: a
// thousand VMs are a thousand rows, of which only those in view are drawn.
import { useState } from 'preact/hooks';
import { hostState, useStore } from './store';
import { VList } from './vlist';
import type { Vm } from './api';

interface Row {
  kind: 'cluster' | 'host' | 'vm' | 'pools' | 'pool' | 'group' | 'backups';
  label: string;
  href: string;
  depth: number;
  state?: string;
  host?: string;
  open?: boolean;
}

export function vmStatus(v: Vm): string {
  if (v.migration) return 'migrating';
  if (v.template) return 'template';
  return v.state;
}

export function Tree(props: { route: string[] }) {
  const s = useStore();
  const [closed, setClosed] = useState<Set<string>>(new Set());
  const [filter, setFilter] = useState('');
  const rows: Row[] = [{ kind: 'cluster', label: s.hosts.length > 1 ? 'Cluster' : 'Datacenter', href: '#/', depth: 0 }];
  const f = filter.trim().toLowerCase();
  for (const h of s.hosts) {
    const open = !closed.has(h.name) || !!f;
    rows.push({ kind: 'host', label: h.name, href: `#/host/${encodeURIComponent(h.name)}`, depth: 1, state: hostState(h), host: h.name, open });
    if (!open) continue;
    const vms = h.vms.filter((v) => !f || v.spec.name.toLowerCase().includes(f));
    for (const v of vms.filter((v) => !v.template)) {
      rows.push({ kind: 'vm', label: v.spec.name, href: `#/vm/${encodeURIComponent(h.name)}/${encodeURIComponent(v.spec.name)}`, depth: 2, state: vmStatus(v) });
    }
    const templates = vms.filter((v) => v.template);
    if (templates.length) {
      rows.push({ kind: 'group', label: 'Templates', href: `#/host/${encodeURIComponent(h.name)}`, depth: 2 });
      for (const v of templates) {
        rows.push({ kind: 'vm', label: v.spec.name, href: `#/vm/${encodeURIComponent(h.name)}/${encodeURIComponent(v.spec.name)}`, depth: 3, state: 'template' });
      }
    }
  }
  rows.push({ kind: 'pools', label: 'Storage pools', href: '#/pools', depth: 0 });
  for (const p of s.pools) {
    rows.push({ kind: 'pool', label: `${p.spec.name} (${p.spec.type ?? 'dir'})`, href: '#/pools', depth: 1 });
  }
  rows.push({ kind: 'backups', label: 'Backups', href: '#/backups', depth: 0 });
  const current = `#/${props.route.map(encodeURIComponent).join('/')}`;
  return (
    <div class="tree">
      <input class="filter" placeholder="Filter VMs" value={filter} data-testid="tree-filter"
        onInput={(e) => setFilter((e.target as HTMLInputElement).value)} />
      <VList items={rows} rowHeight={26} testid="tree" row={(r) => (
        <a href={r.href}
          class={`node ${r.kind} ${current.startsWith(r.href) && r.href !== '#/' && r.kind !== 'group' ? 'selected' : ''}`}
          style={{ paddingLeft: `${6 + r.depth * 16}px` }}
          data-kind={r.kind} data-name={r.label}>
          {r.kind === 'host' && (
            <span class="twisty" onClick={(e) => {
              e.preventDefault();
              const n = new Set(closed);
              if (n.has(r.host!)) n.delete(r.host!); else n.add(r.host!);
              setClosed(n);
            }}>{r.open ? '▾' : '▸'}</span>
          )}
          {r.state && <span class={`dot ${r.state}`} title={r.state} />}
          <span class="label">{r.label}</span>
          {r.kind === 'vm' && r.state !== 'stopped' && r.state !== 'template' && <span class="tag">{r.state}</span>}
        </a>
      )} />
    </div>
  );
}
