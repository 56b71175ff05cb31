// The sidebar in a real browser: Debian's chromium driven by playwright-core (browsers cannot be
// downloaded here). tests/test_sidebar_browser.py starts JupyterLab and runs this script; it
// prints one JSON line with what it saw and exits non-zero on the first failed check.
//
// Environment: LAB_URL (http://127.0.0.1:PORT), LAB_TOKEN, NOTEBOOK (path in the lab's root),
// PULL_NAME (what to type into the pull box), ARTIFACTS (screenshot folder), CHROMIUM (binary),
// PROFILE (a fresh profile directory); RPC_ENDPOINT (optional: a loopback rpc-server to price).
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

const env = name => {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
};
const LAB_URL = env('LAB_URL');
const TOKEN = env('LAB_TOKEN');
const NOTEBOOK = env('NOTEBOOK');
const OTHER_NOTEBOOK = env('OTHER_NOTEBOOK');
const PULL_NAME = env('PULL_NAME');
const ARTIFACTS = env('ARTIFACTS');
const STEP_TIMEOUT = Number(process.env.STEP_TIMEOUT ?? 120_000);

const report = { steps: [], screenshots: [], console_errors: [] };
const started = Date.now();

function step(name, extra = {}) {
  report.steps.push({ name, seconds: (Date.now() - started) / 1000, ...extra });
  console.error(`[sidebar] ${name}`);
}

async function shot(page, name) {
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path });
  report.screenshots.push(path);
}

async function shotOf(locator, name) {
  const path = join(ARTIFACTS, `${name}.png`);
  await locator.screenshot({ path });
  report.screenshots.push(path);
}

/** Wait until the active notebook's kernel is connected and idle (the "idle" indicator alone
 * shows before the websocket is up, and an execute then is silently dropped: NOTES §7). */
async function waitKernelReady(page) {
  await page.waitForFunction(
    () => {
      const app = window.jupyterapp;
      const widget = app?.shell.currentWidget;
      const kernel = widget?.sessionContext?.session?.kernel;
      return kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
    },
    null,
    { timeout: STEP_TIMEOUT, polling: 200 }
  );
}

/** Run cell `index` of the active notebook and wait until it has finished. */
async function runCell(page, index) {
  await waitKernelReady(page);
  await page.evaluate(async i => {
    const app = window.jupyterapp;
    const panel = app.shell.currentWidget;
    panel.content.activeCellIndex = i;
    await app.commands.execute('notebook:run-cell');
  }, index);
  // the cell's prompt shows [n] once done; [*] while it runs
  await page.waitForFunction(
    i => {
      const panel = window.jupyterapp.shell.currentWidget;
      const cell = panel.content.widgets[i];
      return cell.model.executionCount !== null && cell.promptNode.textContent.trim() !== '[*]:';
    },
    index,
    { timeout: STEP_TIMEOUT, polling: 200 }
  );
}

async function cellText(page, index) {
  return page.evaluate(i => {
    const cell = window.jupyterapp.shell.currentWidget.content.widgets[i];
    return cell.outputArea.node.innerText;
  }, index);
}

async function setTheme(page, theme) {
  await page.evaluate(t => window.jupyterapp.commands.execute('apputils:change-theme', { theme: t }), theme);
  await page.waitForFunction(t => document.body.dataset.jpThemeName === t, theme, { timeout: STEP_TIMEOUT });
  await page.waitForTimeout(500); // let the stylesheets apply before a screenshot
}

const sidebar = '#jupyter-llm-sidebar';

async function openNotebookAndPanel(page) {
  await page.goto(`${LAB_URL}/lab/tree/${NOTEBOOK}?token=${TOKEN}`);
  await page.waitForSelector('.jp-NotebookPanel', { timeout: STEP_TIMEOUT });
  await waitKernelReady(page);
  const tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="jupyter-llm-sidebar"]');
  await tab.waitFor({ timeout: STEP_TIMEOUT });
  if (!(await page.locator(sidebar).isVisible())) {
    await tab.click();
  }
  await page.locator(sidebar).waitFor({ state: 'visible' });
}

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const context = await chromium.launchPersistentContext(env('PROFILE'), {
    executablePath: env('CHROMIUM'),
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage'
    ]
  });
  context.setDefaultTimeout(STEP_TIMEOUT);
  // "Copy token" is checked by reading the clipboard back
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: LAB_URL });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', msg => {
    if (msg.type() === 'error' && msg.text().includes('jupyter-llm')) {
      report.console_errors.push(msg.text());
    }
  });
  try {
    await openNotebookAndPanel(page);
    step('lab open, kernel connected');

    // 1. a kernel that has not loaded the extension: the panel says how, and offers a button
    const banner = page.locator(`${sidebar} .jp-LLM-banner`);
    await banner.waitFor({ state: 'visible' });
    report.banner = await banner.innerText();
    await shot(page, '01-not-loaded-light');
    await page.locator(`${sidebar} .jp-LLM-enable`).click();
    await page.waitForSelector(`${sidebar}[data-status="attached"]`);
    step('extension loaded from the panel button');

    // 2. pull from the sidebar
    await page.locator(`${sidebar} .jp-LLM-pull-name`).fill(PULL_NAME);
    await page.locator(`${sidebar} .jp-LLM-pull`).click();
    const cached = page.locator(`${sidebar} .jp-LLM-models .jp-LLM-model`).first();
    await cached.waitFor();
    const model = await cached.getAttribute('data-model');
    report.model = model;
    report.cached_caption = await cached.locator('.jp-LLM-caption').innerText();
    await page.waitForSelector(`${sidebar} .jp-LLM-message:has-text("pulled")`);
    step('pulled', { model });

    // 3. load it from the sidebar with a small context; the estimate is drawn as the form changes
    await page.locator(`${sidebar} .jp-LLM-ctx`).fill('2048');
    await page.locator(`${sidebar} .jp-LLM-load-name`).fill(model);
    await page.waitForSelector(`${sidebar} .jp-LLM-estimate .jp-LLM-bar`);
    report.estimate_caption = await page.locator(`${sidebar} .jp-LLM-estimate`).innerText();

    // 3b. the RPC servers field: a real rpc-server on loopback is priced as a device of its own
    const rpcField = page.locator(`${sidebar} .jp-LLM-rpc`);
    await rpcField.waitFor();
    report.rpc_field = await rpcField.getAttribute('aria-label');
    const endpoint = process.env.RPC_ENDPOINT;
    if (endpoint) {
      const estimate = page.locator(`${sidebar} .jp-LLM-estimate`);
      await page.locator(`${sidebar} .jp-LLM-gpu-layers`).fill('31');
      await rpcField.fill(endpoint);
      await rpcField.press('Tab'); // priced when the field is left: each estimate connects to the server
      await estimate.locator('.jp-LLM-caption', { hasText: `RPC0[${endpoint}]` }).first().waitFor();
      report.rpc_estimate = await estimate.innerText();
      await shot(page, '02b-rpc-estimate-light');
      await rpcField.fill('no-port');
      await rpcField.press('Tab');
      await estimate.locator('.jp-LLM-error', { hasText: 'HOST:PORT' }).waitFor();
      report.rpc_error = await estimate.innerText();
      await rpcField.fill('');
      await rpcField.press('Tab');
      await page.locator(`${sidebar} .jp-LLM-gpu-layers`).fill('auto');
      await page.waitForFunction(
        s => {
          const text = document.querySelector(`${s} .jp-LLM-estimate`)?.textContent ?? '';
          return text.includes('CPU: needs') && !text.includes('RPC0[');
        },
        sidebar,
        { timeout: STEP_TIMEOUT, polling: 200 }
      );
      step('priced an rpc-server from the load form', { endpoint });
    }
    await cached.locator('.jp-LLM-load-cached').click();
    const card = page.locator(`${sidebar} .jp-LLM-card[data-model="${model}"]`);
    await card.waitFor();
    await card.locator('.jp-LLM-compare td').first().waitFor();
    report.loaded_card = await card.innerText();
    report.device_segments = await page
      .locator(`${sidebar} .jp-LLM-device .jp-LLM-seg`)
      .evaluateAll(els => els.map(e => e.className.replace('jp-LLM-seg jp-LLM-seg-', '')));
    step('loaded from the sidebar');
    await shot(page, '02-loaded-light');

    // 4. chat in a cell, then show the memory widget in the notebook
    await runCell(page, 1);
    report.chat_output = await cellText(page, 1);
    step('chatted in a cell');
    await runCell(page, 2);
    await page.waitForSelector('.jp-LLM-memory', { timeout: STEP_TIMEOUT });
    report.mem_widget = await page.locator('.jp-LLM-memory').first().innerText();
    await shot(page, '03-chat-and-mem-light');
    await runCell(page, 3);
    const picker = page.locator('.jp-LLM-picker').first();
    await picker.locator('.jp-LLM-estimate').waitFor();
    report.picker = await picker.innerText();
    await shotOf(picker, '03-picker-light');
    await setTheme(page, 'JupyterLab Dark');
    await shot(page, '04-loaded-dark');
    await shotOf(picker, '04-picker-dark');

    // 5. unload from the sidebar
    await card.locator('.jp-LLM-unload').click();
    await page.waitForSelector(`${sidebar} .jp-LLM-loaded .jp-LLM-empty`);
    report.after_unload = await page.locator(`${sidebar} .jp-LLM-loaded`).innerText();
    step('unloaded from the sidebar');
    await shot(page, '05-unloaded-dark');

    // 6. a page reload re-attaches to the running kernel (the panel opens its own comm)
    await page.reload();
    await page.waitForSelector('.jp-NotebookPanel');
    await waitKernelReady(page);
    if (!(await page.locator(sidebar).isVisible())) {
      await page.locator('.jp-SideBar .lm-TabBar-tab[data-id="jupyter-llm-sidebar"]').click();
    }
    await page.waitForSelector(`${sidebar}[data-status="attached"]`);
    await page.locator(`${sidebar} .jp-LLM-model[data-model="${model}"]`).waitFor();
    step('re-attached after a page reload');
    await shot(page, '06-reloaded-dark');
    await setTheme(page, 'JupyterLab Light');

    // 7. the API server: start it on a free port, copy its token, use it, stop it
    await page.locator(`${sidebar} .jp-LLM-port`).fill('0');
    await page.locator(`${sidebar} .jp-LLM-serve`).click();
    const link = page.locator(`${sidebar} .jp-LLM-server-url a`);
    await link.waitFor();
    const apiUrl = await link.getAttribute('href');
    await page.locator(`${sidebar} .jp-LLM-copy-token`).click();
    await page.waitForSelector(`${sidebar} .jp-LLM-message:has-text("token copied")`);
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    const withToken = await fetch(`${apiUrl}/api/tags`, { headers: { Authorization: `Bearer ${copied}` } });
    const withoutToken = await fetch(`${apiUrl}/api/tags`);
    report.server = {
      url: apiUrl,
      token_length: copied.length,
      with_token: withToken.status,
      without_token: withoutToken.status,
      tags: await withToken.json()
    };
    step('API server started from the sidebar', { url: apiUrl });
    await page.locator(sidebar).evaluate(el => el.scrollTo(0, el.scrollHeight));
    await shot(page, '07-server-light');

    // 7b. remote engines: this kernel's own API as an Ollama remote (token from a variable), and a dead one
    await runCell(page, 4);
    const remotes = page.locator(`${sidebar} .jp-LLM-remotes`);
    await remotes.locator('.jp-LLM-remote[data-remote="self"] .jp-LLM-remote-model').first().waitFor();
    await remotes.locator('.jp-LLM-remote.jp-LLM-unreachable[data-remote="dead"]').waitFor();
    report.remotes = await remotes.innerText();
    step('remote engines listed in the sidebar');
    await remotes.scrollIntoViewIfNeeded();
    await shot(page, '07-remotes-light');
    await page.locator(`${sidebar} .jp-LLM-stop`).click();
    await page.locator(`${sidebar} .jp-LLM-serve`).waitFor();
    step('API server stopped from the sidebar');

    // 8. the panel follows the active notebook: another kernel has not loaded the extension
    const label = page.locator(`${sidebar} .jp-LLM-kernel`);
    await page.evaluate(p => window.jupyterapp.commands.execute('docmanager:open', { path: p }), OTHER_NOTEBOOK);
    await waitKernelReady(page);
    await page.waitForSelector(`${sidebar}[data-status="not-loaded"]`);
    report.other_label = await label.innerText();
    await page.evaluate(p => window.jupyterapp.commands.execute('docmanager:open', { path: p }), NOTEBOOK);
    await page.waitForSelector(`${sidebar}[data-status="attached"]`);
    report.back_label = await label.innerText();
    step('followed a notebook switch and back');

    // 9. after a kernel restart the extension is gone: the panel says so once, and re-enables
    await page.evaluate(() => window.jupyterapp.shell.currentWidget.sessionContext.restartKernel());
    await page.waitForSelector(`${sidebar}[data-status="not-loaded"]`);
    await waitKernelReady(page);
    await page.locator(`${sidebar} .jp-LLM-enable`).click();
    await page.waitForSelector(`${sidebar}[data-status="attached"]`);
    await page.locator(`${sidebar} .jp-LLM-model[data-model="${model}"]`).waitFor();
    step('re-attached after a kernel restart');
    report.ok = true;
  } catch (error) {
    report.ok = false;
    report.error = String(error?.stack ?? error);
    try {
      await shot(page, '99-failure');
    } catch {
      // the page itself is gone
    }
  } finally {
    report.seconds = (Date.now() - started) / 1000;
    await context.close();
  }
  console.log(JSON.stringify(report));
  process.exit(report.ok ? 0 : 1);
}

main().catch(error => {
  console.log(JSON.stringify({ ok: false, error: String(error?.stack ?? error) }));
  process.exit(1);
});
