// The REST API as the page uses it: typed calls, errors carrying the server's reason,
// and requests to other hosts of the cluster through this daemon (/api/v1/nodes/HOST).

export type VmState =
  | 'stopped' | 'starting' | 'running' | 'paused' | 'shutting_down' | 'crashed' | 'suspended';

export interface DiskSpec {
  bus?: string; pool?: string; volume?: string | null; size?: string | number | null;
  format?: string; cache?: string; readonly?: boolean; nonpersistent?: boolean;
}
export interface CdromSpec { bus?: string; pool?: string | null; volume?: string | null }
export interface NicSpec { model?: string; bridge: string; mac?: string | null }
export interface VmSpec {
  name: string; cpus?: number; memory_mib: number; disks?: DiskSpec[]; cdroms?: CdromSpec[];
  nics?: NicSpec[]; boot_order?: string[]; [k: string]: unknown;
}
export interface Vm {
  id: number; spec: VmSpec; state: VmState; pid?: number; accel?: string; last_exit?: string;
  template: boolean; current_snapshot?: string; clone_of?: { vm: string; linked: boolean };
  migration?: string;
}
export interface Task {
  id: string; kind: string; target: string; state: 'running' | 'succeeded' | 'failed';
  progress: number; log: string[]; error?: string; result?: unknown; started_ms: number;
  ended_ms?: number;
}
export interface HostInfo {
  name: string; hostname: string; accel: string; cpus: number; memory_bytes: number;
  memory_available_bytes: number; vm_memory_bytes: number; qemu_version: string;
  vms_running: number; vms_defined: number; maintenance?: boolean; cpu_busy?: number;
}
export interface ClusterHost { name: string; api: string; address: string }
export interface Pool {
  spec: { name: string; type?: string; path: string; hosts?: string[] };
  capacity_bytes: number; available_bytes: number; used_bytes: number; volumes: number;
}
export interface Volume {
  pool: string; name: string; format: string; virtual_bytes: number; allocated_bytes: number;
}
export interface Snapshot {
  name: string; parent?: string | null; with_memory: boolean; created_ms: number;
  description?: string;
}
export interface EventItem { seq: number; time_ms: number; vm?: string | null; kind: string; message: string }
export interface MetricsPoint {
  time_ms: number; cpu: number; memory_bytes: number; disk_read_bps: number;
  disk_write_bps: number; net_rx_bps: number; net_tx_bps: number;
}
export interface MetricsHistory {
  interval_s: number; memory_limit_bytes: number; cpu_limit: number; points: MetricsPoint[];
}
export interface Session { authenticated: boolean; host: string }

/** An error answer: the server's reason and its causes. */
export class ApiError extends Error {
  constructor(public status: number, message: string, public causes: string[] = []) {
    super(message);
  }
  get full(): string {
    return this.causes.length ? `${this.message}: ${this.causes.join('; ')}` : this.message;
  }
}

let localHost = '';
/** The host this page's daemon runs on; calls for other hosts go through it. */
export function setLocalHost(h: string) { localHost = h; }
export function isLocal(host: string | undefined) { return !host || host === localHost; }
export function hostPath(host: string | undefined, path: string) {
  return isLocal(host) ? path : `/api/v1/nodes/${encodeURIComponent(host!)}${path}`;
}

export async function call<T>(method: string, path: string, body?: unknown, host?: string): Promise<T> {
  const init: RequestInit = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    (init.headers as Record<string, string>)['content-type'] = 'application/json';
  }
  let resp: Response;
  try {
    resp = await fetch(hostPath(host, path), init);
  } catch (e) {
    throw new ApiError(0, `The daemon does not answer (${String(e)})`);
  }
  const text = await resp.text();
  if (!resp.ok) {
    let msg = `${method} ${path}: ${resp.status}`;
    let causes: string[] = [];
    try {
      const j = JSON.parse(text);
      if (j.error) { msg = j.error; causes = j.causes ?? []; }
    } catch { if (text) msg = text; }
    if (resp.status === 401) window.dispatchEvent(new Event('ferry-logged-out'));
    throw new ApiError(resp.status, msg, causes);
  }
  return (text ? JSON.parse(text) : null) as T;
}

export const get = <T>(path: string, host?: string) => call<T>('GET', path, undefined, host);
export const post = <T>(path: string, body?: unknown, host?: string) => call<T>('POST', path, body ?? {}, host);

export function errText(e: unknown): string {
  return e instanceof ApiError ? e.full : String(e);
}

export function bytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n >= 10 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${u[i]}`;
}

export function ago(ms: number): string {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

export function wsUrl(path: string): string {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}${path}`;
}
