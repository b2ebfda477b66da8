"""Large pushed buffers, straight from the client's socket into a file the kernel maps.

Over the websocket a gigabyte is framed and masked by the client, read, unmasked and
copied by tornado, sent over ZMQ and copied into place by the kernel: ~430 MB/s here. An
upload is one HTTP/1.1 Upgrade request per buffer (``GET /api/kernels/ID/upload?nbytes=N``
with ``Upgrade: jupyter-gpu-upload``): the gateway checks the token, that the kernel is the
caller's, the size and the free space, answers ``101`` with the upload id, then moves
exactly N raw bytes from the socket into a new file in the kernel's staging directory
with splice(2) (the bytes never enter Python), in a worker thread of the gateway's
:class:`~kernel_gateway.upload_receiver.UploadReceiver`, and writes back one JSON line:
``{"upload": ID, "nbytes": N}`` or ``{"message", "reason"}``. The client then names the
upload in its push message; the kernel maps the file and unlinks it.

For a kernel on a Ray node the staging directory is on that node: after the same checks
the gateway opens a connection to the node's receiving end (its slot actor, authenticated
with the kernel's secret; :mod:`pool_manager.node_bulk`), and only once the node is ready
answers ``101`` and splices the client's bytes on to it, passing the node's JSON line back.

Files a client uploaded but never named (it died in between) go with the kernel's staging
directory when the kernel ends.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

from jupyter_gpu.protocol import Reason
from jupyter_gpu.transfer import UPLOAD_PROTOCOL, new_upload_id
from pool_manager.node_bulk import UPLOAD, BulkEndpoint, open_node_transfer
from pool_manager.staging_io import close_quietly, new_upload_file, unlink_quietly

from .errors import ApiError
from .handlers import ApiHandler

#: A node's refusal, as the client sees it: no room there (the push goes over the websocket) or no
#: such pull; anything else is the gateway's own trouble with the node (502: the websocket carries it).
_NODE_REFUSALS: dict[str, int] = {Reason.NO_SPACE: 507, Reason.NOT_FOUND: 404}


class UpgradedHandler(ApiHandler):
    """A request whose connection leaves HTTP after ``101`` to carry raw bytes (uploads, downloads)."""

    upgrade_protocol = ""

    async def _switch_protocols(self) -> socket.socket:
        """Answer 101 and take the connection's socket away from tornado."""
        self.clear_header("Content-Type")
        self.set_status(101)
        self.set_header("Upgrade", self.upgrade_protocol)
        self.set_header("Connection", "Upgrade")
        self.finish()
        stream = self.detach()
        await stream.write(b"")  # the 101 is on the wire
        if getattr(stream, "_read_buffer_size", 0):
            # The client sent data before the 101: tornado holds part of it; refuse rather
            # than reassemble from a private buffer.
            stream.close()
            raise ConnectionError("the client sent data before the gateway answered 101")
        assert stream.socket is not None
        sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        stream.close()  # closes tornado's descriptor only: the connection lives on in ours
        return sock

    async def _open_node(self, endpoint: BulkEndpoint, op: str, transfer_id: str, nbytes: int,
                         next_step: str) -> socket.socket:
        """A connection to the kernel's node, ready for ``op``; else the ApiError saying why not."""
        where = f"{endpoint.host}:{endpoint.port}"
        try:
            node, answer = await asyncio.to_thread(open_node_transfer, endpoint, op, transfer_id, nbytes)
        except (OSError, ValueError) as exc:
            raise ApiError(502, f"the kernel's node {where} did not take the {op} ({exc}); {next_step}",
                           Reason.BAD_GATEWAY) from None
        if not answer.get("ready"):
            reason = str(answer.get("reason", ""))
            status = _NODE_REFUSALS.get(reason, 502)
            raise ApiError(status, f"the kernel's node {where}: {answer.get('message')}; {next_step}",
                           reason if status != 502 else Reason.BAD_GATEWAY)
        return node

    async def _relay_via_node(self, endpoint: BulkEndpoint, op: str, transfer_id: str, nbytes: int, next_step: str,
                              relay: Callable[[socket.socket, socket.socket, int], Awaitable[None]]) -> None:
        """The node's end first (a refusal is still an HTTP answer), then the 101 and the relay."""
        node = await self._open_node(endpoint, op, transfer_id, nbytes, next_step)
        try:
            sock = await self._switch_protocols()
        except BaseException:
            node.close()
            raise
        await relay(sock, node, nbytes)


class UploadHandler(UpgradedHandler):
    auth_resource = "kernels"
    auth_action = "execute"  # data goes into the kernel
    upgrade_protocol = UPLOAD_PROTOCOL

    async def get(self, kernel_id: str) -> None:
        if self.request.headers.get("Upgrade", "").lower() != UPLOAD_PROTOCOL:
            self.gateway.owned_kernel(self.user, kernel_id)
            raise ApiError(400, f"an upload is a request with 'Connection: Upgrade' and 'Upgrade: {UPLOAD_PROTOCOL}', "
                                "followed by the raw bytes once the gateway answered 101", Reason.BAD_REQUEST)
        nbytes_text, limit = self.get_query_argument("nbytes", ""), self.settings.get("max_upload_bytes", 0)
        target, nbytes = self.gateway.upload_target(self.user, kernel_id, nbytes_text, limit)
        with self.gateway.uploads.admitted(self.user):
            if isinstance(target, BulkEndpoint):
                await self._relay_via_node(target, UPLOAD, "", nbytes, "it goes over the websocket instead",
                                           self.gateway.uploads.relay)
            else:
                await self._receive(target, nbytes)

    async def _receive(self, staging: str, nbytes: int) -> None:
        fd, path = new_upload_file(staging, upload_id := new_upload_id())
        try:
            sock = await self._switch_protocols()
            await self.gateway.uploads.receive(sock, fd, path, nbytes, upload_id)
        except BaseException:
            # Not served (no 101, or no worker any more: the gateway is stopping): nothing
            # else will close these.
            close_quietly(fd)
            unlink_quietly(path)
            raise
