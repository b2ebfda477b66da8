"""JupyterLab for the browser tests: galata's test settings, loopback, and the test gateway."""

import os

from jupyterlab.galata import configure_jupyter_server

c = get_config()  # type: ignore[name-defined]  # noqa: F821
configure_jupyter_server(c)
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.port = int(os.environ.get("UI_TEST_LAB_PORT", "18888"))
c.ServerApp.port_retries = 0
c.ServerApp.allow_root = True
