// The REST API as the page uses it: typed calls, errors carrying the server's reason,
// and requests to other hosts of the cluster through this daemon (/api/v1/nodes/HOST).

import type { components } from './api.gen';

// The API's types, generated from openapi.json (itself generated from the Rust types):
// a field renamed on the server fails the UI's type check.
type S = components['schemas'];
export type VmState = S['VmState'];
export type DiskSpec = S['DiskSpec'];
export type CdromSpec = S['CdromSpec'];
export type NicSpec = S['NicSpec'];
export type VmSpec = S['VmSpec'];
export type Vm = S['Vm'];
export type Task = S['Task'];
export type HostInfo = S['HostInfo'];
export type ClusterHost = S['ClusterHost'];
export type Pool = S['Pool'];
export type Volume = S['Volume'];
export type Snapshot = S['Snapshot'];
export type SnapshotList = S['SnapshotList'];
export type EventItem = S['Event'];
export type MetricsPoint = S['MetricsPoint'];
export type MetricsHistory = S['MetricsHistory'];
export type Session = S['Session'];
export type ClusterStatus = S['ClusterStatus'];
export type ClusterChange = S['ClusterChange'];
export type Bridge = S['Bridge'];
export type User = S['User'];
export type ApiToken = S['ApiToken'];
export type TokenCreated = S['TokenCreated'];
export type AclEntry = S['AclEntry'];
export type Role = S['Role'];
export type GuestInfo = S['GuestInfo'];
export type CloudInit = S['CloudInit'];
export type UploadStatus = S['UploadStatus'];

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
  // The daemon refuses a browser's write without this header: a form or a page on
  // another site cannot send it (cross-site request forgery).
  const init: RequestInit = { method, credentials: 'same-origin', headers: { 'x-ferry-csrf': '1' } };
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
    // 401: the session ended (back to the login form), except where it answers the
    // credentials in the request itself: a login, or a wrong current password.
    if (resp.status === 401 && !credentialsIn(method, path)) window.dispatchEvent(new Event('ferry-logged-out'));
    throw new ApiError(resp.status, msg, causes);
  }
  return (text ? JSON.parse(text) : null) as T;
}

export const get = <T>(path: string, host?: string) => call<T>('GET', path, undefined, host);
export const post = <T>(path: string, body?: unknown, host?: string) => call<T>('POST', path, body ?? {}, host);
export const put = <T>(path: string, body?: unknown, host?: string) => call<T>('PUT', path, body ?? {}, host);
export const del = <T>(path: string, host?: string) => call<T>('DELETE', path, undefined, host);

function credentialsIn(method: string, path: string): boolean {
  return path === '/api/v1/login' || (method === 'PUT' && /^\/api\/v1\/access\/users\/[^/]+\/password$/.test(path));
}

/** Whether `grants` give Administrator on `/` or `/access`: users, tokens and grants. */
export function managesAccess(grants: AclEntry[] | undefined): boolean {
  return (grants ?? []).some((g) => g.role === 'Administrator' && (g.path === '/' || g.path === '/access'));
}

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

/**
 * Uploads `file` as volume `name` of `pool` in pieces of 64 MiB (each a PUT the daemon
 * appends to the upload's partial file); a piece that fails is sent again from what the
 * daemon holds, up to three times. Resolves with the import task's id.
 */
export async function upload(pool: string, name: string, file: Blob, progress: (done: number) => void, host?: string): Promise<string> {
  const path = `/api/v1/pools/${encodeURIComponent(pool)}/upload/${encodeURIComponent(name)}`;
  const piece = 64 << 20;
  let offset = 0;
  let retries = 0;
  for (;;) {
    const end = Math.min(file.size, offset + piece);
    const last = end >= file.size;
    try {
      const st = await putBytes<UploadStatus>(`${path}?offset=${offset}&last=${last}`, file.slice(offset, end), (n) => progress((offset + n) / Math.max(file.size, 1)), host);
      offset = st.received;
      if (last) {
        if (!st.task) throw new ApiError(0, 'the daemon started no import');
        return st.task;
      }
    } catch (e) {
      if (retries++ >= 3 || (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 409)) throw e;
      const st = await get<UploadStatus>(path, host);
      offset = st.received;
    }
  }
}

function putBytes<T>(path: string, body: Blob, progress: (n: number) => void, host?: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open('PUT', hostPath(host, path));
    x.withCredentials = true;
    x.setRequestHeader('x-ferry-csrf', '1');
    x.setRequestHeader('content-type', 'application/octet-stream');
    x.upload.onprogress = (e) => progress(e.loaded);
    x.onerror = () => reject(new ApiError(0, 'the upload broke off'));
    x.onload = () => {
      let j: { error?: string; causes?: string[] } | null = null;
      try { j = JSON.parse(x.responseText); } catch { /* not JSON */ }
      if (x.status >= 200 && x.status < 300) resolve(j as T);
      else reject(new ApiError(x.status, j?.error ?? `PUT ${path}: ${x.status}`, j?.causes ?? []));
    };
    x.send(body);
  });
}
