"""The sidebar's server extension in a Hub single-user server whose Hub does not list the gateway."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jupyter_gpu.client import GatewayError
from jupyter_gpu.protocol import TOKEN_ENV, URL_ENV
from jupyter_gpu.server_extension import JupyterGpu


class RefusingHub(BaseHTTPRequestHandler):
    """A Hub API that answers every request 403 (the server's token lacks the scope to list services)."""

    looks = 0

    def do_GET(self) -> None:
        RefusingHub.looks += 1
        body = b'{"status": 403, "message": "Action is not authorized with current scopes"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RefusingHub.looks = 0
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_URL", f"http://127.0.0.1:{server.server_port}/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "server-token")
    yield
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_hub_that_does_not_show_the_gateway_is_asked_once_not_on_every_sidebar_poll(refusing_hub: None) -> None:
    gpu = JupyterGpu()
    messages = []
    for _ in range(3):  # the sidebar's polls: each would block the server's event loop on the Hub
        with pytest.raises(GatewayError) as caught:
            gpu.client()
        messages.append(str(caught.value))
    assert RefusingHub.looks == 1
    assert len(set(messages)) == 1, messages
    assert "does not show its services to this server's token" in messages[0] and "JUPYTER_GPU_URL" in messages[0]
