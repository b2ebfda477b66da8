"""The sidebar's server extension, in a real jupyter_server (pytest-jupyter) against a real gateway."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.conftest import make_gateway
from e2e.gateway_process import GatewayProcess
from tornado.httpclient import HTTPClientError, HTTPResponse

from jupyter_gpu.defaults import read_default_type
from jupyter_gpu.protocol import TOKEN_ENV, URL_ENV

pytest_plugins = ("pytest_jupyter.jupyter_server",)

pytestmark = pytest.mark.e2e

Fetch = Callable[..., Awaitable[HTTPResponse]]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "config").mkdir()
    # a budget the tests never reach (3 GPUs is the whole pool), for the panel to show
    (tmp / "config" / "jupyter_gpu_config.py").write_text('c.Budgets.default = {"gpus": 3}\n')
    process = make_gateway(tmp, "--inventory", "a100=2,h100=1", "--min-warm", "1")
    yield process.start()
    process.stop()


@pytest.fixture(autouse=True)
def release_all(gateway: GatewayProcess) -> Iterator[None]:
    yield
    for user in gateway.tokens:
        for lease in gateway.get(user, "/api/gpu/leases").body:
            gateway.delete(user, f"/api/gpu/leases/{lease['id']}")
    gateway.wait_warm()


@pytest.fixture
def jp_server_config(request: pytest.FixtureRequest, gateway: GatewayProcess,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The server as JupyterLab runs it: the extension on, alice's token; ``@pytest.mark.gpu(...)`` overrides."""
    # Set (not unset) so that whatever the extension exports for its kernels is undone after the test.
    monkeypatch.setenv(URL_ENV, "")
    monkeypatch.setenv(TOKEN_ENV, "")
    marker = request.node.get_closest_marker("gpu")
    config = {"gateway_url": gateway.url, "gateway_token": gateway.tokens["alice"], **(marker.kwargs if marker else {})}
    return {"ServerApp": {"jpserver_extensions": {"jupyter_gpu": True}}, "JupyterGpu": config}


async def fetch_json(jp_fetch: Fetch, *parts: str, **kwargs: Any) -> tuple[int, Any]:
    try:
        response = await jp_fetch("jupyter-gpu", *parts, **kwargs)
    except HTTPClientError as exc:
        assert exc.response is not None
        response = exc.response
    return response.code, json.loads(response.body) if response.body else None


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_state_lists_the_types_and_only_my_leases_named_as_jupyterlab_names_them(
    jp_fetch: Fetch, gateway: GatewayProcess, jp_root_dir: Path
) -> None:
    # The magic tags a lease with JPY_SESSION_NAME: the notebook's absolute path on the server.
    mine = gateway.lease("alice", "a100", notebook=str(jp_root_dir / "work" / "train.ipynb"))
    elsewhere = gateway.lease("alice", "h100", notebook="/somewhere/else.ipynb")
    gateway.lease("bob", "a100", notebook=str(jp_root_dir / "bob.ipynb"))

    status, state = await fetch_json(jp_fetch, "state")

    assert status == 200
    assert state["gateway"] == gateway.url
    types = {t["name"]: t for t in state["types"]}
    assert set(types) == {"a100", "h100", "cpu"}
    assert types["a100"]["total"] == 2 and types["a100"]["free"] == 0 and types["a100"]["emulated"] is True
    assert {"warm", "queued", "price_per_gpu_hour", "memory_mb"} <= set(types["h100"])
    leases = {lease["id"]: lease for lease in state["leases"]}
    assert set(leases) == {mine["id"], elsewhere["id"]}  # bob's lease is not mine to see
    assert leases[mine["id"]]["notebook_path"] == "work/train.ipynb"
    assert leases[elsewhere["id"]]["notebook_path"] == "/somewhere/else.ipynb"
    lease = leases[mine["id"]]
    assert lease["gpu_type"] == "a100" and lease["gpu_indices"] and lease["state"] == "granted"
    assert lease["gpu_status"] is None  # emulated: nothing to read, the panel shows n/a
    assert {"granted_at", "idle_remaining", "gpu_seconds", "cost"} <= set(lease)
    # what is left of my budgets: alice holds 2 of her 3 GPUs
    assert [(b["scope"], b["name"], b["budget"], b["used"], b["left"]) for b in state["budgets"]] == [
        ("user", "alice", "gpus", 2, 1)]


async def test_the_gateway_token_never_reaches_the_browser(jp_fetch: Fetch, gateway: GatewayProcess) -> None:
    gateway.lease("alice", "a100")
    response = await jp_fetch("jupyter-gpu", "state")
    assert gateway.tokens["alice"] not in response.body.decode()
    assert gateway.tokens["alice"] not in str(response.headers)


async def test_release_ends_the_lease_and_frees_the_gpu(jp_fetch: Fetch, gateway: GatewayProcess) -> None:
    lease = gateway.lease("alice", "h100")

    status, released = await fetch_json(jp_fetch, "leases", lease["id"], method="DELETE")

    assert status == 200
    assert released["state"] == "released" and released["reason"] == "deleted"
    _, state = await fetch_json(jp_fetch, "state")
    assert state["leases"] == []
    # the GPU is free again once its single-use kernel is gone
    deadline = time.monotonic() + 30
    while {t["name"]: t["free"] for t in state["types"]}["h100"] != 1:
        assert time.monotonic() < deadline, state["types"]
        await asyncio.sleep(0.1)
        _, state = await fetch_json(jp_fetch, "state")


async def test_gateway_errors_come_back_as_message_and_reason(jp_fetch: Fetch, gateway: GatewayProcess) -> None:
    bobs = gateway.lease("bob", "a100")

    status, body = await fetch_json(jp_fetch, "leases", bobs["id"], method="DELETE")

    assert (status, body["reason"]) == (404, "not_found")  # another user's lease does not exist for alice
    assert body["message"] == f"no lease {bobs['id']}"
    assert gateway.get("bob", f"/api/gpu/leases/{bobs['id']}").body["state"] == "granted"


@pytest.mark.gpu(gateway_url=f"http://127.0.0.1:{closed_port()}")
async def test_an_unreachable_gateway_is_named_in_words(jp_fetch: Fetch, jp_serverapp: Any) -> None:
    url = jp_serverapp.web_app.settings["jupyter_gpu"].url

    status, body = await fetch_json(jp_fetch, "state")

    assert status == 502 and body["reason"] == "gateway_unreachable"
    assert body["message"].startswith(f"gateway at {url} does not answer")
    assert "traceback" not in body


@pytest.mark.gpu(gateway_token="not-a-token")
async def test_a_wrong_token_blames_the_server_configuration_not_the_browser(jp_fetch: Fetch) -> None:
    status, body = await fetch_json(jp_fetch, "state")

    assert status == 502  # a 401 would read as "your JupyterLab login expired"
    assert body["reason"] == "unauthorized"
    assert "refused this server's token" in body["message"] and "not-a-token" not in body["message"]


@pytest.mark.gpu(gateway_url="")
async def test_no_gateway_configured_says_what_to_set(jp_fetch: Fetch) -> None:
    status, body = await fetch_json(jp_fetch, "state")

    assert (status, body["reason"]) == (503, "not_configured")
    assert URL_ENV in body["message"] and TOKEN_ENV in body["message"]


async def test_default_type_is_written_where_the_magic_reads_it(jp_fetch: Fetch) -> None:
    assert read_default_type() == "any"

    status, body = await fetch_json(jp_fetch, "default-type", method="PUT", body=json.dumps({"gpu_type": "h100|a100"}))

    assert (status, body) == (200, {"gpu_type": "h100|a100"})
    assert read_default_type() == "h100|a100"
    assert await fetch_json(jp_fetch, "default-type") == (200, {"gpu_type": "h100|a100"})


@pytest.mark.parametrize("body", [{"gpu_type": "a100;rm -rf"}, {"gpu_type": 3}, {}, "a100"])
async def test_a_bad_default_type_is_refused(jp_fetch: Fetch, body: Any) -> None:
    status, reply = await fetch_json(jp_fetch, "default-type", method="PUT", body=json.dumps(body))

    assert (status, reply["reason"]) == (400, "bad_spec")
    assert read_default_type() == "any"


async def test_the_api_needs_a_jupyter_login(jp_fetch: Fetch, gateway: GatewayProcess) -> None:
    with pytest.raises(HTTPClientError) as caught:
        await jp_fetch("jupyter-gpu", "state", headers={"Authorization": ""})
    assert caught.value.code == 403


async def test_kernels_started_by_the_server_find_the_same_gateway(jp_fetch: Fetch, gateway: GatewayProcess) -> None:
    # Configured by traitlets only: the %%gpu magic in this server's kernels reads the environment.
    await jp_fetch("jupyter-gpu", "state")
    assert os.environ[URL_ENV] == gateway.url
    assert os.environ[TOKEN_ENV] == gateway.tokens["alice"]


def test_importing_the_package_stays_light() -> None:
    # jupyter_server imports jupyter_gpu to find the extension; the gateway imports it too.
    code = (
        "import sys, jupyter_gpu; "
        "assert jupyter_gpu._jupyter_server_extension_points() == [{'module': 'jupyter_gpu.server_extension'}]; "
        "import jupyter_gpu.server_extension; "
        "assert 'IPython' not in sys.modules, 'IPython imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
