"""``/api/gpu/snapshots``: the variables kept for your notebooks between leases.

GET lists them (size, age, expiry); DELETE ``/api/gpu/snapshots/{id}`` forgets one, and
DELETE ``/api/gpu/snapshots?notebook=PATH`` forgets a notebook's. Only ever the caller's own:
another user's snapshot id answers 404, as one that does not exist.
"""

from __future__ import annotations

from jupyter_gpu.protocol import Reason

from .errors import ApiError
from .handlers import ApiHandler
from .snapshots import SnapshotKeeper


class SnapshotsHandler(ApiHandler):
    auth_resource = "snapshots"

    def keeper(self) -> SnapshotKeeper:
        keeper = self.gateway.snapshots
        if keeper is None:
            raise ApiError(404, "this gateway keeps no snapshots (GatewayApp.snapshot_store is 'none')",
                           Reason.SNAPSHOTS_OFF)
        return keeper

    async def get(self) -> None:
        self.reply(await self.keeper().list(self.user))

    async def delete(self, snapshot_id: str | None = None) -> None:
        keeper = self.keeper()
        if snapshot_id is not None:
            if not await keeper.delete(self.user, snapshot_id):
                raise ApiError(404, f"no snapshot {snapshot_id}", Reason.NOT_FOUND)
            self.reply({"deleted": [snapshot_id]})
            return
        notebook = self.get_argument("notebook", None)
        if notebook is None:
            raise ApiError(400, "name a snapshot (/api/gpu/snapshots/ID) or a notebook (?notebook=PATH)",
                           Reason.BAD_REQUEST)
        mine = [item["id"] for item in await keeper.list(self.user) if item["notebook"] == notebook and item["id"]]
        for snapshot_id in mine:
            await keeper.delete(self.user, snapshot_id)
        self.reply({"deleted": mine})
