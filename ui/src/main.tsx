// The page: login, then the tree (cluster → hosts → VMs, templates, pools) on the left,
// the selected object on the right, recent tasks at the bottom. Routes live in the
// location hash: #/ · #/host/H · #/vm/H/NAME · #/create · #/pools · #/tasks.
import './style.css';
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { get, post, errText, setLocalHost, type Session } from './api';
import { store, useStore } from './store';
import { Tree } from './tree';
import { Dashboard } from './dashboard';
import { HostPage } from './host';
import { VmPage } from './vm';
import { CreateWizard } from './create';
import { PoolsPage } from './pools';
import { TaskPanel, TasksPage } from './tasks';

function useHash(): string[] {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const f = () => setHash(location.hash);
    window.addEventListener('hashchange', f);
    return () => window.removeEventListener('hashchange', f);
  }, []);
  return hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
}

function Login(props: { onDone: (s: Session) => void }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  async function submit(e: Event) {
    e.preventDefault();
    setBusy(true);
    setError('');
    try {
      props.onDone(await post<Session>('/api/v1/login', { token }));
    } catch (err) {
      setError(errText(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <div class="login">
      <form onSubmit={submit} class="card">
        <h1><img src="/ui/favicon.svg" alt="" /> ferry</h1>
        <p class="muted">Log in with the admin token: <code>ferry serve</code> made it on its first start and keeps it in <code>STATE_DIR/admin-token</code> (readable by root only).</p>
        <label>Admin token
          <input type="password" name="token" autoFocus value={token}
            onInput={(e) => setToken((e.target as HTMLInputElement).value)} />
        </label>
        {error && <div class="error" role="alert">{error}</div>}
        <button type="submit" class="primary" disabled={busy || !token}>Log in</button>
      </form>
    </div>
  );
}

function Shell(props: { session: Session; onLogout: () => void }) {
  const route = useHash();
  const s = useStore();
  useEffect(() => {
    setLocalHost(props.session.host);
    store.start(props.session.host);
    return () => store.stop();
  }, []);
  let page;
  switch (route[0]) {
    case 'host': page = <HostPage host={route[1]} />; break;
    case 'vm': page = <VmPage host={route[1]} name={route[2]} tab={route[3] ?? 'summary'} key={`${route[1]}/${route[2]}`} />; break;
    case 'create': page = <CreateWizard />; break;
    case 'pools': page = <PoolsPage />; break;
    case 'tasks': page = <TasksPage />; break;
    default: page = <Dashboard />;
  }
  async function logout() {
    await post('/api/v1/logout').catch(() => undefined);
    props.onLogout();
  }
  return (
    <div class="shell">
      <header>
        <a href="#/" class="brand"><img src="/ui/favicon.svg" alt="" /> ferry</a>
        <span class="muted">{s.hosts.length > 1 ? `cluster of ${s.hosts.length} hosts` : `host ${props.session.host}`}</span>
        <span class="grow" />
        <a class="button primary" href="#/create" data-testid="create-vm">Create VM</a>
        <a class="button" href="#/tasks">Tasks</a>
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
  return <Shell session={session} onLogout={() => setSession({ ...session, authenticated: false })} />;
}

render(<App />, document.getElementById('app')!);
