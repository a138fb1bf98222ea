// Browser end-to-end test of the web UI on one host: a real `ferry serve` with a real
// test VM, Debian's headless Chromium driven by playwright-core. Run by
// crates/ferry/tests/webui.rs inside the lab's network namespace, with FERRY_URL,
// FERRY_TOKEN (root's, for the script's own API calls), FERRY_PASSWORD (root's, for the
// page), GUEST_KERNEL, GUEST_INITRD, ARTIFACTS (screenshots), BACKUP_DIR (a folder for a
// backup store). Prints one line per
// step; exits non-zero on the first failure (with a screenshot).
import { api, browse, step, taskDone, url } from './lib.mjs';

const kernel = process.env.GUEST_KERNEL;
const initrd = process.env.GUEST_INITRD;
const bulk = Number(process.env.BULK_VMS ?? 1000);
if (!kernel || !initrd) {
  console.error('GUEST_KERNEL and GUEST_INITRD are needed');
  process.exit(2);
}

await browse('host', async (page, { shot, login, waitTerminal, consoleConnected, vncConnected, typeInConsole }) => {
  // Log in: the page asks for a user and its password; a wrong one is refused with the
  // reason.
  await page.goto(url);
  await page.getByLabel('User', { exact: true }).fill('root');
  await page.getByLabel('Password', { exact: true }).fill('not-the-password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('alert').filter({ hasText: 'Wrong user name or password' }).waitFor();
  step('wrong password refused');
  await shot('login-refused');
  await login();
  const whoami = await page.getByTestId('whoami').innerText();
  if (!whoami.startsWith('root@')) throw new Error(`logged in as: ${whoami}`);
  step(`logged in as ${whoami}: dashboard`);
  await shot('dashboard');

  // Create a VM with the wizard: 1 CPU, 128 MiB, one SATA disk, the test guest
  // booted directly; started right away.
  await page.getByTestId('create-vm').click();
  await page.locator('input[name=name]').fill('web1');
  await page.locator('input[name=memory]').fill('128');
  await page.getByTestId('wizard-next').click();
  await page.locator('input[name=disk0-size]').fill('64M');
  await page.locator('select[name=disk0-bus]').selectOption('sata');
  await page.getByTestId('wizard-next').click(); // CD-ROM
  await page.getByTestId('wizard-next').click(); // Network
  await page.getByTestId('wizard-next').click(); // Boot order
  await page.locator('input[name=kernel]').fill(kernel);
  await page.locator('input[name=initrd]').fill(initrd);
  await page.locator('input[name=cmdline]').fill('console=ttyS0 quiet');
  await page.getByTestId('wizard-next').click(); // Guest: the agent, cloud-init
  await page.locator('input[name=agent]').check();
  await page.locator('input[name=cloud-init]').check();
  await page.locator('input[name=ci-user]').fill('admin');
  await page.locator('input[name=ci-hostname]').fill('web1-guest');
  await page.locator('textarea[name=ci-keys]').fill('ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerryTestKeyForTheWizard0000000000000000 me@x\n');
  await shot('wizard-guest');
  await page.getByTestId('wizard-next').click(); // Confirm
  const summary = JSON.parse(await page.getByTestId('create-summary').innerText());
  if (summary.disks[0].bus !== 'sata' || summary.memory_mib !== 128) throw new Error(`summary: ${JSON.stringify(summary)}`);
  if (summary.agent !== true || summary.cloud_init?.hostname !== 'web1-guest' || summary.cloud_init?.ssh_keys?.length !== 1) throw new Error(`guest settings: ${JSON.stringify(summary)}`);
  await page.locator('input[name=start]').check();
  await shot('wizard-confirm');
  await page.getByTestId('wizard-create').click();
  await page.getByTestId('vm-title').filter({ hasText: 'web1' }).waitFor();
  await page.getByTestId('vm-state').filter({ hasText: 'running' }).waitFor({ timeout: 60000 });
  step('VM web1 created by the wizard and running');
  const vm = await api('GET', '/api/v1/vms/web1');
  if (vm.spec.disks[0].bus !== 'sata' || vm.state !== 'running') throw new Error(`VM as stored: ${JSON.stringify(vm)}`);
  if (!vm.spec.agent || vm.spec.cloud_init?.user !== 'admin') throw new Error(`guest settings as stored: ${JSON.stringify(vm.spec)}`);
  // The summary: cloud-init's settings, and the agent's answer — this busybox guest has
  // no agent, so the page says it did not answer.
  await page.getByTestId('cloud-init').filter({ hasText: 'host name web1-guest' }).waitFor();
  await page.getByTestId('guest-agent').filter({ hasText: 'did not answer' }).waitFor({ timeout: 30000 });
  step('guest settings kept; the summary says the agent did not answer');
  await shot('guest-agent');

  // The serial console: the guest's ready marker, then a command typed in the page and
  // its output (computed by the guest's shell, so an echo of the input cannot match).
  await page.getByTestId('tab-console').click();
  await consoleConnected();
  await waitTerminal('FERRY-READY', 120000);
  step('ready marker on the serial console');
  await typeInConsole('echo answer-$((6*7))\n', 'answer-42');
  step('typed a command, saw its output');
  await shot('serial-console');

  // The VNC console: noVNC (unbundled ES modules) connects to the VM's display.
  await page.getByTestId('tab-vnc').click();
  await vncConnected();
  await page.locator('[data-testid=vnc-screen] canvas').waitFor();
  step('VNC console connected');
  await page.waitForTimeout(1000);
  await shot('vnc-console');

  // Graphs from the daemon's metrics history (one sample every 10 s).
  await page.getByTestId('tab-graphs').click();
  await page.getByTestId('graph-cpu').locator('canvas').waitFor();
  await page.waitForFunction(() => Number(document.querySelector('[data-testid=graph-cpu]')?.getAttribute('data-points') ?? 0) >= 1, null, { timeout: 40000 });
  step('graphs show samples of the running VM');
  await shot('graphs');

  // A snapshot with memory, listed in the tree of snapshots.
  await page.getByTestId('tab-snapshots').click();
  await page.getByTestId('snapshot-name').fill('before-test');
  await page.getByTestId('snapshot-create').click();
  await page.locator('[data-testid=snapshot-list] tr[data-name=before-test]').waitFor({ timeout: 60000 });
  step('snapshot with memory taken');
  await shot('snapshots');
  await page.locator('[data-testid=snapshot-list] tr[data-name=before-test]').getByRole('button', { name: 'Revert' }).click();
  await taskDone('revert');
  const reverted = await api('GET', '/api/v1/vms/web1');
  if (reverted.current_snapshot !== 'before-test' || reverted.state !== 'running') throw new Error(`after revert: ${JSON.stringify(reverted)}`);
  await page.locator('[data-testid=snapshot-list] tr[data-name=before-test]', { hasText: 'you are here' }).waitFor();
  step('reverted to it from the page: running, at before-test');

  // An error shows the server's reason: a second VM named web1.
  await page.getByTestId('create-vm').click();
  await page.locator('input[name=name]').fill('web1');
  for (let i = 0; i < 5; i++) await page.getByTestId('wizard-next').click();
  // Windows 11's needs on the Guest step: Secure Boot brings q35 and UEFI with it
  await page.locator('input[name=secure-boot]').check();
  await page.locator('input[name=tpm]').check();
  await page.getByTestId('wizard-next').click(); // Confirm
  const win = JSON.parse(await page.getByTestId('create-summary').innerText());
  if (win.machine !== 'q35' || win.firmware !== 'uefi' || win.secure_boot !== true || win.tpm !== true) throw new Error(`Secure Boot and TPM: ${JSON.stringify(win)}`);
  await page.getByTestId('wizard-create').click();
  await page.getByRole('alert').filter({ hasText: /already exists/ }).waitFor();
  step('duplicate name refused with the reason');
  await shot('error-reason');

  // Upload an ISO from the browser into pool local: it becomes a volume.
  await page.goto(`${url}/#/pools`);
  await page.getByTestId('pool-local').click();
  const iso = Buffer.alloc(3 << 20, 0);
  iso.write('CD001', 0x8001);
  await page.locator('input[name=upload-file]').setInputFiles({ name: 'tools.iso', mimeType: 'application/octet-stream', buffer: iso });
  await page.getByTestId('upload-start').click();
  await page.getByTestId('transfer-msg').filter({ hasText: 'volume tools.iso ready' }).waitFor({ timeout: 60000 });
  await page.getByTestId('volumes').filter({ hasText: 'tools.iso' }).waitFor();
  const uploaded = await api('GET', '/api/v1/pools/local/volumes/tools.iso');
  if (uploaded.format !== 'raw' || uploaded.virtual_bytes !== iso.length) throw new Error(`uploaded: ${JSON.stringify(uploaded)}`);
  step('an ISO uploaded from the page is a volume');
  await shot('upload');

  // Stop it from its page; the task shows in the task list.
  await page.goto(`${url}/#/vm/${encodeURIComponent((await api('GET', '/api/v1/session')).host)}/web1`);
  await page.getByTestId('vm-stop').click();
  await page.getByTestId('vm-state').filter({ hasText: 'stopped' }).waitFor({ timeout: 30000 });
  await page.locator('[data-testid=task-list] tr[data-kind="vm.stop"][data-state=succeeded]').first().waitFor();
  const stopper = await page.locator('[data-testid=task-list] tr[data-kind="vm.stop"]').first().getByTestId('task-user').innerText();
  if (stopper !== 'root') throw new Error(`the stop task names ${JSON.stringify(stopper)}, not root`);
  step('stopped; the task is listed as succeeded, started by root');
  await page.locator('[data-testid=task-list] tr[data-kind="vm.stop"]').first().click();
  await page.getByTestId('task-detail').waitFor();
  await shot('task-log');
  await page.getByRole('button', { name: 'Close' }).click();

  // Hardware while stopped: a second disk, then more memory; both as stored.
  await page.getByTestId('tab-hardware').click();
  await page.locator('input[name=new-disk-size]').fill('32M');
  await page.getByTestId('disk-add').click();
  await page.locator('[data-testid=disks] tbody tr').nth(1).waitFor();
  await page.getByLabel('Memory (MiB)').fill('160');
  await page.getByTestId('vm-save').click();
  for (let i = 0; ; i++) {
    const v = await api('GET', '/api/v1/vms/web1');
    if (v.spec.disks.length === 2 && v.spec.memory_mib === 160) break;
    if (i > 50) throw new Error(`hardware edits not stored: ${JSON.stringify(v.spec)}`);
    await page.waitForTimeout(200);
  }
  step('disk added and memory changed on the hardware tab');
  await shot('hardware');

  // A full clone from the VM's page.
  await page.getByTestId('vm-clone').click();
  await page.getByRole('dialog').getByRole('button', { name: 'Clone' }).click();
  await page.locator('[data-testid=tree] a[data-kind=vm][data-name=web1-clone]').waitFor({ timeout: 60000 });
  await taskDone('clone');
  const clone = await api('GET', '/api/v1/vms/web1-clone');
  if (clone.spec.disks.length !== 2 || clone.clone_of?.vm !== 'web1') throw new Error(`clone: ${JSON.stringify(clone)}`);
  step('web1 cloned to web1-clone from its page');

  // Backups: a store defined on the Backups page, web1 backed up from its Backups tab,
  // its files browsed (a helper VM reads the backup), then restored as a new VM.
  const host = (await api('GET', '/api/v1/session')).host;
  if (process.env.BACKUP_DIR) {
    await page.getByTestId('backups-link').click();
    await page.getByTestId('store-name').fill('bs');
    await page.getByTestId('store-path').fill(process.env.BACKUP_DIR);
    await page.getByTestId('store-create').click();
    await page.locator('[data-testid=backup-stores] tr[data-name=bs]').waitFor();
    await page.goto(`${url}/#/vm/${encodeURIComponent(host)}/web1/backups`);
    await page.locator('[data-testid=backup-store] option', { hasText: 'bs' }).waitFor({ state: 'attached' });
    await page.getByTestId('backup-now').click();
    await page.locator('[data-testid=vm-backups] tr[data-id]').first().waitFor({ timeout: 120000 });
    step('store bs added; web1 backed up from its Backups tab');
    await page.getByTestId('backup-files').first().click();
    await page.locator('[data-testid=files] tr[data-name=disk0]').waitFor({ timeout: 180000 });
    await page.locator('[data-testid=files] tr[data-name=disk0] button.link').click();
    await page.locator('[data-testid=files] tr[data-name=fs]').waitFor({ timeout: 60000 });
    step('the backup\'s disks listed by the file-restore helper VM');
    await shot('backup-files');
    await page.getByRole('button', { name: 'Close' }).click();
    await page.getByTestId('backup-restore').first().click();
    await page.getByTestId('restore-name').fill('web1-r');
    await page.getByTestId('restore-go').click();
    await page.getByTestId('vm-title').filter({ hasText: 'web1-r' }).waitFor({ timeout: 120000 });
    const r = await api('GET', '/api/v1/vms/web1-r');
    if (r.spec.disks.length !== 2) throw new Error(`restored: ${JSON.stringify(r.spec)}`);
    await page.goto(`${url}/#/backups`);
    await page.locator('[data-testid=all-backups] tr[data-id]').first().waitFor();
    const dedup = await page.locator('[data-testid=backup-stores] tr[data-name=bs] [data-testid=dedup]').innerText();
    step(`restored as web1-r from the restore dialog; the store shows dedup ${dedup}`);
    await shot('backups');
    await api('DELETE', '/api/v1/vms/web1-r');
  }

  // 1,000 VMs: the tree and the host's list draw only what is in view.
  const made = Date.now();
  for (let i = 0; i < bulk; i += 25) {
    await Promise.all(Array.from({ length: Math.min(25, bulk - i) }, (_, j) =>
      api('POST', '/api/v1/vms', { name: `bulk${String(i + j).padStart(4, '0')}`, memory_mib: 64 })));
  }
  step(`${bulk} VMs defined through the API in ${((Date.now() - made) / 1000).toFixed(1)} s`);
  const shown = Date.now();
  await page.goto(`${url}/#/`);
  await page.reload();
  await page.waitForFunction((k) => Number(document.querySelector('[data-testid=tree]')?.getAttribute('data-rows') ?? 0) >= k, bulk, { timeout: 60000 });
  const drawn = await page.locator('[data-testid=tree] .vrow').count();
  step(`tree with ${bulk + 2} VMs ready in ${Date.now() - shown} ms; ${drawn} rows in the DOM`);
  if (drawn > 120) throw new Error(`the tree is not virtualised: ${drawn} rows drawn`);
  await page.locator('[data-testid=tree]').evaluate((el) => { el.scrollTop = el.scrollHeight; });
  const last = `bulk${String(bulk - 1).padStart(4, '0')}`;
  await page.locator(`[data-testid=tree] a[data-name=${last}]`).waitFor();
  const filterAt = Date.now();
  await page.getByTestId('tree-filter').fill('bulk0999');
  await page.locator('[data-testid=tree] a[data-kind=vm]').first().waitFor();
  const filtered = await page.locator('[data-testid=tree] a[data-kind=vm]').count();
  step(`filter narrowed the tree to ${filtered} VM(s) in ${Date.now() - filterAt} ms`);
  await page.getByTestId('tree-filter').fill('');
  await page.getByTestId('cpu-bar').first().waitFor();
  const counts = await page.getByTestId('status-counts').innerText();
  if (!counts.includes(String(bulk + 2))) throw new Error(`dashboard counts: ${counts}`);
  await shot('thousand-vms');

  // Delete web1 with its confirmation: the button stays off until the name is typed.
  await page.goto(`${url}/#/vm/${encodeURIComponent((await api('GET', '/api/v1/session')).host)}/web1`);
  await page.getByTestId('vm-delete').click();
  if (await page.getByTestId('delete-go').isEnabled()) throw new Error('delete enabled before confirming');
  await page.getByTestId('delete-confirm').fill('web1');
  await page.getByTestId('delete-go').click();
  await page.getByTestId('status-counts').waitFor();
  const left = await api('GET', '/api/v1/vms');
  if (left.some((v) => v.spec.name === 'web1')) throw new Error('web1 still defined');
  step('web1 deleted after confirmation');

  // Users, tokens and grants: olga is made, made an Operator on /, given a token
  // (shown once) that is then revoked.
  await page.getByRole('link', { name: 'Users', exact: true }).click();
  await page.getByTestId('users').locator('tr[data-name=root]').waitFor();
  await page.locator('input[name=new-user]').fill('olga');
  await page.locator('input[name=new-password]').fill('olga-password-1');
  await page.locator('input[name=new-comment]').fill('made by the browser test');
  await page.getByTestId('user-add').click();
  const olga = page.getByTestId('users').locator('tr[data-name=olga]');
  await olga.waitFor();
  step('user olga added');
  await page.locator('select[name=grant-role]').selectOption('Operator');
  await page.locator('input[name=grant-path]').fill('/');
  await page.locator('select[name=grant-user]').selectOption('olga');
  await page.getByTestId('grant-add').click();
  await page.locator('[data-testid=grants] tr[data-user=olga][data-role=Operator][data-path="/"]').waitFor();
  const acl = await api('GET', '/api/v1/access/acl');
  if (!acl.some((g) => g.user === 'olga' && g.role === 'Operator' && g.path === '/')) throw new Error(`grants as stored: ${JSON.stringify(acl)}`);
  step('olga granted Operator on /');
  await olga.getByTestId('user-select').click();
  await page.getByTestId('tokens-panel').filter({ hasText: 'API tokens of olga' }).waitFor();
  await page.locator('input[name=token-id]').fill('ci');
  await page.locator('input[name=token-comment]').fill('for the pipeline');
  await page.getByTestId('token-create').click();
  const value = await page.getByTestId('token-value').innerText();
  if (!value.startsWith('olga!ci=')) throw new Error(`token value: ${value}`);
  step('token olga!ci made; its value shown once');
  await shot('users');
  await page.locator('[data-testid=tokens] tr[data-id=ci]').getByRole('button', { name: 'Revoke' }).click();
  await page.locator('[data-testid=tokens] tr[data-id=ci][data-revoked=yes]').filter({ hasText: 'revoked' }).waitFor();
  const tokens = await api('GET', '/api/v1/access/users/olga/tokens');
  if (!tokens.some((t) => t.id === 'ci' && t.revoked_ms != null)) throw new Error(`olga's tokens as stored: ${JSON.stringify(tokens)}`);
  step('token revoked: listed as revoked');
  await shot('users-token-revoked');

  // Log out; log in as olga: an Operator sees no Users page.
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByLabel('User', { exact: true }).waitFor();
  await login('olga', 'olga-password-1');
  const olgaIs = await page.getByTestId('whoami').innerText();
  if (!olgaIs.startsWith('olga@')) throw new Error(`logged in as: ${olgaIs}`);
  if (await page.getByRole('link', { name: 'Users', exact: true }).count()) throw new Error('olga, an Operator, sees the Users link');
  step(`logged in as ${olgaIs}: no Users link`);
  await shot('olga');

  // Log out: the page asks for a user and password again.
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByLabel('User', { exact: true }).waitFor();
  await page.getByLabel('Password', { exact: true }).waitFor();
  step('logged out');
});
