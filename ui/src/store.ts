// What the page knows of the cluster, refreshed by polling and on every event from the
// daemon's event stream. Components subscribe with useStore().
import { useEffect, useState } from 'preact/hooks';
import { get, isLocal, wsUrl, type ClusterHost, type ClusterStatus, type EventItem, type HostInfo, type Pool, type Task, type Vm } from './api';

export interface HostEntry {
  name: string;
  api: string;
  info?: HostInfo;
  vms: Vm[];
  error?: string;
  /** The cluster's view (etcd clusters): online, maintenance, fenced, offline. */
  member?: string;
}

/** A host at a glance: the cluster's view where there is one, else what it answered. */
export function hostState(h: HostEntry): string {
  if (h.member) return h.member;
  if (h.error) return 'offline';
  return h.info?.maintenance ? 'maintenance' : 'online';
}

/** A task with the host it runs on. */
export interface HostTask extends Task { host: string }

class Store {
  local = '';
  hosts: HostEntry[] = [];
  pools: Pool[] = [];
  tasks: HostTask[] = [];
  events: EventItem[] = [];
  loaded = false;
  private remoteTasks: { host: string; id: string }[] = [];
  private listeners = new Set<() => void>();
  private timer = 0;
  private pending = 0;
  private ws?: WebSocket;
  private refreshing = false;

  subscribe(f: () => void) { this.listeners.add(f); return () => this.listeners.delete(f); }
  private emit() { for (const f of this.listeners) f(); }

  start(local: string) {
    this.local = local;
    this.refresh();
    this.timer = window.setInterval(() => this.refresh(), 5000);
    this.openEvents();
  }

  stop() {
    clearInterval(this.timer);
    this.ws?.close();
    this.ws = undefined;
  }

  private openEvents() {
    const ws = new WebSocket(wsUrl('/api/v1/events/stream'));
    this.ws = ws;
    ws.onmessage = (m) => {
      try {
        const e = JSON.parse(m.data) as EventItem;
        this.events = [e, ...this.events].slice(0, 50);
      } catch { /* not an event */ }
      this.soon();
    };
    ws.onclose = () => { if (this.ws === ws) setTimeout(() => this.openEvents(), 3000); };
  }

  /** A refresh shortly (events come in bursts). */
  soon() {
    clearTimeout(this.pending);
    this.pending = window.setTimeout(() => this.refresh(), 250);
  }

  /** Follows a task started on another host. */
  track(host: string, id: string) {
    if (!isLocal(host)) this.remoteTasks.push({ host, id });
    this.soon();
  }

  async refresh() {
    if (this.refreshing) return;
    this.refreshing = true;
    try {
      let members: ClusterHost[] = [];
      try { members = await get<ClusterHost[]>('/api/v1/cluster/hosts'); } catch { members = []; }
      if (!members.some((m) => m.name === this.local)) members = [{ name: this.local, api: '', address: '' }, ...members];
      const hosts = await Promise.all(members.map(async (m): Promise<HostEntry> => {
        const h: string | undefined = m.name === this.local ? undefined : m.name;
        try {
          const [info, vms] = await Promise.all([get<HostInfo>('/api/v1/host', h), get<Vm[]>(`/api/v1/vms?host=${encodeURIComponent(m.name)}`, h)]);
          vms.sort((a, b) => a.spec.name.localeCompare(b.spec.name));
          return { name: m.name, api: m.api, info, vms };
        } catch (e) {
          return { name: m.name, api: m.api, vms: [], error: String(e) };
        }
      }));
      const status = await get<ClusterStatus>('/api/v1/cluster/status').catch(() => null);
      if (status?.clustered) {
        for (const h of hosts) h.member = status.members.find((m) => m.name === h.name)?.state;
      }
      this.hosts = hosts;
      const [pools, tasks, events] = await Promise.all([
        get<Pool[]>('/api/v1/pools').catch(() => this.pools),
        get<Task[]>('/api/v1/tasks').catch(() => [] as Task[]),
        this.events.length ? Promise.resolve(null) : get<EventItem[]>('/api/v1/events').catch(() => [] as EventItem[]),
      ]);
      this.pools = pools;
      if (events) this.events = events.slice(-50).reverse();
      const remote: HostTask[] = [];
      for (const r of this.remoteTasks) {
        try { remote.push({ ...(await get<Task>(`/api/v1/tasks/${r.id}`, r.host)), host: r.host }); } catch { /* gone */ }
      }
      this.remoteTasks = this.remoteTasks.slice(-20);
      this.tasks = [...tasks.map((t) => ({ ...t, host: this.local })), ...remote]
        .sort((a, b) => b.started_ms - a.started_ms);
      this.loaded = true;
    } finally {
      this.refreshing = false;
      this.emit();
    }
  }

  vm(host: string, name: string): Vm | undefined {
    return this.hosts.find((h) => h.name === host)?.vms.find((v) => v.spec.name === name);
  }
}

export const store = new Store();

export function useStore(): Store {
  const [, setTick] = useState(0);
  useEffect(() => store.subscribe(() => setTick((t) => t + 1)), []);
  return store;
}
