/**
 * Browser tests: a real gateway (emulated a100 x2, h100 x1) and JupyterLab with this checkout's
 * extension, driven in Debian's Chromium (`apt-get install chromium`; no browser download).
 */
const os = require('os');
const path = require('path');
const fs = require('fs');
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

const gatewayPort = process.env.UI_TEST_GATEWAY_PORT || '18765';
const labPort = process.env.UI_TEST_LAB_PORT || '18888';
const token = 'ui-test-gateway-token';
const venvBin = path.resolve(__dirname, '..', '.venv', 'bin');
const artifacts = path.resolve(__dirname, '..', 'test-artifacts');
// Own Jupyter config and data folders: the default-type file the tests write stays out of ~/.
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'jupyter-gpu-ui-'));
const env = {
  ...process.env,
  PATH: `${venvBin}:${process.env.PATH}`,
  JUPYTER_CONFIG_DIR: path.join(scratch, 'config'),
  JUPYTER_DATA_DIR: path.join(scratch, 'data'),
  JUPYTER_GPU_TOKEN: token,
  JUPYTER_GPU_URL: `http://127.0.0.1:${gatewayPort}`,
  UI_TEST_LAB_PORT: labPort
};

module.exports = {
  ...baseConfig,
  testDir: './tests', // demo/ has its own config (demo.config.js)
  outputDir: path.join(artifacts, 'ui-tests-output'),
  reporter: [['list']],
  retries: 0,
  timeout: 120000,
  workers: 1,
  use: {
    ...baseConfig.use,
    baseURL: `http://127.0.0.1:${labPort}`,
    video: 'off',
    trace: 'off',
    screenshot: 'only-on-failure',
    viewport: { width: 1280, height: 800 },
    launchOptions: {
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
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
    }
  },
  webServer: [
    {
      command: [
        `jupyter-gpu gateway --port ${gatewayPort} --inventory a100=2,h100=1 --min-warm 1`,
        '--PoolManager.price_per_gpu_hour a100=2.5 --PoolManager.price_per_gpu_hour h100=4.2',
        `--db ${path.join(scratch, 'usage.sqlite')}`,
        // the servers' logs go to files: read them when a test fails
        `> ${path.join(artifacts, 'ui-tests-gateway.log')} 2>&1`
      ].join(' '),
      // without a token the gateway answers 401, which Playwright counts as "up"
      url: `http://127.0.0.1:${gatewayPort}/api/gpu/types`,
      env,
      timeout: 60000,
      reuseExistingServer: false
    },
    {
      command: `jupyter lab --config jupyter_server_test_config.py > ${path.join(artifacts, 'ui-tests-lab.log')} 2>&1`,
      url: `http://127.0.0.1:${labPort}/lab`,
      env,
      timeout: 120000,
      reuseExistingServer: false
    }
  ]
};
