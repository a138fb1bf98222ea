// The page: login, then the tree (cluster → hosts → VMs, templates, pools) on the left,
// the selected object on the right, recent tasks at the bottom. Routes live in the
// location hash: #/ · #/host/H · #/vm/H/NAME · #/create · #/pools · #/backups · #/tasks · #/users
// (administrators: users, tokens, grants) · #/account (one's own password and tokens).
// The header names who is logged in.
import './style.css';
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { get, post, errText, managesAccess, setLocalHost, type Session } from './api';
import { store, useStore } from './store';
import { Tree } from './tree';
import { Dashboard } from './dashboard';
import { HostPage } from './host';
import { VmPage } from './vm';
import { CreateWizard } from './create';
import { PoolsPage } from './pools';
import { BackupsPage } from './backups';
import { TaskPanel, TasksPage } from './tasks';
import { AccountPage, UsersPage } from './users';

function useHash(): string[] {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const f = () => setHash(location.hash);
    window.addEventListener('hashchange', f);
    return () => window.removeEventListener('hashchange', f);
  }, []);
  return hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
}

/** The login form: a user and its password, or (switched to) an API token. */
function Login(props: { onDone: (s: Session) => void }) {
  const [withToken, setWithToken] = useState(false);
  const [user, setUser] = useState('');
  const [password, setPassword] = useState('');
  const [token, setToken] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  async function submit(e: Event) {
    e.preventDefault();
    setBusy(true);
    setError('');
    try {
      props.onDone(await post<Session>('/api/v1/login', withToken ? { token } : { user, password }));
    } catch (err) {
      setError(errText(err));
    } finally {
      setBusy(false);
    }
  }
  function switchTo(t: boolean) {
    setWithToken(t);
    setError('');
  }
  const val = (f: (v: string) => void) => (e: Event) => f((e.target as HTMLInputElement).value);
  return (
    <div class="login">
      <form onSubmit={submit} class="card">
        <h1><img src="/ui/favicon.svg" alt="" /> ferry</h1>
        {withToken
          ? <p class="muted">Log in with an API token (<code>USER!ID=SECRET</code>, made on the Users page or with <code>ferry token create</code>), or a host's admin token from <code>STATE_DIR/admin-token</code>.</p>
          : <p class="muted">Log in as a user of the cluster. <code>root</code>'s password is set on a host with <code>ferry user passwd root</code>; or log in with an API token.</p>}
        {withToken
          ? <label>API token
              <input type="password" name="token" autoFocus value={token} onInput={val(setToken)} />
            </label>
          : <>
              <label>User
                <input name="user" autoFocus autoComplete="username" value={user} onInput={val(setUser)} />
              </label>
              <label>Password
                <input type="password" name="password" autoComplete="current-password" value={password} onInput={val(setPassword)} />
              </label>
            </>}
        {error && <div class="error" role="alert">{error}</div>}
        <button type="submit" class="primary" disabled={busy || (withToken ? !token : !user || !password)}>Log in</button>
        {withToken
          ? <button type="button" class="link" onClick={() => switchTo(false)}>Use a user name and password instead</button>
          : <button type="button" class="link" onClick={() => switchTo(true)}>Use an API token instead</button>}
      </form>
    </div>
  );
}

function Shell(props: { session: Session; onLogout: () => void; onSession: (s: Session) => void }) {
  const route = useHash();
  const s = useStore();
  useEffect(() => {
    setLocalHost(props.session.host);
    store.start(props.session.host);
    return () => store.stop();
  }, []);
  const admin = managesAccess(props.session.grants);
  const me = props.session.user ?? '';
  let page;
  switch (route[0]) {
    case 'host': page = <HostPage host={route[1]} />; break;
    case 'vm': page = <VmPage host={route[1]} name={route[2]} tab={route[3] ?? 'summary'} key={`${route[1]}/${route[2]}`} />; break;
    case 'create': page = <CreateWizard />; break;
    case 'pools': page = <PoolsPage />; break;
    case 'backups': page = <BackupsPage />; break;
    case 'tasks': page = <TasksPage />; break;
    // Users, tokens and grants for administrators; anyone else gets their own account.
    case 'users': page = admin ? <UsersPage session={props.session} onSession={props.onSession} /> : <AccountPage session={props.session} onSession={props.onSession} />; break;
    case 'account': page = <AccountPage session={props.session} onSession={props.onSession} />; break;
    default: page = <Dashboard />;
  }
  async function logout() {
    await post('/api/v1/logout').catch(() => undefined);
    // The next one to log in starts on the overview (not on a page of this user's).
    history.replaceState(null, '', '#/');
    props.onLogout();
  }
  return (
    <div class="shell">
      <header>
        <a href="#/" class="brand"><img src="/ui/favicon.svg" alt="" /> ferry</a>
        <span class="muted">{s.hosts.length > 1 ? `cluster of ${s.hosts.length} hosts` : `host ${props.session.host}`}</span>
        <span class="grow" />
        <a class="button primary" href="#/create" data-testid="create-vm">Create VM</a>
        <a class="button" href="#/backups" data-testid="backups-link">Backups</a>
        <a class="button" href="#/tasks">Tasks</a>
        {admin && <a class="button" href="#/users" data-testid="users-link">Users</a>}
        <a href="#/account" class="whoami" data-testid="whoami" title="My account: password and API tokens">{me}@{props.session.host}</a>
        <button onClick={logout}>Log out</button>
      </header>
      <nav><Tree route={route} /></nav>
      <main>{page}</main>
      <footer><TaskPanel /></footer>
    </div>
  );
}

function App() {
  const [session, setSession] = useState<Session | null>(null);
  const [error, setError] = useState('');
  useEffect(() => {
    get<Session>('/api/v1/session').then(setSession).catch((e) => setError(errText(e)));
    const out = () => setSession((s) => (s ? { ...s, authenticated: false } : s));
    window.addEventListener('ferry-logged-out', out);
    return () => window.removeEventListener('ferry-logged-out', out);
  }, []);
  if (error) return <div class="login"><div class="card error">{error}</div></div>;
  if (!session) return <div class="login muted">Loading…</div>;
  if (!session.authenticated) return <Login onDone={setSession} />;
  return <Shell session={session} onSession={setSession} onLogout={() => setSession({ ...session, authenticated: false })} />;
}

render(<App />, document.getElementById('app')!);
