// Browser end-to-end test of the web UI on a two-host lab cluster, through h1's daemon:
// both hosts in the tree; the running VM `web` (on h1, disk on the shared pool)
// live-migrated to h2 from its page, with progress and the final report (downtime);
// its serial and VNC consoles on h2 relayed through h1; h2 put into maintenance mode
// from its page (web is evacuated back to h1) and activated again; a VM defined and
// deleted on h2 behind the page's back shows in and leaves the tree (the change
// stream). Env as run.mjs.
import { api, browse, step, url } from './lib.mjs';

const vmOn = async (host) => {
  const vms = await api('GET', host === 'h1' ? '/api/v1/vms?host=h1' : `/api/v1/nodes/${host}/api/v1/vms?host=${host}`);
  return vms.find((v) => v.spec.name === 'web');
};

await browse('cluster', async (page, { shot, login, consoleConnected, vncConnected, typeInConsole }) => {
  await login();
  await page.locator('[data-testid=tree] a[data-kind=host][data-name=h2]').waitFor();
  await page.locator('[data-testid=tree] a[data-kind=vm][data-name=web]').waitFor();
  if ((await vmOn('h1'))?.state !== 'running' || (await vmOn('h2'))) throw new Error('web should run on h1 only');
  step('tree: both hosts, web on h1');
  await shot('tree');

  // Live migration from the VM's page: target host, progress, the report.
  await page.goto(`${url}/#/vm/h1/web`);
  await page.getByTestId('vm-state').filter({ hasText: 'running' }).waitFor();
  await page.getByTestId('vm-migrate').click();
  await page.getByTestId('migrate-target').selectOption('h2');
  await page.getByRole('dialog').getByRole('button', { name: 'Migrate' }).click();
  const report = page.getByTestId('migrate-report');
  await report.waitFor({ timeout: 120000 });
  const text = await report.innerText();
  const downtime = /downtime_ms\s+(\d+)/.exec(text);
  if (!downtime || !/to\s+h2/.test(text)) throw new Error(`migration report: ${text}`);
  step(`migrated web to h2 from the page; report says downtime ${downtime[1]} ms`);
  await shot('migrate-report');
  await page.getByRole('dialog').getByRole('button', { name: 'Close' }).first().click();
  if ((await vmOn('h2'))?.state !== 'running') throw new Error('web does not run on h2');

  // The page follows the VM to h2 by itself (once the dialog is closed); then its
  // consoles on h2, relayed by h1's daemon.
  await page.waitForFunction(() => location.hash.startsWith('#/vm/h2/web'), null, { timeout: 30000 });
  await page.getByTestId('tab-console').click();
  await consoleConnected();
  await typeInConsole('\necho on-$(hostname)-$((40+2))\n', 'on-web-42');
  step('serial console of web on h2 through h1: typed, answered');
  await shot('remote-console');
  await page.getByTestId('tab-vnc').click();
  await vncConnected();
  step('VNC of web on h2 through h1 connected');

  // Maintenance mode for h2 from its page: web goes back to h1.
  await page.goto(`${url}/#/host/h2`);
  await page.getByTestId('host-maintenance').click();
  await page.getByTestId('host-activate').waitFor({ timeout: 120000 });
  for (let i = 0; ; i++) {
    const w = await vmOn('h1');
    if (w?.state === 'running') break;
    if (i > 240) throw new Error('web was not evacuated to h1');
    await page.waitForTimeout(500);
  }
  await page.locator('[data-testid=tree] a[data-kind=host][data-name=h2] .dot.maintenance').waitFor();
  step('h2 in maintenance: web evacuated to h1');
  await shot('maintenance');
  await page.getByTestId('host-activate').click();
  await page.getByTestId('host-maintenance').waitFor({ timeout: 30000 });
  step('h2 active again');

  // The tree follows the cluster's change stream: a VM defined on h2 behind the page's
  // back (h1 hears no event of it, and no timer re-reads VMs) appears, and goes again.
  const streamed = page.locator('[data-testid=tree] a[data-kind=vm][data-name=streamed]');
  await api('POST', '/api/v1/nodes/h2/api/v1/vms', { name: 'streamed', memory_mib: 64 });
  await streamed.waitFor({ timeout: 10000 });
  await api('DELETE', '/api/v1/nodes/h2/api/v1/vms/streamed');
  await streamed.waitFor({ state: 'detached', timeout: 10000 });
  step('a VM defined and deleted on h2 behind the page: the tree followed the change stream');
});
