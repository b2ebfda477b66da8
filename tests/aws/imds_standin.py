"""A stand-in for EC2's instance metadata service (AWS's own cannot run here), serving the
documented IMDSv2 shapes of a spot interruption notice on loopback:

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` -> a token (400 without the TTL);
- ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token`` -> 401 without a
  valid token, 404 while no interruption is announced, else 200 ``{"action": ..., "time": ...}``.
"""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ImdsStandIn:
    def __init__(self) -> None:
        self.notice: dict[str, Any] | None = None
        self.token = secrets.token_hex(16)
        self.action_reads = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._answer(400, b"")
                    return
                self._answer(200, stand_in.token.encode())

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != stand_in.token:
                    self._answer(401, b"")
                    return
                if self.path != "/latest/meta-data/spot/instance-action":
                    self._answer(404, b"")
                    return
                stand_in.action_reads += 1
                if stand_in.notice is None:
                    self._answer(404, b"")
                    return
                self._answer(200, json.dumps(stand_in.notice).encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ImdsStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
