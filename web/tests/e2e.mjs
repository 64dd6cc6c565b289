// The dashboard and /docs in a real browser (Debian's Chromium driven by
// playwright-core), against a strata the Rust test started (tests/api/dashboard.rs):
//
//   node tests/e2e.mjs dashboard|docs|auth|cancel|progress
//
// STRATA_URL is the service; STRATA_TOKENS (JSON) the tokens the auth scenario uses;
// STRATA_SCREENSHOTS a directory for the screenshots (docs/screenshots in the repo).
// Prints one JSON line with what the Rust side checks next (names of what it made),
// and exits non-zero with the reason on the first failed expectation.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const base = process.env.STRATA_URL;
const scenario = process.argv[2];
const screenshots = process.env.STRATA_SCREENSHOTS;
const tokens = JSON.parse(process.env.STRATA_TOKENS ?? '{}');
// Generous: the machines running the tests are shared; nothing here measures speed.
const TIMEOUT = 90_000;

if (!base || !scenario) {
  console.error('usage: STRATA_URL=http://... node tests/e2e.mjs dashboard|docs|auth');
  process.exit(2);
}

function fail(message) {
  throw new Error(message);
}

async function launch() {
  return chromium.launch({
    executablePath: process.env.STRATA_CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    // Without the background-networking flags Chromium keeps trying hosts this
    // network refuses. Playwright gives every launch a fresh profile directory.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** Every page opened, for the screenshots of a failure. */
const opened = [];

/** A page that records every request it makes, to show none leaves the service. */
async function open(browser, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  context.setDefaultTimeout(TIMEOUT);
  const page = await context.newPage();
  opened.push(page);
  page.requested = [];
  page.on('request', (request) => page.requested.push(request.url()));
  page.errors = [];
  page.on('pageerror', (error) => page.errors.push(String(error)));
  return page;
}

function onlyLocal(page) {
  const origin = new URL(base).origin;
  const foreign = page.requested.filter((url) => !url.startsWith(origin) && !url.startsWith('data:'));
  if (foreign.length > 0) fail(`requests left the service: ${foreign.join(', ')}`);
  if (page.errors.length > 0) fail(`errors in the page: ${page.errors.join('; ')}`);
}

async function shoot(page, name) {
  if (!screenshots) return;
  mkdirSync(screenshots, { recursive: true });
  await page.screenshot({ path: join(screenshots, `${name}.png`) });
}

async function api(path, init = {}, token = undefined) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(base + path, { ...init, headers });
  if (!response.ok) fail(`${init.method ?? 'GET'} ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

/** Waits until `check()` returns something truthy. */
async function until(what, check) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Writes guest bytes into the VM's first disk, as the guest would (the VM is stopped:
 * strata does not run VMs, the test plays the hypervisor). */
async function guestWrites(vmId, pattern) {
  const vm = await api(`/v1/vms/${vmId}`);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${pattern} 0 1M`, vm.disks[0].active_path]);
}

async function vmSettled(vmId) {
  await until(`VM ${vmId} to have no job running`, async () => {
    const jobs = await api(`/v1/jobs?vm_id=${vmId}&limit=20`);
    return jobs.items.every((job) => job.status !== 'queued' && job.status !== 'running');
  });
}

const node = (page, name) => page.getByTestId(`snapshot-node-${name}`);

async function takeSnapshot(page, vmId, name) {
  await page.getByTestId('take-snapshot').click();
  const dialog = page.getByTestId('snapshot-dialog');
  await dialog.locator('input[name=name]').fill(name);
  await dialog.getByRole('button', { name: 'Take snapshot' }).click();
  await node(page, name).waitFor();
  await until(`snapshot ${name} to be current in the picture`, async () =>
    (await node(page, name).getAttribute('class')).includes('current'),
  );
  await vmSettled(vmId);
}

async function select(page, name) {
  await node(page, name).click();
  await page.getByTestId('snapshot-panel').getByRole('heading', { name }).waitFor();
}

async function confirm(page, label) {
  await page.getByTestId('confirm').getByRole('button', { name: label }).click();
}

const branchOf = async (locator) => Number(await locator.getAttribute('data-branch'));

/** The newest job of `kind` in the jobs panel, waited for until it reaches `status`. */
async function jobInPanel(page, kind, status) {
  const row = page.locator(`[data-testid^="job-"][data-kind="${kind}"]`).first();
  await row.waitFor();
  await until(`the ${kind} job to show ${status} in the jobs panel`, async () => (await row.getAttribute('data-status')) === status);
  return row;
}

async function dashboard(browser) {
  const page = await open(browser);
  await page.goto(`${base}/`);
  // Set once: still there at the end shows that nothing reloaded the page.
  await page.evaluate(() => (window.stillTheSamePage = true));
  await page.getByTestId('vm-row-web-1').waitFor();
  await until('the event stream to be live', async () => (await page.getByTestId('stream-state').textContent()).includes('live'));
  const vm = (await api('/v1/vms?name=web-1')).items[0];

  // The filter by label.
  await page.getByTestId('vm-filter').fill('env=prod');
  await page.getByTestId('vm-row-web-1').waitFor();
  if ((await page.getByTestId('vm-row-db-1').count()) !== 0) fail('the label filter kept db-1 (env=dev)');
  await page.getByTestId('vm-filter').fill('');
  await page.getByTestId('vm-row-db-1').waitFor();
  await shoot(page, 'vms');

  await page.getByTestId('vm-row-web-1').getByRole('link', { name: 'web-1' }).click();
  await page.getByTestId('vm-name').waitFor();

  // Snapshots taken in the dashboard, with guest writes between them.
  await takeSnapshot(page, vm.id, 's1');
  await guestWrites(vm.id, '0xbb');
  await takeSnapshot(page, vm.id, 's2');
  await guestWrites(vm.id, '0xcc');
  const here = page.getByTestId('you-are-here');
  if ((await branchOf(here)) !== (await branchOf(node(page, 's2'))))
    fail('before the revert, the present state should continue the branch of s2');

  // Revert to s1: the picture grows a new branch with "you are here" on it.
  await select(page, 's1');
  await page.getByTestId('revert').click();
  await confirm(page, 'Revert');
  await until(
    'the present state on a branch of its own after the revert',
    async () => (await branchOf(here)) !== (await branchOf(node(page, 's2'))),
  );
  await vmSettled(vm.id);

  // A snapshot on the new branch, then deleted: its layer merges with the present
  // state, and the jobs panel follows the merge to its end without a reload.
  await takeSnapshot(page, vm.id, 's3');
  await guestWrites(vm.id, '0xdd');
  await select(page, 's3');
  await page.getByTestId('delete-snapshot').click();
  await confirm(page, 'Delete snapshot');
  const merge = await jobInPanel(page, 'snapshot_delete', 'succeeded');
  if (!(await merge.getByTestId('job-progress-text').textContent()).startsWith('100%')) fail('the finished merge does not show 100%');
  await node(page, 's3').waitFor({ state: 'detached' });
  await vmSettled(vm.id);

  // A linked clone from s1.
  await select(page, 's1');
  await page.getByTestId('clone-from').click();
  const cloneDialog = page.getByTestId('clone-dialog');
  await cloneDialog.locator('input[name=name]').fill('web-1-clone');
  await cloneDialog.getByRole('button', { name: 'Clone' }).click();
  await jobInPanel(page, 'vm_clone', 'succeeded');
  await vmSettled(vm.id);
  // The source's page learns of its new linked clone from the stream.
  await page.locator('dl.facts').getByRole('link', { name: 'web-1-clone' }).waitFor();

  // Keyboard: a snapshot of the picture is reachable and chosen with Enter.
  await page.getByTestId('snapshot-panel').getByRole('button', { name: 'Close' }).click();
  await node(page, 's2').focus();
  await page.keyboard.press('Enter');
  await page.getByTestId('snapshot-panel').getByRole('heading', { name: 's2' }).waitFor();
  await shoot(page, 'vm');

  // Deleting s1 is refused: the clone reads it. The problem is shown, with the clone.
  await select(page, 's1');
  await page.getByTestId('delete-snapshot').click();
  await confirm(page, 'Delete snapshot');
  const problem = page.getByTestId('confirm').getByTestId('problem');
  await problem.waitFor();
  const text = await problem.textContent();
  if (!text.includes('has_dependents')) fail(`the refusal does not name its code: ${text}`);
  await problem.getByRole('link', { name: 'web-1-clone' }).waitFor();
  await shoot(page, 'refusal');
  await page.getByTestId('confirm').getByRole('button', { name: 'Cancel' }).click();

  // Deploy two linked VMs from the template.
  await page.getByRole('link', { name: 'Templates' }).click();
  await page.getByTestId('template-golden').waitFor();
  await page.getByTestId('template-golden').getByTestId('deploy').click();
  const deploy = page.getByTestId('deploy-dialog');
  await deploy.locator('input[name=name]').fill('from-golden');
  await deploy.locator('input[name=count]').fill('2');
  await deploy.getByRole('button', { name: 'Deploy' }).click();
  await jobInPanel(page, 'template_deploy', 'succeeded');
  await until(
    'the template to list its two linked VMs',
    async () => (await page.getByTestId('template-golden').locator('a.chip').count()) === 2,
  );
  await shoot(page, 'templates');

  // The export: the download (through a one-use ticket) has the manifest's digest.
  await page.getByTestId('template-golden').getByRole('button', { name: 'Export' }).click();
  const exportDialog = page.getByTestId('export-dialog');
  const digest = (await exportDialog.getByTestId('digest').textContent()).replace('sha256 ', '').trim();
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    exportDialog.getByRole('button', { name: /^Download root/ }).click(),
  ]);
  const file = await download.path();
  const downloaded = createHash('sha256').update(readFileSync(file)).digest('hex');
  if (downloaded !== digest) fail(`the export's SHA-256 ${downloaded} is not the manifest's ${digest}`);
  await exportDialog.getByRole('button', { name: 'Close' }).click();

  // The schedule's retention preview and next runs.
  await page.getByRole('link', { name: 'Schedules' }).click();
  await page.getByTestId('schedule-row-nightly').getByRole('button', { name: 'nightly' }).click();
  const detail = page.getByTestId('schedule-detail');
  await detail.getByTestId('retention-preview').waitFor();
  await until('five next runs', async () => (await detail.getByTestId('next-runs').locator('li').count()) === 5);
  const decisions = await detail.locator('[data-testid^="preview-"] .badge').allTextContents();
  if (decisions.filter((d) => d === 'keep').length !== 1 || decisions.filter((d) => d === 'prune').length !== 1) {
    fail(`the preview should keep one snapshot and prune one: ${decisions}`);
  }
  await shoot(page, 'schedules');

  if (!(await page.evaluate(() => window.stillTheSamePage))) fail('the page reloaded');
  onlyLocal(page);

  // A phone-width screen and the dark theme.
  for (const [name, options] of [
    ['vm-phone', { viewport: { width: 390, height: 844 } }],
    ['vm-dark', { colorScheme: 'dark' }],
  ]) {
    const other = await open(browser, options);
    await other.goto(`${base}/#/vms/${vm.id}`);
    await node(other, 's1').waitFor();
    const overflow = await other.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 1) fail(`${name}: the page is ${overflow}px wider than the screen`);
    if (options.colorScheme === 'dark') {
      const background = await other.evaluate(() => getComputedStyle(document.documentElement).backgroundColor);
      const [r, g, b] = background.match(/\d+/g).map(Number);
      if (r + g + b > 150) fail(`the dark theme's background is light: ${background}`);
    }
    await shoot(other, name);
    onlyLocal(other);
    await other.context().close();
  }
  return { vm: vm.id };
}

async function docs(browser) {
  const page = await open(browser);
  await page.goto(`${base}/docs/`);
  const document = await api('/v1/openapi.json');
  const operations = Object.values(document.paths).flatMap((item) =>
    ['get', 'post', 'put', 'patch', 'delete'].filter((m) => item[m]),
  ).length;
  await until(`Swagger UI to list the ${operations} operations`, async () => (await page.locator('.opblock').count()) === operations);
  await page.locator('.opblock-summary-path', { hasText: '/v1/vms/{id}/snapshots' }).first().waitFor();
  await shoot(page, 'docs');
  onlyLocal(page);
  return { operations };
}

async function auth(browser) {
  const page = await open(browser);
  await page.goto(`${base}/`);
  const input = page.getByTestId('token-input');
  await input.waitFor();

  // A wrong token is refused with the API's problem.
  await input.fill('strata_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByTestId('problem').filter({ hasText: 'unauthorized' }).waitFor();

  // A read token: it sees, and the actions it may not take are disabled with why.
  await input.fill(tokens.read);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByTestId('vm-row-web-1').waitFor();
  if (!(await page.getByTestId('whoami').textContent()).includes('viewer (read)')) fail('the header does not show the read token');
  await until('the event stream to be live with the token', async () =>
    (await page.getByTestId('stream-state').textContent()).includes('live'),
  );
  await page.getByTestId('vm-row-web-1').getByRole('link', { name: 'web-1' }).click();
  const take = page.getByTestId('take-snapshot');
  await take.waitFor();
  if (!(await take.isDisabled())) fail('a read token can press Take snapshot');
  const why = await take.getAttribute('title');
  if (!why?.includes('needs the operate scope')) fail(`no reason on the disabled button: ${why}`);
  await shoot(page, 'read-only');

  // Kept for the tab only: a new tab (a new context: no sessionStorage) asks again.
  const other = await open(browser);
  await other.goto(`${base}/`);
  await other.getByTestId('token-input').waitFor();
  await other.context().close();

  // An operate token takes a snapshot; the tree follows over the authorised stream.
  await page.getByRole('button', { name: 'Forget token' }).click();
  await input.fill(tokens.operate);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByTestId('vm-name').waitFor();
  const vm = (await api('/v1/vms?name=web-1', {}, tokens.read)).items[0];
  await page.getByTestId('take-snapshot').waitFor();
  if (await page.getByTestId('take-snapshot').isDisabled()) fail('an operate token cannot press Take snapshot');
  await page.getByTestId('take-snapshot').click();
  const dialog = page.getByTestId('snapshot-dialog');
  await dialog.locator('input[name=name]').fill('by-operator');
  await dialog.getByRole('button', { name: 'Take snapshot' }).click();
  await node(page, 'by-operator').waitFor();
  const job = await jobInPanel(page, 'snapshot_create', 'succeeded');
  if (!(await job.textContent()).includes('operator')) fail('the job does not show who asked for it');
  onlyLocal(page);
  return { vm: vm.id };
}

/** A job held running by the test (STRATA_FAULT pause): cancelled from the panel. */
async function cancel(browser) {
  const page = await open(browser);
  await page.goto(`${base}/`);
  const row = page.locator('[data-testid^="job-"][data-kind="vm_clone"]').first();
  await until('the clone to run', async () => (await row.getAttribute('data-status')) === 'running');
  await row.getByRole('button', { name: 'Cancel' }).click();
  await row.getByText('cancelling…').waitFor();
  await until('the clone to be cancelled', async () => (await row.getAttribute('data-status')) === 'cancelled');
  onlyLocal(page);
  return {};
}

/** A slow full clone (the test caps qemu-img's rate): the panel shows its bytes and
 * the time left while it copies, then 100%. */
async function progress(browser) {
  const page = await open(browser);
  await page.goto(`${base}/`);
  await page.getByTestId('vm-row-big').waitFor();
  const row = page.locator('[data-testid^="job-"][data-kind="vm_clone"]').first();
  const text = row.getByTestId('job-progress-text');
  const figures = await until('the copy to show its bytes and the time left', async () => {
    const shown = await text.textContent();
    return / · [\d.]+ [KMG]?i?B of [\d.]+ [KMG]?i?B · .+ left$/.test(shown) && shown;
  });
  await shoot(page, 'jobs-progress');
  await until('the clone to succeed', async () => (await row.getAttribute('data-status')) === 'succeeded');
  if ((await text.textContent()) !== '100%') fail(`the finished copy still shows figures: ${await text.textContent()}`);
  onlyLocal(page);
  return { figures };
}

const scenarios = { dashboard, docs, auth, cancel, progress };
const browser = await launch();
try {
  if (!scenarios[scenario]) fail(`no scenario ${scenario}`);
  const result = await scenarios[scenario](browser);
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`${scenario}: ${error.stack ?? error}`);
  // What the user would have seen, to tell why.
  const last = opened.at(-1);
  if (last && !last.isClosed()) {
    const path = join(process.env.STRATA_FAILURE_DIR ?? '/tmp', `strata-e2e-${scenario}-failure.png`);
    await last.screenshot({ path, fullPage: true }).catch(() => undefined);
    console.error(`screenshot of the failure: ${path}`);
    console.error(
      `the page's text:\n${await last
        .locator('body')
        .innerText()
        .catch(() => '?')}`,
    );
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
