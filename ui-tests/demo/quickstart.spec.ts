/**
 * A newcomer's first run: examples/quickstart.ipynb top to bottom in the JupyterLab scripts/demo
 * starts, in the environment it builds: no error anywhere, the tqdm bar drawn as a widget.
 */
import { expect, test } from '@playwright/test';

const LAB_TOKEN = 'ui-demo-lab-token';

function codeCell(page: any, text: string) {
  return page.locator('.jp-CodeCell', { hasText: text });
}

test('the quickstart runs top to bottom without an error', async ({ page }) => {
  test.setTimeout(300000);
  await page.goto(`/lab/tree/examples/quickstart.ipynb?reset&token=${LAB_TOKEN}`);
  const notebook = page.locator('.jp-NotebookPanel');
  await expect(notebook).toBeVisible({ timeout: 60000 });
  // the notebook's own kernel is up and connected
  await expect(page.locator('#jp-main-statusbar')).toContainText('| Idle', { timeout: 90000 });

  await page.locator('.lm-MenuBar-item', { hasText: /^Run$/ }).click();
  await page.locator('.lm-Menu-item', { hasText: /^Run All Cells/ }).first().click();
  await expect(notebook.locator('.jp-CodeCell .jp-InputArea-prompt').first()).not.toHaveText('[ ]:', {
    timeout: 20000
  });

  // Every code cell ran: each prompt shows its execution count ([*] while queued or running).
  const prompts = notebook.locator('.jp-CodeCell .jp-InputArea-prompt');
  const count = await prompts.count();
  expect(count).toBeGreaterThan(5);
  for (let i = 0; i < count; i++) {
    await expect(prompts.nth(i)).toHaveText(/\[\d+\]/, { timeout: 120000 });
  }
  await page.screenshot({ path: '../test-artifacts/ui-demo-quickstart.png', fullPage: true });

  // No error output anywhere (stderr that is only a warning, such as matplotlib's font cache, is fine).
  const stderr = notebook.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
  const texts = await stderr.allInnerTexts();
  expect(texts.filter(t => /Error|Traceback|Exception/.test(t))).toEqual([]);

  // What each step promises.
  await expect(codeCell(page, '%gpu types').locator('.jp-OutputArea')).toContainText('a100');
  await expect(codeCell(page, 'print(result, batch.shape)').locator('.jp-OutputArea')).toContainText(
    '(64, 1000)'
  );
  const bar = codeCell(page, 'tqdm(range(30))').locator('.jp-OutputArea');
  await expect(bar.locator('.widget-hprogress')).toBeVisible(); // ipywidgets' bar, not tqdm's text
  await expect(bar).toContainText('30/30');
  await expect(bar).toContainText('batch is still here: (64, 1000)');
  await expect(codeCell(page, 'plt.hist').locator('.jp-OutputArea img')).toBeVisible();
  await expect(codeCell(page, 'activations  #').locator('.jp-OutputArea')).toContainText('RemoteRef');
  await expect(codeCell(page, '%gpu usage').locator('.jp-OutputArea')).toContainText('$');
});
