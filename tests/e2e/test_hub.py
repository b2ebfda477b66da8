"""JupyterHub users without tokens: a real Hub, its proxy, two users' notebook servers, the gateway as a service.

alice (group physics) and bob (group biology) each get a notebook server from the Hub and run
``%%gpu`` cells in a kernel there with nothing set up (no gateway URL, no gateway token);
ops is a Hub admin. Every attack is tried for real: bob's kernel goes after alice's lease and
kernel with the token it has, a revoked token keeps trying, a token without the service's
scope tries. One Hub for the whole module.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from jupyter_gpu.client import GatewayClient, GatewayConfig, GatewayError
from kernel_gateway.channels import IDENTITY_RECHECK_SECONDS

from .gateway_process import GatewayProcess
from .hub_process import SERVER_TOKEN_SCOPES, SERVICE, HubProcess, fetch, proxy_command

pytest.importorskip("jupyterhub", reason="pip install 'jupyter-gpu[hub]' (scripts/setup does)")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(proxy_command() is None, reason="configurable-http-proxy (npm) is missing: run scripts/setup"),
]

CACHE_SECONDS = 3
ACCESS = f"access:services!service={SERVICE}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub"), ["--inventory", "a100=2,h100=1", "--min-warm", "1"],
                         CACHE_SECONDS)
    try:
        process.start()
        process.start_servers("alice", "bob")
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def kernels(hub: HubProcess) -> dict[str, str]:
    """A kernel in each user's notebook server, as a notebook there would have, with the magic loaded."""
    started = {user: hub.start_kernel(user) for user in ("alice", "bob")}
    for user, kernel in started.items():
        assert hub.run_cell(user, kernel, "%load_ext jupyter_gpu") == ("", "")
    return started


def operator_token(hub: HubProcess) -> str:
    return hub.token_for("ops", ["admin:users", ACCESS])[0]


def every_lease(hub: HubProcess) -> list[dict[str, Any]]:
    reply = fetch(hub.gateway_url + "/api/gpu/leases?all=1", token=operator_token(hub))
    assert reply.status == 200, reply
    return list(reply.body)


def lease_of(hub: HubProcess, user: str) -> dict[str, Any]:
    (lease,) = [lease for lease in every_lease(hub) if lease["user"] == user]
    return lease


@pytest.fixture(scope="module")
def leases(hub: HubProcess, kernels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each user's %%gpu cell, run once: their lease."""
    for user, kernel in kernels.items():
        out, error = hub.run_cell(user, kernel, f"%%gpu a100\nwho = {user!r}\nprint('on the gateway:', who)")
        assert (out, error) == (f"on the gateway: {user}\n", "")
    return {user: lease_of(hub, user) for user in kernels}


def test_cells_run_on_the_gateway_with_no_token_setup(hub: HubProcess, kernels: dict[str, str],
                                                        leases: dict[str, dict[str, Any]]) -> None:
    for user, kernel in kernels.items():
        # Nothing about the gateway was given to the server: the kernel has only what the Hub gave it.
        out, _ = hub.run_cell(user, kernel, "import os; print(os.environ.get('JUPYTER_GPU_TOKEN'))")
        assert out == "None\n"
        # The variable came back, and the lease is the user's under their Hub name.
        assert hub.run_cell(user, kernel, "print(who)") == (f"{user}\n", "")
        assert leases[user]["state"] == "granted" and leases[user]["gpu_type"] == "a100"


ATTACK = """
from jupyter_gpu.client import GatewayClient, GatewayConfig, GatewayError
gateway = GatewayClient(GatewayConfig.from_env())
for method, path in [("GET", "/api/gpu/leases/{lease}"), ("DELETE", "/api/gpu/leases/{lease}"),
                     ("GET", "/api/gpu/leases?all=1"), ("GET", "/api/gpu/usage?all=1"),
                     ("GET", "/api/kernels/{kernel}"), ("POST", "/api/kernels/{kernel}/interrupt"),
                     ("DELETE", "/api/kernels/{kernel}")]:
    try:
        gateway.request(method, path, {{}} if method == "POST" else None)
        print("ALLOWED", method, path)
    except GatewayError as exc:
        print(exc.status, method, path)
try:
    gateway.open_channel("{kernel}").close()
    print("ALLOWED websocket")
except GatewayError as exc:
    print("refused websocket")
print("mine:", [lease["user"] for lease in gateway.leases()])
"""


def test_a_user_can_neither_see_nor_touch_another_users_lease(hub: HubProcess, kernels: dict[str, str],
                                                                leases: dict[str, dict[str, Any]]) -> None:
    alice = leases["alice"]
    out, error = hub.run_cell("bob", kernels["bob"], ATTACK.format(lease=alice["id"], kernel=alice["kernel_id"]))
    assert error == ""
    assert "ALLOWED" not in out
    lines = out.splitlines()
    assert lines[:7] == [
        f"404 GET /api/gpu/leases/{alice['id']}", f"404 DELETE /api/gpu/leases/{alice['id']}",
        "403 GET /api/gpu/leases?all=1", "403 GET /api/gpu/usage?all=1",
        f"404 GET /api/kernels/{alice['kernel_id']}", f"404 POST /api/kernels/{alice['kernel_id']}/interrupt",
        f"404 DELETE /api/kernels/{alice['kernel_id']}",
    ]
    assert lines[7:] == ["refused websocket", "mine: ['bob']"]
    # alice's lease and the variable in it are untouched.
    assert lease_of(hub, "alice")["id"] == alice["id"]
    assert hub.run_cell("alice", kernels["alice"], "%%gpu a100\nprint(who)") == ("alice\n", "")


def test_the_sidebar_shows_the_logged_in_users_leases(hub: HubProcess, leases: dict[str, dict[str, Any]]) -> None:
    for user in ("alice", "bob"):
        token, _ = hub.token_for(user, [f"access:servers!server={user}/"])  # what a browser's login holds
        reply = hub.server(user, "GET", "/jupyter-gpu/state", token=token)
        assert reply.status == 200, reply
        assert [(lease["id"], lease["user"]) for lease in reply.body["leases"]] == [(leases[user]["id"], user)]


def test_someone_else_in_a_users_server_gets_their_own_leases_from_its_sidebar(
        hub: HubProcess, leases: dict[str, dict[str, Any]]) -> None:
    """bob, let into alice's server, asks its sidebar: the server forwards bob's own token, never alice's."""
    bob_in_alice, _ = hub.token_for("bob", ["access:servers!server=alice/", ACCESS])
    reply = hub.server("alice", "GET", "/jupyter-gpu/state", token=bob_in_alice)
    assert reply.status == 200, reply
    assert [(lease["id"], lease["user"]) for lease in reply.body["leases"]] == [(leases["bob"]["id"], "bob")]
    # with a token that may not use the gateway, he gets a refusal, not alice's view
    without_gpus, _ = hub.token_for("bob", ["access:servers!server=alice/"])
    refused = hub.server("alice", "GET", "/jupyter-gpu/state", token=without_gpus)
    assert refused.status == 502 and ACCESS in refused.body["message"]


def test_a_revoked_token_is_refused_within_the_cache_time(hub: HubProcess, leases: dict[str, dict[str, Any]]) -> None:
    token, token_id = hub.token_for("alice", [ACCESS])
    mine = fetch(hub.gateway_url + "/api/gpu/leases", token=token)
    assert mine.status == 200 and {lease["user"] for lease in mine.body} == {"alice"}
    # a websocket opened on her kernel with the token before it is revoked
    channel = GatewayClient(GatewayConfig(hub.gateway_url, token)).open_channel(leases["alice"]["kernel_id"])
    hub.revoke("alice", token_id)
    revoked = time.monotonic()
    while fetch(hub.gateway_url + "/api/gpu/leases", token=token).status == 200:
        assert time.monotonic() - revoked < CACHE_SECONDS + 2, "a revoked token kept working past the cache time"
        time.sleep(0.2)
    reply = fetch(hub.gateway_url + "/api/gpu/types", token=token)
    assert reply.status == 401 and "not valid" in reply.body["message"]
    # the open socket closes too, within the cache time and one look at it
    with pytest.raises(ConnectionClosed):
        while channel.recv(timeout=1.0) is not None or not channel.closed:
            assert time.monotonic() - revoked < CACHE_SECONDS + IDENTITY_RECHECK_SECONDS + 3, "socket kept open"
    assert "no longer works" in channel.close_reason()


def test_a_token_without_the_services_scope_is_refused(hub: HubProcess) -> None:
    token, _ = hub.token_for("alice", ["access:servers!server=alice/"])
    reply = fetch(hub.gateway_url + "/api/gpu/leases", token=token)
    assert reply.status == 403
    assert ACCESS in reply.body["message"] and "alice" in reply.body["message"]


def test_a_browser_logs_in_through_the_hub(hub: HubProcess, leases: dict[str, dict[str, Any]]) -> None:
    """OAuth: the Hub's login page, then the gateway's oauth_login through the proxy: a cookie the API accepts."""
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = browser.open(f"{hub.url}/hub/login", timeout=30).read().decode()
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page)
    form = urllib.parse.urlencode({"username": "bob", "password": "any", **({"_xsrf": xsrf[1]} if xsrf else {})})
    browser.open(f"{hub.url}/hub/login", data=form.encode(), timeout=30)
    with browser.open(f"{hub.url}/services/{SERVICE}/oauth_login", timeout=30) as response:
        assert response.geturl().endswith(f"/services/{SERVICE}/api/gpu/leases")
        assert [lease["id"] for lease in json.loads(response.read())] == [leases["bob"]["id"]]
    # The login cookie opens no kernel websocket: any page bob visits could make his browser send it
    # there (the socket takes every origin), and run code in his kernel.
    cookies = "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)
    kernel = f"{hub.gateway_url.replace('http', 'ws', 1)}/services/{SERVICE}/api/kernels/{leases['bob']['kernel_id']}"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{kernel}/channels", additional_headers={"Cookie": cookies, "Origin": "http://evil.example"},
                open_timeout=30).close()
    assert refused.value.response.status_code == 401


def test_an_external_service_gateway(hub: HubProcess, tmp_path: Path) -> None:
    """Deployed by the operator (not started by the Hub): --hub, the Hub's API and the service's own token."""
    external = GatewayProcess(tmp_path, ["--hub", "--db", str(tmp_path / "usage.sqlite"), "--inventory", "a100=1",
                                         "--min-warm", "0", "--HubIdentityProvider.api_url=" + hub.api,
                                         "--HubIdentityProvider.api_token=" + hub.external_token,
                                         "--HubIdentityProvider.service_name=gpu-external"]).start(wait_warm=False)
    try:
        only_main, _ = hub.token_for("alice", [ACCESS])
        refused = external.request(None, "GET", "/api/gpu/leases", token=only_main)
        assert refused.status == 403 and "access:services!service=gpu-external" in refused.body["message"]
        granted, _ = hub.token_for("alice", ["access:services!service=gpu-external"])
        usage = external.request(None, "GET", "/api/gpu/usage", token=granted)
        assert usage.status == 200 and usage.body["user"] == "alice"
    finally:
        external.stop()


NOTEBOOK = """
import json, sys
import nbformat
from nbclient import NotebookClient
from jupyter_gpu.batch import PooledKernelManager

nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")])
NotebookClient(nb, kernel_name="gpu-h100", kernel_manager_class=PooledKernelManager, timeout=60).execute()
print(json.dumps(nb.cells[0].outputs))
"""


def test_a_batch_run_in_a_hub_server_needs_no_setup_either(hub: HubProcess, leases: dict[str, dict[str, Any]]) -> None:
    """nbclient on a pooled kernel (jupyter_gpu.batch) with only what the Hub gives a notebook server."""
    server_token, _ = hub.token_for("alice", SERVER_TOKEN_SCOPES)
    env = {key: value for key, value in os.environ.items() if not key.startswith("JUPYTER_GPU")}
    env.update(JUPYTERHUB_API_URL=hub.api, JUPYTERHUB_API_TOKEN=server_token)
    done = subprocess.run([sys.executable, "-c", NOTEBOOK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # the run's lease was alice's, and ended with the run
    reply = fetch(hub.gateway_url + "/api/gpu/leases?all=1&released=1", token=operator_token(hub))
    (batch,) = [row for row in reply.body if row["gpu_type"] == "h100"]
    assert (batch["user"], batch["state"]) == ("alice", "released")
    # it ran on the pooled kernel, pinned to the h100 (index 2 of the declared a100=2,h100=1)
    assert json.loads(done.stdout.splitlines()[-1])[0]["text"] == "2\n"


def test_operators_see_and_release_every_lease(hub: HubProcess, leases: dict[str, dict[str, Any]]) -> None:
    assert {(lease["id"], lease["user"]) for lease in every_lease(hub)} == {
        (leases["alice"]["id"], "alice"), (leases["bob"]["id"], "bob")}
    alice_token, _ = hub.token_for("alice", [ACCESS])
    refused = fetch(hub.gateway_url + "/api/gpu/leases?all=1", token=alice_token)
    assert refused.status == 403 and "not an operator" in refused.body["message"]

    # Usage by user and by group (the Hub's groups), from the operator's command line.
    env = {**os.environ, "JUPYTER_GPU_URL": hub.gateway_url, "JUPYTER_GPU_TOKEN": operator_token(hub)}
    usage = subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", "usage", "--all", "--json"], env=env,
                           capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(usage.stdout)
    assert report["by_user"]["alice"]["groups"] == ["physics"] and report["by_user"]["bob"]["groups"] == ["biology"]
    assert report["by_group"]["physics"]["users"] == ["alice"] and report["by_user"]["alice"]["leases"] >= 1
    table = subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", "usage", "--all"], env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "by group" in table and re.search(r"^physics\s+1\s", table, re.MULTILINE)
    as_alice = {**env, "JUPYTER_GPU_TOKEN": alice_token}
    mine = subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", "usage"], env=as_alice, capture_output=True,
                          text=True, timeout=60, check=True).stdout
    assert mine.startswith("usage of alice\ntype") and "\na100 " in mine

    released = fetch(f"{hub.gateway_url}/api/gpu/leases/{leases['bob']['id']}", "DELETE", token=operator_token(hub))
    assert released.status == 200 and (released.body["state"], released.body["reason"]) == ("released", "operator")
    # an ended lease of someone else's, as the operator reads it back (from the metering file)
    ended = fetch(f"{hub.gateway_url}/api/gpu/leases/{leases['bob']['id']}", token=operator_token(hub))
    assert ended.status == 200 and (ended.body["user"], ended.body["reason"]) == ("bob", "operator"), ended
    assert fetch(f"{hub.gateway_url}/api/gpu/leases/{leases['bob']['id']}", token=alice_token).status == 404
    assert [lease["user"] for lease in every_lease(hub)] == ["alice"]


def test_where_the_hub_does_not_show_the_gateway_the_magic_says_what_to_set_up(
        hub: HubProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_GPU_URL", raising=False)
    monkeypatch.delenv("JUPYTER_GPU_TOKEN", raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_URL", hub.api)
    may_use_not_find, _ = hub.token_for("alice", [ACCESS])
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", may_use_not_find)
    with pytest.raises(GatewayError) as refused:
        GatewayConfig.from_env()
    assert f"list:services!service={SERVICE}" in str(refused.value) and "JUPYTER_GPU_URL" in str(refused.value)

    server_token, _ = hub.token_for("alice", SERVER_TOKEN_SCOPES)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", server_token)
    assert GatewayConfig.from_env() == GatewayConfig(hub.gateway_url, server_token)
    monkeypatch.setenv("JUPYTER_GPU_SERVICE", "gpus")
    with pytest.raises(GatewayError) as missing:
        GatewayConfig.from_env()
    assert "no service 'gpus'" in str(missing.value) and f"(it shows: {SERVICE})" in str(missing.value)
