"""A real JupyterHub (with configurable-http-proxy) on loopback, running the gateway as a managed service.

Users log in with JupyterHub's DummyAuthenticator and get their notebook servers from its
SimpleLocalProcessSpawner (a process per user, a home under the test's temp dir). The test
drives the Hub through its REST API with the token of a service, ``tester``, that may
create users' tokens and start their servers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets.sync.client

from .gateway_process import Reply

SERVICE = "jupyter-gpu"
#: What a user's notebook server token may do: the Hub's defaults, plus finding and using the gateway.
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", f"access:services!service={SERVICE}",
                       f"list:services!service={SERVICE}", f"read:services!service={SERVICE}"]
#: An external gateway the operator runs (test_hub.py starts it), registered with a token of its own.
EXTERNAL = "gpu-external"
USER_SCOPES = ["self", f"access:services!service={SERVICE}", f"list:services!service={SERVICE}",
               f"read:services!service={SERVICE}", f"access:services!service={EXTERNAL}"]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_command() -> str | None:
    """configurable-http-proxy: scripts/setup installs it next to the venv's Python (npm), else on PATH."""
    beside = Path(sys.executable).parent / "configurable-http-proxy"
    return str(beside) if beside.exists() else shutil.which("configurable-http-proxy")


@dataclass
class HubProcess:
    tmp: Path
    gateway_args: list[str]
    cache_max_age: int
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""  # the proxy: what users reach
    api: str = ""  # the Hub's API
    gateway_url: str = ""
    tester_token: str = field(default_factory=lambda: secrets.token_hex(16))
    proxy_pid: int = 0
    external_token: str = field(default_factory=lambda: secrets.token_hex(16))

    def config(self, proxy: str) -> str:
        port, hub_port, proxy_api, gateway_port = free_port(), free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"http://127.0.0.1:{hub_port}/hub/api"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        gateway_env = {"PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "PYTHONUNBUFFERED": "1",
                       "JUPYTER_CONFIG_DIR": str(self.tmp / "gateway-config"),
                       "JUPYTER_DATA_DIR": str(self.tmp / "gateway-data")}
        gateway = [sys.executable, "-m", "jupyter_gpu.cli", "gateway", "--db", str(self.tmp / "usage.sqlite"),
                   f"--HubIdentityProvider.cache_max_age={self.cache_max_age}", *self.gateway_args]
        single_user = [sys.executable, "-m", "jupyterhub.singleuser"]
        args = ["--allow-root"] if os.geteuid() == 0 else []
        settings: dict[str, Any] = {
            "JupyterHub.ip": "127.0.0.1", "JupyterHub.port": port,
            "JupyterHub.hub_ip": "127.0.0.1", "JupyterHub.hub_port": hub_port,
            "ConfigurableHTTPProxy.api_url": f"http://127.0.0.1:{proxy_api}",
            "ConfigurableHTTPProxy.command": [proxy],
            "JupyterHub.db_url": f"sqlite:///{self.tmp / 'hub.sqlite'}",
            "JupyterHub.cookie_secret_file": str(self.tmp / "cookie_secret"),
            "JupyterHub.pid_file": str(self.tmp / "hub.pid"),
            "JupyterHub.authenticator_class": "dummy",
            "JupyterHub.spawner_class": "simple",
            "SimpleLocalProcessSpawner.home_dir_template": str(self.tmp / "home" / "{username}"),
            "Spawner.cmd": single_user,
            "Spawner.args": args,
            "Spawner.start_timeout": 60,
            "Spawner.http_timeout": 60,
            "Spawner.environment": {"PYTHONPATH": gateway_env["PYTHONPATH"]},
            "Spawner.server_token_scopes": SERVER_TOKEN_SCOPES,
            "Authenticator.admin_users": ["ops"],
            "Authenticator.allowed_users": ["alice", "bob", "ops"],
            "JupyterHub.load_groups": {"physics": {"users": ["alice"]}, "biology": {"users": ["bob"]}},
            "JupyterHub.load_roles": [
                {"name": "user", "scopes": USER_SCOPES},
                # bob may open alice's server (as JupyterHub's sharing allows): he must still see only his leases
                {"name": "alice-peer", "scopes": ["access:servers!user=alice"], "users": ["bob"]},
                {"name": "tester", "scopes": ["admin:users", "admin:servers", "tokens", "access:servers",
                                              "list:services", "read:services", "access:services"],
                 "services": ["tester"]},
            ],
            "JupyterHub.services": [
                {"name": SERVICE, "url": self.gateway_url, "command": gateway, "environment": gateway_env,
                 "oauth_no_confirm": True},
                {"name": EXTERNAL, "api_token": self.external_token},
                {"name": "tester", "api_token": self.tester_token},
            ],
        }
        lines = ["c = get_config()  # noqa: F821"]
        for key, value in settings.items():
            section, name = key.split(".")
            lines.append(f"c.{section}.{name} = {value!r}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 90.0) -> HubProcess:
        proxy = proxy_command()
        assert proxy is not None
        config = self.tmp / "jupyterhub_config.py"
        config.write_text(self.config(proxy))
        env = {key: value for key, value in os.environ.items() if not key.startswith(("JUPYTERHUB_", "JUPYTER_GPU"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.log = open(self.tmp / "hub.log", "wb")  # the process owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=self.tmp,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterHub exited {self.proc.returncode}:\n{self.log_text()}")
            # the gateway answers 401 to no token once it listens; its warm kernels come later
            if self.hub("GET", "/").status == 200 and fetch(self.gateway_url + "/api/gpu/types").status == 401:
                self.proxy_pid = int((self.tmp / "jupyterhub-proxy.pid").read_text())  # for stop()
                return self
            time.sleep(0.2)
        raise RuntimeError(f"JupyterHub or the gateway did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return (self.tmp / "hub.log").read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """SIGTERM to the Hub, which stops the servers it spawned, its managed gateway and the proxy
        (the proxy, in a session of its own, only gets a SIGTERM on the Hub's way out: it is waited
        for here, and killed if need be, also when the Hub died or never came up)."""
        if self.proc is None:
            return
        pid_file = self.tmp / "jupyterhub-proxy.pid"
        if not self.proxy_pid and pid_file.exists():
            self.proxy_pid = int(pid_file.read_text() or 0)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the Hub and what it started
                self.proc.wait(10)
        self.log.close()
        if self.proxy_pid:
            end_process(self.proxy_pid, "configurable-http-proxy")

    # --- the Hub's API, as the tester service -------------------------------------------------

    def hub(self, method: str, path: str, body: Any = None) -> Reply:
        return fetch(self.api + path, method, body, self.tester_token)

    def token_for(self, user: str, scopes: list[str]) -> tuple[str, str]:
        """A new Hub API token of ``user`` with these scopes: (token, its id for revoking)."""
        reply = self.hub("POST", f"/users/{user}/tokens", {"scopes": scopes, "note": "test"})
        assert reply.status == 201, reply
        return reply.body["token"], reply.body["id"]

    def revoke(self, user: str, token_id: str) -> None:
        assert self.hub("DELETE", f"/users/{user}/tokens/{token_id}").status == 204

    def start_servers(self, *users: str, timeout: float = 90.0) -> None:
        for user in users:
            assert self.hub("POST", f"/users/{user}/server").status in (201, 202)
        deadline = time.monotonic() + timeout
        pending = set(users)
        while pending and time.monotonic() < deadline:
            for user in list(pending):
                server = self.hub("GET", f"/users/{user}").body.get("servers", {}).get("", {})
                if server.get("ready"):
                    pending.discard(user)
            time.sleep(0.3)
        assert not pending, f"servers of {pending} did not start:\n{self.log_text()}"

    # --- a user's notebook server, through the proxy ------------------------------------------

    def server(self, user: str, method: str, path: str, body: Any = None, token: str | None = None) -> Reply:
        return fetch(f"{self.url}/user/{user}{path}", method, body, token or self.tester_token)

    def start_kernel(self, user: str) -> str:
        reply = self.server(user, "POST", "/api/kernels", {"name": "python3"})
        assert reply.status == 201, reply
        return str(reply.body["id"])

    def run_cell(self, user: str, kernel_id: str, code: str, timeout: float = 60.0) -> tuple[str, str]:
        """Execute ``code`` in a kernel of the user's notebook server: (its stdout, its error or "")."""
        url = f"{self.url.replace('http', 'ws', 1)}/user/{user}/api/kernels/{kernel_id}/channels"
        msg_id = secrets.token_hex(8)
        request = {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": "t",
                              "version": "5.3", "date": ""}, "parent_header": {}, "metadata": {}, "channel": "shell",
                   "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                               "allow_stdin": False, "stop_on_error": True}, "buffers": []}
        out: list[str] = []
        error = ""
        with websockets.sync.client.connect(
                url, additional_headers={"Authorization": f"token {self.tester_token}"}, open_timeout=30) as ws:
            ws.send(json.dumps(request))
            deadline = time.monotonic() + timeout
            while True:
                msg = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind == "error":
                    error = f"{content['ename']}: {content['evalue']}"
                elif kind == "status" and content["execution_state"] == "idle":
                    return "".join(out), error


def fetch(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"token {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            payload, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        payload, status = exc.read(), exc.code
    except OSError:
        return Reply(0, None)
    try:
        return Reply(status, json.loads(payload) if payload else None)
    except ValueError:
        return Reply(status, payload.decode(errors="replace"))


def end_process(pid: int, name: str, grace: float = 5.0) -> None:
    """Wait for process ``pid`` (if it is still ``name``) to exit; SIGTERM, then SIGKILL it after ``grace``."""
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if name not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return  # gone (and the pid maybe reused)
            os.kill(pid, sig)
        except (FileNotFoundError, ProcessLookupError):
            return
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
        deadline = time.monotonic() + grace
