// The dashboard's shell: who the user is (asking for a token when the API wants one),
// the event stream every page listens to, the pages by the URL's hash, and the jobs
// panel.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { api, must, onUnauthorized, ProblemError, token, type WhoAmI } from './api/client';
import { follow, type StreamState } from './api/events';
import { JobsPanel } from './components/JobsPanel';
import { ProblemBox } from './components/ui';
import { Schedules } from './pages/Schedules';
import { Templates } from './pages/Templates';
import { VmList } from './pages/VmList';
import { VmPage } from './pages/VmPage';
import { publish, SessionContext } from './state';
import './style.css';

function useHash(): string {
  const [hash, setHash] = useState(window.location.hash);
  useEffect(() => {
    const changed = () => setHash(window.location.hash);
    window.addEventListener('hashchange', changed);
    return () => window.removeEventListener('hashchange', changed);
  }, []);
  return hash;
}

function Page({ hash }: { hash: string }) {
  const path = hash.replace(/^#/, '') || '/';
  const vm = /^\/vms\/([0-9a-f-]{36})$/.exec(path);
  if (vm) return <VmPage id={vm[1]!} />;
  if (path === '/templates') return <Templates />;
  if (path === '/schedules') return <Schedules />;
  if (path === '/') return <VmList />;
  return (
    <p>
      No such page. <a href="#/">Back to the VMs</a>
    </p>
  );
}

type Who = { state: 'loading' } | { state: 'needs-token'; error?: unknown } | { state: 'ready'; who: WhoAmI };

function App() {
  const hash = useHash();
  const [who, setWho] = useState<Who>({ state: 'loading' });
  const [stream, setStream] = useState<StreamState>('connecting');

  const identify = () =>
    must(api.GET('/v1/whoami')).then(
      (me) => setWho({ state: 'ready', who: me }),
      (e) =>
        setWho(
          e instanceof ProblemError && e.problem.status === 401
            ? { state: 'needs-token', error: token.get() ? e : undefined }
            : { state: 'needs-token', error: e },
        ),
    );
  useEffect(() => {
    void identify();
    return onUnauthorized(() => setWho((w) => (w.state === 'ready' ? { state: 'needs-token' } : w)));
  }, []);

  const ready = who.state === 'ready';
  useEffect(() => {
    if (!ready) return;
    return follow({ onEvent: publish, onReset: () => publish(null), onState: setStream });
  }, [ready]);

  if (who.state === 'loading') return <p class="muted">Loading…</p>;
  if (who.state === 'needs-token') {
    return (
      <TokenPrompt
        error={who.error}
        onToken={(value) => {
          token.set(value);
          void identify();
        }}
      />
    );
  }
  return (
    <SessionContext.Provider value={{ who: who.who, stream }}>
      <header class="top">
        <a href="#/" class="brand">
          strata
        </a>
        <nav aria-label="Pages">
          <a href="#/" aria-current={hash === '' || hash === '#/' ? 'page' : undefined}>
            VMs
          </a>
          <a href="#/templates" aria-current={hash === '#/templates' ? 'page' : undefined}>
            Templates
          </a>
          <a href="#/schedules" aria-current={hash === '#/schedules' ? 'page' : undefined}>
            Schedules
          </a>
          <a href="/docs/">API</a>
        </nav>
        <span class={`stream stream-${stream}`} title="The event stream" data-testid="stream-state">
          {stream === 'live' ? '● live' : stream}
        </span>
        <span class="whoami" data-testid="whoami">
          {who.who.authenticated ? `${who.who.name} (${who.who.scope})` : 'no authentication'}
          {who.who.authenticated && (
            <button
              type="button"
              class="link"
              onClick={() => {
                token.set(null);
                setWho({ state: 'needs-token' });
              }}
            >
              Forget token
            </button>
          )}
        </span>
      </header>
      <main>
        <Page hash={hash} />
      </main>
      <JobsPanel />
    </SessionContext.Provider>
  );
}

function TokenPrompt({ error, onToken }: { error?: unknown; onToken: (token: string) => void }) {
  const [value, setValue] = useState('');
  return (
    <main class="token-prompt">
      <h1>strata</h1>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          onToken(value.trim());
        }}
      >
        <label>
          API token
          <input
            type="password"
            autoComplete="off"
            required
            value={value}
            placeholder="strata_…"
            onInput={(e) => setValue(e.currentTarget.value)}
            data-testid="token-input"
          />
        </label>
        <p class="muted">
          Kept for this tab only. Make one with <code>strata token create</code>.
        </p>
        <ProblemBox error={error} />
        <button type="submit" class="primary">
          Sign in
        </button>
      </form>
    </main>
  );
}

render(<App />, document.getElementById('app')!);
