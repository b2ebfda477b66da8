/**
 * The GPU sidebar end to end: a real gateway (emulated a100 x2, h100 x1), JupyterLab with this
 * checkout's extension, a real notebook kernel running the %%gpu magic.
 */
import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import * as path from 'path';

const ARTIFACTS = path.resolve(__dirname, '..', '..', 'test-artifacts');
const PANEL = '#jupyter-gpu-panel';
const STATUS = '#jp-main-statusbar .jp-GpuStatus';

async function openPanel(page: IJupyterLabPageFixture) {
  await page.sidebar.openTab('jupyter-gpu-panel');
  const panel = page.locator(PANEL);
  await expect(panel).toBeVisible();
  return panel;
}

function typeRow(page: IJupyterLabPageFixture, name: string) {
  return page.locator(`${PANEL} [data-gpu-type="${name}"]`);
}

test.describe('GPU sidebar', () => {
  test('shows the pool, runs a cell on a GPU, shows and releases the lease', async ({
    page,
    tmpPath
  }) => {
    const panel = await openPanel(page);

    // The types, live from the gateway.
    await expect(typeRow(page, 'a100').locator('.jp-GpuPanel-free')).toHaveText('2/2');
    await expect(typeRow(page, 'a100')).toContainText('emulated');
    await expect(typeRow(page, 'h100').locator('.jp-GpuPanel-free')).toHaveText('1/1');
    await expect(typeRow(page, 'a100')).toContainText(/\d warm · 0 queued · \$2\.50\/h/);
    await expect(typeRow(page, 'h100')).toContainText('$4.20/h');
    await expect(typeRow(page, 'cpu')).not.toContainText('emulated');
    await expect(panel).toContainText('No GPU held');

    // The default type for %%gpu without a SPEC, chosen in the panel (not the first type, which
    // `any` would pick anyway).
    await panel.locator('select#jp-GpuPanel-defaultType').selectOption('h100');

    // A notebook whose cell knows nothing about GPUs.
    const source = [
      'import os',
      'answer = 6 * 7',
      'print("GPU", os.environ.get("CUDA_VISIBLE_DEVICES"), "answer", answer)'
    ].join('\n');
    // (not renamed: a running kernel keeps the notebook name it started with, and so does its lease)
    const name = await page.notebook.createNew();
    await page.notebook.setCell(0, 'code', source);
    await page.notebook.selectCells(0);

    // The command is in the cell's context menu and the palette, and on the notebook toolbar.
    await (await page.notebook.getCellLocator(0))!.click({ button: 'right' });
    await expect(
      page.locator('.lm-Menu-item[data-command="jupyter-gpu:run-cell"]')
    ).toBeVisible();
    await page.keyboard.press('Escape');
    const runButton = page.locator(
      '.jp-NotebookPanel-toolbar [data-command="jupyter-gpu:run-cell"]'
    );
    await expect(runButton).toBeVisible();
    await runButton.click();

    // It ran on the pooled kernel pinned to the h100 (the local kernel has no CUDA_VISIBLE_DEVICES).
    const output = (await page.notebook.getCellOutputLocator(0))!;
    await expect(output).toContainText(/GPU \d answer 42/, { timeout: 60000 });
    expect(await page.notebook.getCellTextInput(0)).toBe(source);

    // The lease in the panel...
    const lease = panel.locator('.jp-GpuPanel-lease');
    await expect(lease).toHaveCount(1);
    await expect(lease.locator('.jp-GpuPanel-notebook')).toHaveText(name!);
    await expect(lease.locator('.jp-GpuPanel-notebook')).toHaveAttribute(
      'title',
      `${tmpPath}/${name}: open it`
    );
    await expect(lease.locator('.jp-GpuPanel-leaseType')).toContainText(/h100 · GPU \d/);
    await expect(lease.locator('.jp-GpuPanel-util')).toHaveText('n/a');
    await expect(typeRow(page, 'h100').locator('.jp-GpuPanel-free')).toHaveText('0/1');
    // ... and in the status bar of its notebook.
    await expect(page.locator(STATUS)).toHaveText(/^h100 · \d+s · \$\d+\.\d\d$/);

    // From the palette, on a cell that already says %%gpu: it runs as written, and %%gpu without
    // a SPEC takes the panel's default (through the file the server extension wrote): same type,
    // so the same lease and the same GPU.
    const magicSource = '%%gpu\nprint("default", os.environ["CUDA_VISIBLE_DEVICES"])';
    await page.notebook.addCell('code', magicSource);
    await page.notebook.selectCells(1);
    await page.keyboard.press('Control+Shift+C');
    await page.locator('#modal-command-palette input').fill('Run cell on GPU');
    const paletteItem = page.locator(
      '#modal-command-palette .lm-CommandPalette-item[data-command="jupyter-gpu:run-cell"]'
    );
    await expect(paletteItem).toBeVisible();
    await paletteItem.click();
    const gpuIndex = (await output.textContent())!.match(/GPU (\d)/)![1];
    await expect((await page.notebook.getCellOutputLocator(1))!).toContainText(
      `default ${gpuIndex}`,
      { timeout: 60000 }
    );
    expect(await page.notebook.getCellTextInput(1)).toBe(magicSource);
    await expect(lease).toHaveCount(1);

    await page.screenshot({ path: path.join(ARTIFACTS, 'sidebar-light.png') });
    await panel.screenshot({ path: path.join(ARTIFACTS, 'panel-light.png') });
    await page.theme.setDarkTheme();
    await expect(lease).toHaveCount(1);
    await page.screenshot({ path: path.join(ARTIFACTS, 'sidebar-dark.png') });
    await panel.screenshot({ path: path.join(ARTIFACTS, 'panel-dark.png') });
    await page.theme.setLightTheme();

    // Release: the lease is gone, the GPU is free again, the status bar says nothing.
    await lease.locator('button.jp-GpuPanel-release').click();
    await expect(lease).toHaveCount(0);
    await expect(panel).toContainText('No GPU held');
    await expect(typeRow(page, 'h100').locator('.jp-GpuPanel-free')).toHaveText('1/1');
    await expect(page.locator(STATUS)).toBeHidden();
  });

  test('says in words when the gateway does not answer, and recovers by itself', async ({
    page
  }) => {
    const down = {
      status: 502,
      contentType: 'application/json',
      body: JSON.stringify({
        message: 'gateway at http://127.0.0.1:18765 does not answer (Connection refused)',
        reason: 'gateway_unreachable'
      })
    };
    // (JupyterLab adds a cache-busting query to GETs, hence a pattern rather than a glob)
    const state = /\/jupyter-gpu\/state(\?|$)/;
    await page.route(state, route => route.fulfill(down));
    const panel = await openPanel(page);
    const error = panel.locator('.jp-GpuPanel-error');
    await expect(error).toContainText('gateway at http://127.0.0.1:18765 does not answer');
    await expect(error).toContainText('Retrying by itself');

    await page.unroute(state);
    await expect(error).toHaveCount(0, { timeout: 30000 });
    await expect(typeRow(page, 'a100').locator('.jp-GpuPanel-free')).toHaveText('2/2');
  });

  test('polls only while something shows the pool', async ({ page }) => {
    const polls: number[] = [];
    page.on('request', request => {
      if (/\/jupyter-gpu\/state(\?|$)/.test(request.url())) {
        polls.push(Date.now());
      }
    });
    await openPanel(page);
    await expect.poll(() => polls.length, { timeout: 10000 }).toBeGreaterThan(2);

    // No notebook is open and the sidebar closes: nothing shows the pool, so nothing is fetched.
    await page.sidebar.close('left');
    await page.waitForTimeout(1000); // a request already on its way may still land
    const seen = polls.length;
    await page.waitForTimeout(12000); // longer than the slow interval (10 s) of a hidden panel
    expect(polls.length).toBe(seen);

    // Shown again: fresh figures at once.
    await page.sidebar.openTab('jupyter-gpu-panel');
    await expect.poll(() => polls.length, { timeout: 3000 }).toBeGreaterThan(seen);
  });
});
