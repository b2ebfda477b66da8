"""A Ray cluster that takes no token is a way out of every kernel's sandbox: the gateway says so
where isolation is shown, keeps saying it after nodes report their sandboxes, and refuses to start
with ``--sandbox required``."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("ray")

from pool_manager.ray_backend import RayKernelBackend
from pool_manager.ray_nodes import NodeTable
from pool_manager.ray_pool import open_cluster_warnings
from pool_manager.ray_slot import SlotSettings
from pool_manager.sandbox import Isolation

HEAD = "10.0.0.1:6379"


def test_a_cluster_without_token_auth_is_refused_where_a_sandbox_is_required() -> None:
    refused = re.escape(f"--sandbox required, but the Ray cluster at {HEAD} takes no token")
    with pytest.raises(ValueError, match=refused):
        open_cluster_warnings(HEAD, token_auth=False, sandbox_mode="required")
    assert open_cluster_warnings(HEAD, token_auth=True, sandbox_mode="required") == []
    assert open_cluster_warnings(HEAD, token_auth=None, sandbox_mode="auto") == []  # a Ray that cannot tell


def test_its_warning_stays_in_the_isolation_shown_after_the_nodes_report_theirs() -> None:
    (warning,) = open_cluster_warnings(HEAD, token_auth=False, sandbox_mode="auto")
    assert "RAY_AUTH_MODE=token" in warning and "outside its sandbox" in warning
    shown = Isolation()
    backend = RayKernelBackend(NodeTable(), SlotSettings(), isolation=shown, cluster_warnings=[warning])
    assert shown.warnings[0] == warning
    sandboxed = Isolation(mechanism="bubblewrap", uid_separation=True, pid_namespace=True, mount_namespace=True)
    backend._note_isolation("10.0.0.2", sandboxed)  # a slot actor's kernel started there
    assert shown.to_json()["warnings"] == [warning] and shown.mechanism == "bubblewrap"
    assert sandboxed.warnings == []  # what the node found is not changed
