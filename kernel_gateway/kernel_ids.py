"""Kernel ids that outlive a restart.

A pooled kernel is never reused, so restarting one means a new lease with a new kernel. Stock
Jupyter clients keep the kernel id they started with across a restart (jupyter_server's gateway
client posts ``/restart`` and reconnects to the same id), so the gateway keeps showing the first
id and routes it to whichever kernel currently stands behind it.
"""

from __future__ import annotations


class KernelIds:
    def __init__(self) -> None:
        self._kernel_of: dict[str, str] = {}  # id the client knows -> the kernel behind it now
        self._shown_as: dict[str, str] = {}  # that kernel -> the id the client knows

    def kernel(self, shown_id: str) -> str:
        """The kernel a client's id means now (its own id unless it was restarted)."""
        return self._kernel_of.get(shown_id, shown_id)

    def shown(self, kernel_id: str) -> str:
        """The id clients know this kernel by."""
        return self._shown_as.get(kernel_id, kernel_id)

    def replaced(self, shown_id: str, new_kernel_id: str) -> None:
        """A restart put ``new_kernel_id`` behind ``shown_id``."""
        self._kernel_of[shown_id] = new_kernel_id
        self._shown_as[new_kernel_id] = shown_id

    def forget(self, kernel_id: str) -> None:
        """The kernel's lease ended: its id no longer leads anywhere."""
        shown_id = self._shown_as.pop(kernel_id, None)
        if shown_id is not None and self._kernel_of.get(shown_id) == kernel_id:
            del self._kernel_of[shown_id]
