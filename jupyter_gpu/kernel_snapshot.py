"""The pooled kernel's side of kept state: save when the gateway asks, restore what it staged.

When a lease ends by idle timeout or release, the gateway runs (as a silent execute of
its own) ``get_ipython()._jupyter_gpu_helper.snapshots.save(NAME)``: the user's variables
go to ``$JUPYTER_GPU_STAGING_DIR/snapshot/NAME``, which the gateway then moves into its
store. When the notebook's next lease is granted, the gateway puts that file into the new
kernel's staging area as ``snapshot/restore``; the kernel loads it when the notebook
opens the helper's comm (before any pushed value, so the notebook's own values win) or at
its first cell, and that cell's output says, in one line, what came back.

Names and paths are relative to the kernel's own staging directory, never the gateway's:
in a sandbox the kernel sees that directory at another path than the gateway does.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from . import snapshot
from .snapshot_format import RESTORE_NAME, SNAPSHOT_SUBDIR

_NAME = re.compile(r"[0-9a-f]{32}")


class KernelSnapshots:
    def __init__(self, shell: Any, staging_dir: str | None) -> None:
        self.shell = shell
        self.folder = os.path.join(staging_dir, SNAPSHOT_SUBDIR) if staging_dir else None
        #: the line the next cell shows about a restore
        self.note: str | None = None

    def register(self) -> None:
        # pre_run_cell does not fire for silent executes: the gateway's own save is not a cell.
        self.shell.events.register("pre_run_cell", self._pre_run_cell)

    def _pre_run_cell(self, info: Any) -> None:
        self.restore_pending()
        if self.note is not None:
            print(self.note, file=sys.stderr)
            self.note = None

    def restore_pending(self) -> None:
        """Load the snapshot the gateway staged for this kernel, if there is one."""
        if self.folder is None:
            return
        path = os.path.join(self.folder, RESTORE_NAME)
        if not os.path.exists(path):
            return
        try:
            self.note = snapshot.describe(snapshot.load(path, self.shell.user_ns))
        except Exception as exc:
            self.note = f"jupyter-gpu: the variables kept at the last release could not be restored: {exc}"
        finally:
            try:
                os.unlink(path)  # its mapping keeps the pages the variables use
            except OSError:
                pass

    def save(self, name: str, max_bytes: int | None = None, leave_free: int | None = None) -> None:
        """Write the user's variables as ``snapshot/NAME`` in this kernel's staging area
        (refused before anything is written if they would take more than ``max_bytes``, or
        leave less than ``leave_free`` bytes free there: a gateway on another machine cannot
        measure this one's room)."""
        if self.folder is None:
            raise RuntimeError("this kernel has no staging directory to write a snapshot to")
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a snapshot name")
        # A lease that ended before its first cell still owes the notebook what it was given.
        self.restore_pending()
        self.note = None
        os.makedirs(self.folder, exist_ok=True)
        if leave_free is not None:
            room = os.statvfs(self.folder)
            here = room.f_bavail * room.f_frsize - leave_free
            max_bytes = here if max_bytes is None else min(max_bytes, here)
        snapshot.save(os.path.join(self.folder, name), self.shell.user_ns, self.shell.user_ns_hidden, max_bytes)
