// Users, API tokens and grants (#/users, for administrators of /access), and one's own
// account (#/account, for everyone): a new password and one's own tokens. A grant gives
// a role (Administrator, Operator, Auditor) on a path and everything below it; root may
// do everything and can be neither deleted nor disabled. A token's value is shown once,
// when it is made.
import { useEffect, useState } from 'preact/hooks';
import {
  ago, del, errText, get, post, put,
  type AclEntry, type ApiToken, type Role, type Session, type TokenCreated, type User,
} from './api';
import { Action, ErrorBox, Modal } from './widgets';

const ROOT = 'root';
const ROLES: Role[] = ['Administrator', 'Operator', 'Auditor'];
const enc = encodeURIComponent;
const val = (f: (v: string) => void) => (e: Event) => f((e.target as HTMLInputElement).value);
const date = (ms: number) => new Date(ms).toLocaleString();

/** Sets `user`'s password; `own`: the logged-in user's, which needs the current one
 * (when it has one) and ends its sessions, so it logs in again with the new one. */
function PasswordDialog(props: {
  user: string; own: boolean; hasPassword: boolean; onSession: (s: Session) => void; onClose: () => void;
}) {
  const [current, setCurrent] = useState('');
  const [pw, setPw] = useState('');
  const [again, setAgain] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  async function go(e: Event) {
    e.preventDefault();
    setError('');
    if (pw !== again) { setError('The two new passwords differ'); return; }
    setBusy(true);
    try {
      await put(`/api/v1/access/users/${enc(props.user)}/password`,
        props.own && props.hasPassword ? { password: pw, current } : { password: pw });
      // A new password ends the user's sessions, this one too: a fresh one.
      if (props.own) props.onSession(await post<Session>('/api/v1/login', { user: props.user, password: pw }));
      props.onClose();
    } catch (err) {
      setError(errText(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <Modal title={`Password of ${props.user}`} onClose={props.onClose}>
      <form onSubmit={go} data-testid="password-dialog">
        {props.own && props.hasPassword && (
          <label>Current password <input type="password" name="current-password" autoComplete="current-password" autoFocus value={current} onInput={val(setCurrent)} /></label>
        )}
        <label>New password <input type="password" name="set-password" autoComplete="new-password" autoFocus={!props.own || !props.hasPassword} value={pw} onInput={val(setPw)} /></label>
        <label>New password again <input type="password" name="set-password-again" autoComplete="new-password" value={again} onInput={val(setAgain)} /></label>
        <p class="muted small">At least 10 characters. Every session of {props.user} ends{props.own ? '; this page logs in again with the new one' : ''}.</p>
        <ErrorBox error={error} />
        <div class="buttons"><button type="submit" class="primary" disabled={busy || !pw || (props.own && props.hasPassword && !current)}>Set password</button></div>
      </form>
    </Modal>
  );
}

/** A user's API tokens: the list (revoked ones stay listed), a new one, revoking. */
function TokensPanel(props: { user: string }) {
  const [tokens, setTokens] = useState<ApiToken[]>([]);
  const [error, setError] = useState('');
  const [id, setId] = useState('');
  const [days, setDays] = useState('');
  const [comment, setComment] = useState('');
  const [made, setMade] = useState<TokenCreated | null>(null);
  const base = `/api/v1/access/users/${enc(props.user)}/tokens`;
  const load = () => get<ApiToken[]>(base).then((t) => { setTokens(t); setError(''); }).catch((e) => setError(errText(e)));
  useEffect(() => { setMade(null); load(); }, [props.user]);
  async function create() {
    setMade(null);
    const body = { id, comment, ...(days ? { expires_days: Number(days) } : {}) };
    setMade(await post<TokenCreated>(base, body));
    setId('');
    setDays('');
    setComment('');
    await load();
  }
  const now = Date.now();
  return (
    <div data-testid="tokens-panel">
      <h3>API tokens of {props.user}</h3>
      <table class="grid" data-testid="tokens">
        <thead><tr><th>Token</th><th>Expires</th><th>Revoked</th><th>Created by</th><th>Comment</th><th /></tr></thead>
        <tbody>
          {tokens.map((t) => (
            <tr data-id={t.id} data-revoked={t.revoked_ms != null ? 'yes' : 'no'}>
              <td><code>{t.user}!{t.id}</code></td>
              <td>{t.expires_ms == null ? 'never' : `${date(t.expires_ms)}${t.expires_ms < now ? ' (expired)' : ''}`}</td>
              <td>{t.revoked_ms != null ? `revoked ${ago(t.revoked_ms)}` : ''}</td>
              <td>{t.created_by ?? ''}</td>
              <td>{t.comment ?? ''}</td>
              <td>{t.revoked_ms == null && (
                <Action label="Revoke" class="danger" confirm={`Revoke the token ${t.user}!${t.id}? Whatever uses it stops working.`}
                  run={() => del(`${base}/${enc(t.id)}`).then(load)} />
              )}</td>
            </tr>
          ))}
          {tokens.length === 0 && <tr><td colSpan={6} class="muted">No tokens.</td></tr>}
        </tbody>
      </table>
      <ErrorBox error={error} />
      <div class="form-row">
        <label>Token ID <input name="token-id" value={id} onInput={val(setId)} /></label>
        <label>Expires in days (optional) <input name="token-expires" type="number" min={1} max={3650} value={days} onInput={val(setDays)} /></label>
        <label>Comment <input name="token-comment" value={comment} onInput={val(setComment)} /></label>
        <Action label="Create token" class="primary" testid="token-create" disabled={!id} run={create} />
      </div>
      {made && (
        <div class="token-made">
          <div>The new token (for <code>Authorization: Bearer …</code>, <code>ferry --token</code> or the login form):</div>
          <code data-testid="token-value">{made.value}</code>
          <div class="muted small">Copy it now: it is shown only this once.</div>
        </div>
      )}
    </div>
  );
}

function AddUserForm(props: { onDone: (name: string) => void }) {
  const [name, setName] = useState('');
  const [pw, setPw] = useState('');
  const [comment, setComment] = useState('');
  async function add() {
    await post('/api/v1/access/users', { name, comment, ...(pw ? { password: pw } : {}) });
    props.onDone(name);
    setName('');
    setPw('');
    setComment('');
  }
  return (
    <div class="form-row">
      <label>Name <input name="new-user" value={name} onInput={val(setName)} /></label>
      <label>Password (optional: without one, tokens only) <input name="new-password" type="password" autoComplete="new-password" value={pw} onInput={val(setPw)} /></label>
      <label>Comment <input name="new-comment" value={comment} onInput={val(setComment)} /></label>
      <Action label="Add user" class="primary" testid="user-add" disabled={!name} run={add} />
    </div>
  );
}

function GrantForm(props: { users: User[]; onDone: () => void }) {
  const [role, setRole] = useState<Role>('Operator');
  const [path, setPath] = useState('/');
  const [user, setUser] = useState('');
  const choices = props.users.filter((u) => u.name !== ROOT);
  const who = choices.some((u) => u.name === user) ? user : (choices[0]?.name ?? '');
  return (
    <div class="form-row">
      <label>Role <select name="grant-role" value={role} onChange={(e) => setRole((e.target as HTMLSelectElement).value as Role)}>
        {ROLES.map((r) => <option value={r}>{r}</option>)}</select></label>
      <label>Path (/, /vms, /vms/NAME, /pools, /pools/NAME, /cluster, /access) <input name="grant-path" value={path} onInput={val(setPath)} /></label>
      <label>User <select name="grant-user" value={who} onChange={(e) => setUser((e.target as HTMLSelectElement).value)}>
        {choices.map((u) => <option value={u.name}>{u.name}</option>)}</select></label>
      <Action label="Grant" class="primary" testid="grant-add" disabled={!who || !path}
        run={() => post('/api/v1/access/acl', { path, user: who, role }).then(props.onDone)} />
    </div>
  );
}

/** Administrators: every user, the selected one's tokens, every grant. */
export function UsersPage(props: { session: Session; onSession: (s: Session) => void }) {
  const me = props.session.user ?? '';
  const [users, setUsers] = useState<User[]>([]);
  const [acl, setAcl] = useState<AclEntry[]>([]);
  const [error, setError] = useState('');
  const [selected, setSelected] = useState<string | null>(null);
  const [pwFor, setPwFor] = useState<User | null>(null);
  const load = () => Promise.all([get<User[]>('/api/v1/access/users'), get<AclEntry[]>('/api/v1/access/acl')])
    .then(([u, a]) => { setUsers(u); setAcl(a); setError(''); })
    .catch((e) => setError(errText(e)));
  useEffect(() => { load(); }, []);
  const user = (name: string, body: { enabled?: boolean }) => put(`/api/v1/access/users/${enc(name)}`, body).then(load);
  return (
    <div class="page">
      <h2>Users</h2>
      <ErrorBox error={error} />
      <table class="grid" data-testid="users">
        <thead><tr><th>User</th><th>Enabled</th><th>Password set</th><th>Created by</th><th>Comment</th><th /></tr></thead>
        <tbody>
          {users.map((u) => (
            <tr data-name={u.name} class={selected === u.name ? 'selected' : ''}>
              <td><button class="link" data-testid="user-select" title="Its API tokens" onClick={() => setSelected(u.name)}>{u.name}</button>{u.name === me && <span class="tag">you</span>}</td>
              <td>{u.enabled ? 'yes' : <b class="off">disabled</b>}</td>
              <td>{u.has_password ? 'yes' : 'no (tokens only)'}</td>
              <td>{u.created_by ?? ''}</td>
              <td>{u.comment ?? ''}</td>
              <td class="nowrap">
                <button onClick={() => setPwFor(u)}>Set password</button>{' '}
                {u.name !== ROOT && (u.enabled
                  ? <Action label="Disable" confirm={`Disable ${u.name}? It can no longer log in, its tokens stop working and its sessions end.`} run={() => user(u.name, { enabled: false })} />
                  : <Action label="Enable" run={() => user(u.name, { enabled: true })} />)}{' '}
                {u.name !== ROOT && (
                  <Action label="Delete" class="danger" confirm={`Delete the user ${u.name} with its tokens and grants?`}
                    run={() => del(`/api/v1/access/users/${enc(u.name)}`).then(() => { if (selected === u.name) setSelected(null); return load(); })} />
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <h3>Add a user</h3>
      <AddUserForm onDone={() => load()} />

      {selected && <TokensPanel user={selected} key={selected} />}

      <h3>Grants</h3>
      <table class="grid" data-testid="grants">
        <thead><tr><th>Path</th><th>User</th><th>Role</th><th /></tr></thead>
        <tbody>
          {acl.map((g) => (
            <tr data-path={g.path} data-user={g.user} data-role={g.role}>
              <td><code>{g.path}</code></td><td>{g.user}</td><td>{g.role}</td>
              <td><Action label="Revoke" class="danger" confirm={`Take ${g.role} on ${g.path} from ${g.user}?`}
                run={() => post('/api/v1/access/acl/revoke', g).then(load)} /></td>
            </tr>
          ))}
          {acl.length === 0 && <tr><td colSpan={4} class="muted">No grants: only root may do anything.</td></tr>}
        </tbody>
      </table>
      <GrantForm users={users} onDone={load} />

      {pwFor && <PasswordDialog user={pwFor.name} own={pwFor.name === me} hasPassword={pwFor.has_password}
        onSession={props.onSession} onClose={() => { setPwFor(null); load(); }} />}
    </div>
  );
}

/** Everyone: one's own grants, password and API tokens. */
export function AccountPage(props: { session: Session; onSession: (s: Session) => void }) {
  const me = props.session.user ?? '';
  const [info, setInfo] = useState<User | null>(null);
  const [error, setError] = useState('');
  const [pw, setPw] = useState(false);
  const load = () => get<User>(`/api/v1/access/users/${enc(me)}`).then(setInfo).catch((e) => setError(errText(e)));
  useEffect(() => { if (me) load(); }, [me]);
  if (!me) return <div class="page"><h2>My account</h2><p class="muted">This session acts as no user.</p></div>;
  return (
    <div class="page" data-testid="account">
      <h2>My account: {me}</h2>
      <ErrorBox error={error} />
      <table class="kv"><tbody>
        <tr><td>Password</td><td>{info ? (info.has_password ? 'set' : 'none (tokens only)') : '…'} <button onClick={() => setPw(true)}>Change password</button></td></tr>
        <tr><td>Grants</td><td>{(props.session.grants ?? []).length
          ? (props.session.grants ?? []).map((g) => <div>{g.role} on <code>{g.path}</code></div>)
          : <span class="muted">none: you may log in, and manage your password and tokens</span>}</td></tr>
      </tbody></table>
      <TokensPanel user={me} />
      {pw && <PasswordDialog user={me} own hasPassword={info?.has_password ?? true}
        onSession={props.onSession} onClose={() => { setPw(false); load(); }} />}
    </div>
  );
}
