"""Spot interruption notices: AWS takes a spot instance back with two minutes' notice, given
only to the instance itself, through its instance metadata service (IMDSv2).

A node asks ``PUT /latest/api/token`` for a session token, then
``GET /latest/meta-data/spot/instance-action`` with it: 404 while nothing is coming, else
``{"action": "terminate" | "stop" | "hibernate", "time": "2026-11-29T10:40:00Z"}``. Every
action takes the machine away, so each is an interruption. :class:`SpotWatch` asks every
``interval`` seconds and tells the pool service (``interrupt_node``) once per node: the node's
leases end with reason ``spot_interrupted`` while their kernels still run, so their variables
are kept as on any release, and no new kernel goes there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from jupyter_gpu.protocol import Reason

log = logging.getLogger("pool_manager.spot")

#: AWS's instance metadata service, as every EC2 instance reaches it
IMDS_URL = "http://169.254.169.254"
TOKEN_TTL_SECONDS = 60


@dataclass(frozen=True)
class SpotAction:
    """What the metadata service announced: ``action`` and the time it happens (ISO 8601, UTC)."""

    action: str
    time: str

    def message(self, node: str) -> str:
        return f"AWS takes back the spot instance of node {node} ({self.action} at {self.time}): a spot interruption"


def read_spot_action(base_url: str = IMDS_URL, timeout: float = 2.0) -> SpotAction | None:
    """The pending interruption of this instance, or None. Raises OSError where the metadata
    service does not answer (not on EC2, or IMDS turned off) and ValueError on an answer of
    another shape."""
    base = base_url.rstrip("/")
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
    token_request = urllib.request.Request(f"{base}/latest/api/token", method="PUT", headers=ttl)
    with urllib.request.urlopen(token_request, timeout=timeout) as reply:
        token = reply.read().decode()
    action_request = urllib.request.Request(
        f"{base}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(action_request, timeout=timeout) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # nothing announced
            return None
        raise
    if not isinstance(body, dict) or not isinstance(body.get("action"), str) or not isinstance(body.get("time"), str):
        raise ValueError(f"unexpected spot/instance-action answer from {base}: {body!r}")
    return SpotAction(body["action"], body["time"])


class InterruptibleService(Protocol):
    def interrupt_node(self, node: str, reason: str, message: str) -> object: ...


#: per node, a call that reads its pending interruption (run in a thread: it blocks)
Probes = Callable[[], Mapping[str, Callable[[], SpotAction | None]]]


class SpotWatch:
    """Polls each node's metadata service and hands each node's interruption to the pool once."""

    def __init__(self, service: InterruptibleService, probes: Probes, interval: float = 5.0) -> None:
        self.service = service
        self.probes = probes
        self.interval = interval
        self.interrupted: dict[str, SpotAction] = {}
        self._failing: set[str] = set()  # nodes whose last probe failed (warned once, not every round)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch_forever(self) -> None:
        while True:
            await self.look()
            await asyncio.sleep(self.interval)

    async def look(self) -> None:
        """One round over the nodes not interrupted yet."""
        probes = self.probes()
        for gone in [node for node in self.interrupted if node not in probes]:
            del self.interrupted[gone]  # it left: a new machine may come up at its address
        asking = [node for node in probes if node not in self.interrupted]
        # All at once: a node that does not answer must not hold back the others' notices (AWS
        # gives two minutes; a probe may take its whole timeout).
        answers = await asyncio.gather(*(asyncio.to_thread(probes[node]) for node in asking), return_exceptions=True)
        for node, action in zip(asking, answers, strict=True):
            if isinstance(action, BaseException):
                # no metadata service, an odd answer, or Ray's own errors on the way there
                if node not in self._failing:
                    log.warning("spot notices: cannot read the metadata service of node %s (%s); asking again "
                                "every %.0f s", node, action, self.interval)
                    self._failing.add(node)
                continue
            self._failing.discard(node)
            if action is None:
                continue
            self.interrupted[node] = action
            self.service.interrupt_node(node, Reason.SPOT_INTERRUPTED, action.message(node))
