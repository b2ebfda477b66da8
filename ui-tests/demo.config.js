/**
 * The quickstart in the environment scripts/demo builds (.demo-venv, the `demo` extra only, not the
 * test environment), so a dependency the demo lacks fails CI. scripts/demo itself is the server:
 * it builds the environment, starts the gateway and JupyterLab.
 */
const path = require('path');
const fs = require('fs');
const sidebar = require('./playwright.config');

const gatewayPort = process.env.UI_DEMO_GATEWAY_PORT || '18766';
const labPort = process.env.UI_DEMO_LAB_PORT || '18889';
const labToken = 'ui-demo-lab-token';
const repo = path.resolve(__dirname, '..');
const artifacts = path.join(repo, 'test-artifacts');
// Jupyter's config and data folders and the settings below: under test-artifacts/ (git-ignored), not /tmp
fs.mkdirSync(artifacts, { recursive: true });
const scratch = fs.mkdtempSync(path.join(artifacts, 'ui-demo-jupyter-'));
// Running the notebook must not rewrite examples/quickstart.ipynb: no autosave; no news popup.
const settings = path.join(scratch, 'settings');
for (const [plugin, value] of [
  ['@jupyterlab/docmanager-extension/plugin', { autosave: false }],
  ['@jupyterlab/apputils-extension/notification', { checkForUpdates: false, fetchNews: 'false' }],
  // every cell in the page, not only those scrolled into view, so the test sees all outputs
  ['@jupyterlab/notebook-extension/tracker', { windowingMode: 'none' }]
]) {
  fs.mkdirSync(path.join(settings, path.dirname(plugin)), { recursive: true });
  fs.writeFileSync(path.join(settings, `${plugin}.jupyterlab-settings`), JSON.stringify(value));
}

module.exports = {
  ...sidebar,
  testDir: './demo',
  outputDir: path.join(artifacts, 'ui-demo-output'),
  use: { ...sidebar.use, baseURL: `http://127.0.0.1:${labPort}` },
  metadata: { labToken },
  webServer: [
    {
      command: `bash scripts/demo --LabApp.user_settings_dir=${settings} > ${path.join(artifacts, 'ui-demo.log')} 2>&1`,
      cwd: repo,
      url: `http://127.0.0.1:${labPort}/api/status?token=${labToken}`,
      env: {
        ...process.env,
        VENV: '.demo-venv',
        GATEWAY_PORT: gatewayPort,
        LAB_PORT: labPort,
        LAB_TOKEN: labToken,
        JUPYTER_CONFIG_DIR: path.join(scratch, 'config'),
        JUPYTER_DATA_DIR: path.join(scratch, 'data')
      },
      // the first run builds the environment (pip's cache makes later ones quicker)
      timeout: 900000,
      // SIGTERM, so scripts/demo stops its gateway and JupyterLab stops its kernels
      gracefulShutdown: { signal: 'SIGTERM', timeout: 20000 },
      reuseExistingServer: false
    }
  ]
};
