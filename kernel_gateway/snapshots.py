"""Kept state: a lease's variables saved before its kernel is killed, and staged into the
same notebook's next kernel (any GPU type) before that kernel's first message.

- Save: when a lease ends by idle timeout, GPU idleness, release, maximum duration, a used-up
  budget or a spot interruption notice (not by kernel
  death, not with ``forget``), the pool service waits for ``before_kill`` before it kills
  the kernel. The kernel writes its variables into its own staging area (the gateway asks
  with a silent execute of its own, on a connection of its own); the gateway takes the
  file out of there (never following a link the kernel may have planted) into the store.
- Restore: when the notebook (same user, same notebook path) gets its next lease, the
  gateway knows at once, from its index, which snapshot goes there: the lease's JSON says
  so (``restore``: names, size, where from), and the file is copied into the new kernel's
  staging area before the gateway lets the notebook's websocket through (``ready``). The
  kernel loads it and the first cell's output says what came back. A snapshot moves: once
  staged, it leaves the store.
- A kernel on a Ray node has its staging area there: the file goes out of it and into it
  through the node's receiving end for bulk bytes, with the kernel's secret
  (:mod:`.node_snapshot_relay`), streamed through the gateway's spool directory.

The gateway never unpickles a snapshot: it reads only the JSON header the kernel wrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import time
from collections import OrderedDict
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient

from jupyter_gpu.protocol import (
    REASON_BUDGET,
    REASON_DELETED,
    REASON_GPU_IDLE,
    REASON_IDLE,
    REASON_MAX_DURATION,
    Reason,
)
from jupyter_gpu.snapshot_format import RESTORE_NAME, SNAPSHOT_SUBDIR, read_header, summary
from pool_manager.model import Lease, LeaseSnapshot
from pool_manager.node_bulk import BulkEndpoint
from pool_manager.service import PoolService

from .node_snapshot_relay import send_to_node, take_from_node
from .snapshot_store import SnapshotQuotaExceeded, SnapshotRecord, SnapshotStore

log = logging.getLogger(__name__)

#: Lease endings whose kernel is still there and healthy to ask for its variables.
KEEP_REASONS = frozenset({REASON_IDLE, REASON_GPU_IDLE, REASON_DELETED, REASON_MAX_DURATION, REASON_BUDGET,
                          Reason.SPOT_INTERRUPTED})  # a spot notice comes minutes ahead: the kernel still runs
#: How many ended leases' snapshot outcomes the API can still report.
_REMEMBERED = 4096
SWEEP_INTERVAL = 300.0
#: Free space a snapshot leaves in the staging area (uploads for other kernels land there too).
ROOM_TO_LEAVE = 256 * 2**20


class SnapshotKeeper:
    def __init__(self, store: SnapshotStore, service: PoolService, spool_dir: str, timeout: float = 300.0) -> None:
        self.store = store
        self.service = service
        self.spool_dir = spool_dir  # gateway-private: files taken out of a kernel's reach
        self.timeout = timeout
        #: (user, notebook) -> the kept snapshot, so a grant knows at once what it restores
        self.index: dict[tuple[str, str], SnapshotRecord] = {}
        self._to_save: dict[str, tuple[Lease | LeaseSnapshot, bool]] = {}  # kernel id -> (lease, was busy)
        #: (user, notebook) -> set when the save of its ended lease is over (kept or not)
        self._saving: dict[tuple[str, str], asyncio.Event] = {}
        self._saving_leases: dict[tuple[str, str], Lease | LeaseSnapshot] = {}
        self._forget: set[str] = set()
        self._staging: dict[str, asyncio.Task[None]] = {}  # kernel id -> copy of its restore
        self.outcomes: OrderedDict[str, dict[str, Any]] = OrderedDict()  # lease id -> snapshot state
        self.restores: OrderedDict[str, dict[str, Any]] = OrderedDict()  # lease id -> what it restores
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        service.before_kill = self.before_kill

    async def start(self) -> None:
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        try:
            records = await asyncio.to_thread(self._load_index)
        except Exception:  # an unreachable bucket: the pool still serves, saves will say why they fail
            log.exception("could not read the snapshot store; kept variables are not restored until it answers")
        else:
            log.info("snapshot store: %d kept snapshot(s)", records)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def _load_index(self) -> int:
        self.store.sweep()
        for record in self.store.everyone():
            self.index[(record.user, record.notebook)] = record
        return len(self.index)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*self._tasks, *self._staging.values(), return_exceptions=True)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await asyncio.to_thread(self.store.sweep)
                now = self.store.clock()
                for key, record in list(self.index.items()):
                    if record.expires <= now:
                        del self.index[key]
            except Exception:
                log.exception("snapshot sweep failed")

    # --- what the API shows ---------------------------------------------------------------

    def lease_info(self, lease_id: str) -> dict[str, Any]:
        """``restore`` (what this lease restores) and ``snapshot`` (what its end kept), if any."""
        info: dict[str, Any] = {}
        if lease_id in self.restores:
            info["restore"] = self.restores[lease_id]
        if lease_id in self.outcomes:
            info["snapshot"] = self.outcomes[lease_id]
        return info

    def _remember(self, table: OrderedDict[str, dict[str, Any]], lease_id: str, value: dict[str, Any]) -> None:
        table[lease_id] = value
        table.move_to_end(lease_id)
        while len(table) > _REMEMBERED:
            table.popitem(last=False)

    async def list(self, user: str) -> list[dict[str, Any]]:
        """The user's kept snapshots, and those being saved right now (``state``)."""
        now = self.store.clock()
        kept = [dict(record.public(now), state="kept") for record in await asyncio.to_thread(self.store.list, user)]
        saving: list[dict[str, Any]] = [
            {"id": None, "state": "saving", "notebook": lease.notebook, "gpu_type": lease.gpu_type or "",
             "lease_id": lease.id, "names": [], "unsaved": {}, "nbytes": 0, "age": 0.0, "expires_in": self.store.ttl}
            for (owner, _), lease in self._saving_leases.items() if owner == user]
        return saving + kept

    async def delete(self, user: str, snapshot_id: str) -> bool:
        deleted = await asyncio.to_thread(self.store.delete, user, snapshot_id)
        for key, record in list(self.index.items()):
            if record.id == snapshot_id and record.user == user:
                del self.index[key]
        return deleted

    # --- the end of a lease ---------------------------------------------------------------

    def forget(self, lease: Lease | LeaseSnapshot) -> None:
        """The lease is being released with nothing kept, and the notebook's kept state goes too."""
        self._forget.add(lease.id)

    def lease_ended(self, lease: Lease | LeaseSnapshot, busy: bool) -> None:
        forget = lease.id in self._forget
        self._forget.discard(lease.id)
        if lease.granted_at is None or not lease.notebook or lease.kernel_id is None:
            return
        if forget:
            record = self.index.pop((lease.user, lease.notebook), None)
            if record is not None:
                self._spawn(self.delete(lease.user, record.id))
            self._remember(self.outcomes, lease.id, {"state": "forgotten"})
        elif lease.reason in KEEP_REASONS:
            self._to_save[lease.kernel_id] = (lease, busy)
            self._saving[(lease.user, lease.notebook)] = asyncio.Event()
            self._saving_leases[(lease.user, lease.notebook)] = lease
            self._remember(self.outcomes, lease.id, {"state": "saving"})

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def before_kill(self, kernel_id: str) -> None:
        """Called by the pool service before it kills a kernel: save the lease's variables."""
        staging = self._staging.pop(kernel_id, None)
        if staging is not None:
            await asyncio.gather(staging, return_exceptions=True)
        entry = self._to_save.pop(kernel_id, None)
        if entry is None:
            return
        lease, busy = entry
        began = time.monotonic()
        try:
            outcome = await asyncio.wait_for(self._save(kernel_id, lease, busy), self.timeout)
        except TimeoutError:
            outcome = {"state": "failed", "message": f"the kernel did not write its variables within "
                       f"{self.timeout:.0f} s (GatewayApp.snapshot_timeout)"}
        except Exception as exc:
            log.warning("snapshot of lease %s failed", lease.id, exc_info=True)
            outcome = {"state": "failed", "message": f"{type(exc).__name__}: {exc}"}
        outcome["seconds"] = round(time.monotonic() - began, 3)
        log.info("snapshot of lease %s (%s): %s", lease.id, lease.user, outcome["state"])
        self._remember(self.outcomes, lease.id, outcome)
        key = (lease.user, lease.notebook)
        if self._saving_leases.get(key) is lease:
            del self._saving_leases[key]
            self._saving.pop(key).set()

    async def _save(self, kernel_id: str, lease: Lease | LeaseSnapshot, busy: bool) -> dict[str, Any]:
        staging: str | BulkEndpoint | None = self.service.backend.staging_dir(kernel_id)
        if staging is None:
            staging = self.service.backend.bulk_endpoint(kernel_id)  # on a Ray node
        info = self.service.kernels.get(kernel_id)
        if staging is None or info is None:
            return {"state": "failed", "message": "this pool's kernels have no staging area to save into"}
        if busy:  # a cell still runs (an explicit release, a maximum duration): stop it first
            await self.service.interrupt(kernel_id)
        name = secrets.token_hex(16)
        # The staging area is often /dev/shm, that is memory: what does not fit is refused
        # by the kernel before it writes a byte, and the release says so.
        # On a node, the room there is the kernel's to measure; the gateway's spool must take it too.
        room = os.statvfs(self.spool_dir if isinstance(staging, BulkEndpoint) else staging)
        max_bytes = room.f_bavail * room.f_frsize - ROOM_TO_LEAVE
        leave = f", leave_free={ROOM_TO_LEAVE}" if isinstance(staging, BulkEndpoint) else ""
        code = f"get_ipython()._jupyter_gpu_helper.snapshots.save({name!r}, {max_bytes}{leave})"
        where = f" on node {staging.host} (or the node)" if isinstance(staging, BulkEndpoint) else ""
        await _execute(info.connection_info, code, lambda: kernel_id in self.service.kernels, where)
        if isinstance(staging, BulkEndpoint):
            path = await asyncio.to_thread(take_from_node, staging, name, self.spool_dir,
                                           room.f_bavail * room.f_frsize)
        else:
            path = await asyncio.to_thread(take_file, os.path.join(staging, SNAPSHOT_SUBDIR, name), self.spool_dir)
        try:
            header, _ = read_header(path)
            kept = summary(header)
            if not kept["names"]:
                return {"state": "nothing", "unsaved": kept["unsaved"]}
            record = await asyncio.to_thread(self.store.put, lease.user, lease.notebook, path, kept,
                                             lease.gpu_type or "", lease.id)
        except SnapshotQuotaExceeded as exc:
            return {"state": "failed", "message": str(exc)}
        finally:
            if os.path.exists(path):
                os.unlink(path)
        self.index[(lease.user, lease.notebook)] = record
        return {"state": "kept", "id": record.id, "names": record.names, "unsaved": record.unsaved,
                "nbytes": record.nbytes}

    # --- the next lease -------------------------------------------------------------------

    def lease_granted(self, lease: Lease | LeaseSnapshot) -> None:
        """Stage the notebook's kept variables into the new kernel (``ready`` waits for it).

        Its own JSON says what it restores as soon as that is known: at once when the
        snapshot is in the store, else once the save of the notebook's previous lease ends.
        """
        if not lease.notebook or lease.kernel_id is None:
            return
        key = (lease.user, lease.notebook)
        saving = self._saving.get(key)
        if saving is None and key not in self.index:
            return
        staging: str | BulkEndpoint | None = self.service.backend.staging_dir(lease.kernel_id)
        if staging is None:
            staging = self.service.backend.bulk_endpoint(lease.kernel_id)  # on a Ray node
        if staging is None:
            return  # kept for a lease that can take it
        record = self._claim(lease) if saving is None else None
        task = asyncio.get_running_loop().create_task(self._stage(lease, record, staging, saving))
        self._staging[lease.kernel_id] = task

    def _claim(self, lease: Lease | LeaseSnapshot) -> SnapshotRecord | None:
        record = self.index.pop((lease.user, lease.notebook), None)
        if record is None or record.expires <= self.store.clock():
            return None
        self._remember(self.restores, lease.id, {
            "snapshot": record.id, "from_lease": record.lease_id, "from_gpu_type": record.gpu_type,
            "names": record.names, "unsaved": record.unsaved, "nbytes": record.nbytes, "created": record.created})
        return record

    async def _stage(self, lease: Lease | LeaseSnapshot, record: SnapshotRecord | None,
                     staging: str | BulkEndpoint, saving: asyncio.Event | None) -> None:
        if saving is not None:  # the previous lease's kernel is writing it right now
            try:
                await asyncio.wait_for(saving.wait(), self.timeout + 30)
            except TimeoutError:
                return
            record = self._claim(lease)
        if record is None:
            return
        if isinstance(staging, BulkEndpoint):
            await self._stage_on_node(lease, record, staging)
            return
        folder = os.path.join(staging, SNAPSHOT_SUBDIR)
        partial = os.path.join(folder, secrets.token_hex(16))  # a name nobody could have planted
        try:
            os.makedirs(folder, exist_ok=True)
            await asyncio.to_thread(self.store.fetch, lease.user, record.id, partial)
            os.replace(partial, os.path.join(folder, RESTORE_NAME))
            await asyncio.to_thread(self.store.delete, lease.user, record.id)
        except Exception as exc:
            log.warning("could not stage snapshot %s for lease %s", record.id, lease.id, exc_info=True)
            self.restores[lease.id] = {**self.restores.get(lease.id, {}), "error": f"{type(exc).__name__}: {exc}"}
            self.index.setdefault((lease.user, lease.notebook), record)  # still in the store: next time
            if os.path.exists(partial):
                os.unlink(partial)

    async def _stage_on_node(self, lease: Lease | LeaseSnapshot, record: SnapshotRecord, node: BulkEndpoint) -> None:
        """The same for a kernel on a Ray node: from the store through the spool to its node."""
        spooled = os.path.join(self.spool_dir, secrets.token_hex(16))
        try:
            await asyncio.to_thread(self.store.fetch, lease.user, record.id, spooled)
            await asyncio.to_thread(send_to_node, node, spooled)
            await asyncio.to_thread(self.store.delete, lease.user, record.id)
        except Exception as exc:
            log.warning("could not stage snapshot %s for lease %s on its node", record.id, lease.id, exc_info=True)
            self.restores[lease.id] = {**self.restores.get(lease.id, {}), "error": f"{type(exc).__name__}: {exc}"}
            self.index.setdefault((lease.user, lease.notebook), record)  # still in the store: next time
        finally:
            if os.path.exists(spooled):
                os.unlink(spooled)

    async def ready(self, kernel_id: str) -> None:
        """Return once the kernel's restore (if any) is in its staging area."""
        task = self._staging.get(kernel_id)
        if task is not None:
            await asyncio.shield(task)


def take_file(path: str, spool_dir: str) -> str:
    """Move a file a kernel wrote out of its reach into ``spool_dir``; returns the new path.

    The kernel is a stranger's code: what it left under that name may be a link to one of
    the gateway's own files, which must never end up in a store that a later lease reads
    from, and the folder holding it (the kernel's own) may itself have been swapped for a
    link to somewhere else. The folder is opened without following a link and the file
    moved from that descriptor; only a plain file with no other name is taken.
    """
    folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _take_from(folder, os.path.basename(path), path, spool_dir)
    finally:
        os.close(folder)


def _take_from(folder: int, name: str, path: str, spool_dir: str) -> str:
    spooled = os.path.join(spool_dir, name)
    try:
        os.rename(name, spooled, src_dir_fd=folder)  # the same file system: the entry moves, whatever it is
    except OSError:
        # Another file system: copy from a descriptor opened without following links.
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        try:
            _check_plain(os.fstat(source), path)
            target = os.open(spooled, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy(source, target)
            finally:
                os.close(target)
        finally:
            os.close(source)
            os.unlink(name, dir_fd=folder)
        return spooled
    try:
        _check_plain(os.lstat(spooled), path)
    except ValueError:
        os.unlink(spooled)
        raise
    return spooled


def _check_plain(info: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        raise ValueError(f"{path} is not a plain file the kernel wrote (a link?): not kept")


def _copy(source: int, target: int) -> None:
    offset = 0
    while True:
        sent = os.sendfile(target, source, offset, 64 * 2**20)
        if sent == 0:
            return
        offset += sent


async def _execute(connection_info: dict[str, Any], code: str, alive: Any, where: str = "") -> None:
    """Run ``code`` silently in the kernel and wait for its reply; raise if it failed."""
    client = AsyncKernelClient()
    client.load_connection_info(connection_info)  # type: ignore[arg-type]
    client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
    try:
        for _ in range(3):
            content = await _reply(client, client.execute(code, silent=True, store_history=False,
                                                          allow_stdin=False, stop_on_error=False), alive, where)
            # A cell interrupted for the release fails, and the kernel then aborts what was
            # queued behind it (our request among them): ask again.
            if content.get("status") != "aborted":
                break
        if content.get("status") != "ok":
            raise RuntimeError(f"the kernel could not save its variables: {content.get('status')}: "
                               f"{content.get('ename')}: {content.get('evalue')}")
    finally:
        client.stop_channels()


async def _reply(client: AsyncKernelClient, msg_id: str, alive: Any, where: str) -> dict[str, Any]:
    while True:
        try:
            reply = await client.get_shell_msg(timeout=1.0)
        except Exception:  # queue.Empty: nothing yet
            if not alive():
                raise RuntimeError(f"the kernel{where} died before it saved its variables") from None
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return dict(reply["content"])
