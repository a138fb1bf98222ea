// What the page knows of the cluster. In a cluster it follows the daemon's change stream
// (`/api/v1/cluster/changes`: which hosts' VMs changed, whether the hosts did) and reads
// again only what a frame names; alone, every event of the host's event stream
// refreshes it. No timer re-reads VMs: one reads the hosts' facts (load, memory) every
// 15 s and follows tasks started on other hosts. Components subscribe with useStore().
import { useEffect, useState } from 'preact/hooks';
import { get, isLocal, wsUrl, type ClusterChange, type ClusterHost, type ClusterStatus, type EventItem, type HostInfo, type Pool, type Task, type Vm } from './api';

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
  private changes?: WebSocket;
  /** The change stream is open: the page follows it. */
  private following = false;
  private refreshing = false;

  subscribe(f: () => void) { this.listeners.add(f); return () => this.listeners.delete(f); }
  private emit() { for (const f of this.listeners) f(); }

  start(local: string) {
    this.local = local;
    this.refresh();
    this.timer = window.setInterval(() => this.refreshFacts(), 15000);
    this.openEvents();
  }

  stop() {
    clearInterval(this.timer);
    this.timer = 0;
    this.ws?.close();
    this.ws = undefined;
    const c = this.changes;
    this.changes = undefined;
    c?.close();
  }

  /** The cluster's change stream (opened once the host is seen in a cluster; a host
   * alone has none). */
  private openChanges() {
    const ws = new WebSocket(wsUrl('/api/v1/cluster/changes'));
    this.changes = ws;
    ws.onopen = () => { this.following = true; };
    ws.onmessage = (m) => {
      let c: ClusterChange;
      try { c = JSON.parse(m.data) as ClusterChange; } catch { return; }
      if (c.all) { this.soon(); return; }
      if (c.hosts) this.refreshHosts();
      if (c.vms_of?.length) this.refreshVms(c.vms_of);
    };
    ws.onclose = () => {
      if (this.changes !== ws) return;
      this.following = false;
      this.changes = undefined;
      // The next refresh reopens it while the host is in a cluster (a daemon restart).
      setTimeout(() => this.soon(), 3000);
    };
  }

  /** The VMs of `names` read again (from this host's cluster cache). */
  async refreshVms(names: string[]) {
    await Promise.all(names.map(async (name) => {
      const h = this.hosts.find((x) => x.name === name);
      if (!h) { this.soon(); return; }
      try {
        const vms = await get<Vm[]>(`/api/v1/vms?host=${encodeURIComponent(name)}`);
        vms.sort((a, b) => a.spec.name.localeCompare(b.spec.name));
        h.vms = vms;
      } catch { /* the next frame or refresh */ }
    }));
    this.hosts = [...this.hosts];
    this.emit();
  }

  /** Members and their states read again (not their VMs); a new member in full. */
  async refreshHosts() {
    const status = await get<ClusterStatus>('/api/v1/cluster/status').catch(() => null);
    if (!status?.clustered) return;
    if (status.members.some((m) => !this.hosts.some((h) => h.name === m.name))
      || this.hosts.some((h) => !status.members.some((m) => m.name === h.name))) {
      this.soon();
      return;
    }
    for (const h of this.hosts) h.member = status.members.find((m) => m.name === h.name)?.state;
    this.hosts = [...this.hosts];
    this.emit();
  }

  /** What changes without an event: each host's facts (load, memory), tasks on other
   * hosts; and everything when no stream tells of changes. */
  async refreshFacts() {
    if (!this.following && !this.ws) { this.refresh(); return; }
    await Promise.all(this.hosts.map(async (h) => {
      try { h.info = await get<HostInfo>('/api/v1/host', isLocal(h.name) ? undefined : h.name); h.error = undefined; }
      catch (e) { h.error = String(e); }
    }));
    await this.refreshRemoteTasks();
    this.hosts = [...this.hosts];
    this.emit();
  }

  private async refreshRemoteTasks() {
    const remote: HostTask[] = [];
    for (const r of this.remoteTasks) {
      try { remote.push({ ...(await get<Task>(`/api/v1/tasks/${r.id}`, r.host)), host: r.host }); } catch { /* gone */ }
    }
    this.remoteTasks = this.remoteTasks.slice(-20);
    this.tasks = [...this.tasks.filter((t) => t.host === this.local), ...remote]
      .sort((a, b) => b.started_ms - a.started_ms);
  }

  /** This host's tasks and pools read again (its events say they changed). */
  async refreshLocal() {
    const [pools, tasks] = await Promise.all([
      get<Pool[]>('/api/v1/pools').catch(() => this.pools),
      get<Task[]>('/api/v1/tasks').catch(() => null),
    ]);
    this.pools = pools;
    if (tasks) {
      this.tasks = [...tasks.map((t) => ({ ...t, host: this.local })), ...this.tasks.filter((t) => t.host !== this.local)]
        .sort((a, b) => b.started_ms - a.started_ms);
    }
    this.emit();
  }

  private openEvents() {
    const ws = new WebSocket(wsUrl('/api/v1/events/stream'));
    this.ws = ws;
    ws.onmessage = (m) => {
      try {
        const e = JSON.parse(m.data) as EventItem;
        this.events = [e, ...this.events].slice(0, 50);
      } catch { /* not an event */ }
      // In a cluster the change stream tells of VMs; alone, the event does.
      if (this.following) this.soonLocal(); else this.soon();
    };
    ws.onclose = () => { if (this.ws === ws) setTimeout(() => this.openEvents(), 3000); };
  }

  /** A refresh shortly (events come in bursts). */
  soon() {
    clearTimeout(this.pending);
    this.pending = window.setTimeout(() => this.refresh(), 250);
  }

  private pendingLocal = 0;
  /** This host's tasks and pools shortly. */
  soonLocal() {
    clearTimeout(this.pendingLocal);
    this.pendingLocal = window.setTimeout(() => this.refreshLocal(), 250);
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
        if (!this.changes && this.timer) this.openChanges();
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
      this.tasks = tasks.map((t) => ({ ...t, host: this.local }));
      await this.refreshRemoteTasks();
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
