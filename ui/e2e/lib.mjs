// What the browser tests share: Debian's Chromium launched headless with a fresh
// profile, numbered screenshots, the API with the token, the serial console's text,
// the login (a user and its password: FERRY_USER, default root, and FERRY_PASSWORD),
// and the steps' log.
import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const url = process.env.FERRY_URL ?? 'http://127.0.0.1:8470';
export const token = process.env.FERRY_TOKEN;
export const user = process.env.FERRY_USER || 'root';
export const password = process.env.FERRY_PASSWORD;
const artifacts = process.env.ARTIFACTS ?? 'test-results';

const t0 = Date.now();
export const step = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);

export async function api(method, path, body) {
  const r = await fetch(`${url}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Waits until the newest task whose kind contains `kind` succeeded (throws when it fails or takes over a minute). */
export async function taskDone(kind) {
  for (let i = 0; ; i++) {
    const t = (await api('GET', '/api/v1/tasks')).find((x) => x.kind.includes(kind));
    if (t?.state === 'succeeded') return t;
    if (t?.state === 'failed' || i > 300) throw new Error(`${kind}: ${JSON.stringify(t)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Runs `scenario(page, tools)` in a fresh browser; screenshots on failure. */
export async function browse(name, scenario) {
  if (!token) {
    console.error('FERRY_TOKEN is needed');
    process.exit(2);
  }
  if (!password) {
    console.error(`FERRY_PASSWORD is needed (the password of ${user}; FERRY_USER names the user, default root)`);
    process.exit(2);
  }
  mkdirSync(artifacts, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), 'ferry-e2e-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
    viewport: { width: 1400, height: 900 },
    // The cluster's own CA signs the hosts' certificates; this fresh profile does not
    // know it (an admin's browser would import it, or get --tls-cert from its own CA).
    ignoreHTTPSErrors: true,
  });
  const page = ctx.pages()[0] ?? (await ctx.newPage());
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('dialog', (d) => d.accept());
  let n = 0;
  const shot = async (what) => {
    n += 1;
    await page.screenshot({ path: join(artifacts, `${name}-${String(n).padStart(2, '0')}-${what}.png`) });
  };
  const terminalText = () => page.locator('.xterm-rows').innerText();
  const waitTerminal = async (needle, ms) => {
    const until = Date.now() + ms;
    for (;;) {
      const t = await terminalText().catch(() => '');
      if (t.includes(needle)) return t;
      if (Date.now() > until) throw new Error(`"${needle}" not on the serial console within ${ms} ms; it shows:\n${t}`);
      await page.waitForTimeout(300);
    }
  };
  // The console tab's and VNC tab's connection states.
  const consoleConnected = () => page.getByTestId('console-status').filter({ hasText: /: connected$/ }).waitFor();
  const vncConnected = () => page.getByTestId('vnc-status').filter({ hasText: /VNC: connected$/ }).waitFor({ timeout: 30000 });
  /** Types `input` into the serial console and waits for `answer` on it. */
  const typeInConsole = async (input, answer) => {
    await page.locator('.xterm').click();
    await page.keyboard.type(input);
    return waitTerminal(answer, 20000);
  };
  /** Logs in as `name` (default FERRY_USER) with `pw` (default FERRY_PASSWORD). */
  const login = async (name = user, pw = password) => {
    await page.goto(url);
    await page.getByLabel('User', { exact: true }).fill(name);
    await page.getByLabel('Password', { exact: true }).fill(pw);
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByTestId('status-counts').waitFor();
  };
  try {
    await scenario(page, { shot, waitTerminal, login, consoleConnected, vncConnected, typeInConsole });
    if (errors.length) throw new Error(`errors in the page: ${errors.join('\n')}`);
    step('ok');
  } catch (e) {
    await shot('failure').catch(() => undefined);
    console.error(`FAILED: ${e?.stack ?? e}`);
    process.exitCode = 1;
  } finally {
    await ctx.close().catch(() => undefined);
    rmSync(profile, { recursive: true, force: true });
  }
}
