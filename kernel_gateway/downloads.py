"""Large pulled values, straight from the kernel's staging file to the client's socket.

The mirror of :mod:`kernel_gateway.uploads`: the kernel offers each large pulled buffer as a
FIFO in its own staging directory and names it in its ``pulled`` message; the client asks
for it with one HTTP/1.1 Upgrade request per buffer
(``GET /api/kernels/ID/download/DOWNLOAD?nbytes=N`` with ``Upgrade: jupyter-gpu-download``).
The gateway checks the token, that the kernel is the caller's and that the name is a FIFO
the kernel offered, unlinks it, answers ``101`` and splices N raw bytes from the FIFO into
the connection from a worker thread of its
:class:`~kernel_gateway.download_sender.DownloadSender` (the bytes never enter Python), then
closes it. Anything short of N bytes is a failed download. The gateway only moves the
bytes: it never unpickles them.

For a kernel on a Ray node the FIFO is on that node: the gateway asks the node's receiving
end for it (authenticated with the kernel's secret; :mod:`pool_manager.node_bulk`), which
opens it the same way, and once the node is ready the gateway answers ``101`` and splices
what the node sends on to the client.
"""

from __future__ import annotations

from jupyter_gpu.protocol import Reason
from jupyter_gpu.transfer import DOWNLOAD_PROTOCOL
from pool_manager.node_bulk import DOWNLOAD
from pool_manager.staging_io import DownloadUnavailable, close_quietly, open_download

from .errors import ApiError
from .uploads import UpgradedHandler

#: What a client does about a pull it cannot fetch.
_NEXT_STEP = "pull the value again by re-running the cell"


class DownloadHandler(UpgradedHandler):
    auth_resource = "kernels"
    auth_action = "execute"  # what a kernel's cell made, as its websocket carries it
    upgrade_protocol = DOWNLOAD_PROTOCOL

    async def get(self, kernel_id: str, download_id: str) -> None:
        kernel = self.gateway.owned_kernel(self.user, kernel_id).kernel_id or ""
        staging, endpoint = self.gateway.staging_dir(kernel), self.gateway.node_endpoint(kernel)
        if self.request.headers.get("Upgrade", "").lower() != DOWNLOAD_PROTOCOL:
            raise ApiError(400, f"a download is a request with 'Connection: Upgrade' and 'Upgrade: "
                                f"{DOWNLOAD_PROTOCOL}'; the raw bytes follow the gateway's 101", Reason.BAD_REQUEST)
        nbytes_text = self.get_query_argument("nbytes", "")
        if not nbytes_text.isdigit():
            raise ApiError(400, f"nbytes={nbytes_text!r}: say how many bytes the download holds, as a whole number",
                           Reason.BAD_REQUEST)
        nbytes = int(nbytes_text)
        if endpoint is not None:
            await self._relay_via_node(endpoint, DOWNLOAD, download_id, nbytes, _NEXT_STEP,
                                       self.gateway.downloads.relay)
            return
        if staging is None:
            raise ApiError(404, f"kernel {kernel_id} has no staging area to download from", Reason.NOT_FOUND)
        try:
            fd = open_download(staging, download_id)
        except DownloadUnavailable as exc:
            raise ApiError(404, f"{exc}: {_NEXT_STEP}", Reason.NOT_FOUND) from None
        try:
            sock = await self._switch_protocols()
        except BaseException:
            close_quietly(fd)
            raise
        await self.gateway.downloads.send(sock, fd, nbytes)
