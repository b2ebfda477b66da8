"""Reading a spot interruption notice from the instance metadata service (a loopback stand-in
serving IMDSv2's documented answers), and the watch that tells the pool once per node."""

from __future__ import annotations

import socket

import pytest

from jupyter_gpu.protocol import Reason
from pool_manager.spot_notice import SpotAction, SpotWatch, read_spot_action
from tests.aws.imds_standin import ImdsStandIn


def test_no_notice_then_a_terminate_notice() -> None:
    with ImdsStandIn() as imds:
        assert read_spot_action(imds.url) is None
        imds.notice = {"action": "terminate", "time": "2026-11-29T10:40:00Z"}
        assert read_spot_action(imds.url) == SpotAction("terminate", "2026-11-29T10:40:00Z")
        assert imds.action_reads == 2  # each asked with a fresh token: a 401 would have raised


def test_an_answer_of_another_shape_or_no_service_raises() -> None:
    with ImdsStandIn() as imds:
        imds.notice = {"action": "terminate"}
        with pytest.raises(ValueError, match="unexpected spot/instance-action answer"):
            read_spot_action(imds.url)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(OSError):
        read_spot_action(f"http://127.0.0.1:{port}", timeout=1)


class Interrupted:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def interrupt_node(self, node: str, reason: str, message: str) -> object:
        self.calls.append((node, reason, message))
        return []


@pytest.mark.asyncio
async def test_the_watch_tells_the_pool_once_per_node_and_keeps_asking_a_node_that_fails() -> None:
    with ImdsStandIn() as imds:
        pool = Interrupted()
        failing_calls = 0

        def failing() -> SpotAction | None:
            nonlocal failing_calls
            failing_calls += 1
            raise OSError("connection refused")

        nodes = {"10.0.0.5": lambda: read_spot_action(imds.url), "10.0.0.6": failing}
        watch = SpotWatch(pool, lambda: dict(nodes))
        await watch.look()
        assert pool.calls == []
        imds.notice = {"action": "stop", "time": "2026-11-29T10:40:00Z"}
        await watch.look()
        await watch.look()
        (call,) = pool.calls
        assert call[:2] == ("10.0.0.5", Reason.SPOT_INTERRUPTED)
        assert "10.0.0.5" in call[2] and "stop at 2026-11-29T10:40:00Z" in call[2] and "spot interruption" in call[2]
        assert imds.action_reads == 2  # an interrupted node is not asked again
        assert failing_calls == 3

        # the interrupted node leaves; a new instance that comes up at its address is watched anew
        probe = nodes.pop("10.0.0.5")
        await watch.look()
        nodes["10.0.0.5"] = probe
        await watch.look()
        assert [node for node, _, _ in pool.calls] == ["10.0.0.5", "10.0.0.5"]
