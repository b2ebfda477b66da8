"""Where a kernel can go: the pool's devices, which of them are free, and per node how many
a multi-GPU lease could take.

The devices change: a node joins (:meth:`PlacementIndex.add`), leaves
(:meth:`PlacementIndex.remove`), a device turns unhealthy or healthy again
(:meth:`PlacementIndex.set_health`). Between those rare events every question costs about the
same however many devices there are: free devices per type are kept sorted by inventory
position, and per type a histogram says how many nodes have k usable GPUs, so a request no
node can hold is answered without looking at any node.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from .first_fit import FirstFit
from .model import Device
from .sorted_list import SortedInts

#: (GPU type, node name): a node's devices of one type
NodeKey = tuple[str, str]


@dataclass(frozen=True)
class NodeUse:
    """One node's GPUs of one type: how many are healthy, how many no lease holds (free, or
    held by a spare kernel). ``idle``: nothing of any user runs there."""

    node: str
    healthy: int
    usable: int

    @property
    def idle(self) -> bool:
        return self.usable == self.healthy


class PlacementIndex:
    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.types: list[str] = []
        self._position: dict[str, int] = {}  # key -> place in inventory order (joining order)
        self._key_at: dict[int, str] = {}
        self._free: dict[str, SortedInts] = {}  # type -> positions of healthy, unbound devices
        self._bound: dict[str, str] = {}  # device key -> slot id
        #: slot id -> whether a multi-GPU lease may take its GPUs (no lease, not draining)
        self.preemptible: dict[str, bool] = {}
        self._keys_on: dict[str, list[str]] = {}  # node name -> its device keys
        # Per (type, node): healthy devices in inventory order, and how many a multi-GPU lease
        # could take (unbound, or held by a spare kernel that may be preempted).
        self._node_devices: dict[NodeKey, list[str]] = {}
        self._usable: dict[NodeKey, int] = {}
        self._nodes_of: dict[str, list[NodeKey]] = {}  # by their first device's position
        # per type: each node's usable GPUs, by place in _nodes_of (where to look for room)
        self._room: dict[str, FirstFit] = {}
        self._node_place: dict[NodeKey, int] = {}
        #: per type: how many nodes have exactly k usable GPUs; its length is the largest node + 1
        self.nodes_with: dict[str, list[int]] = {}
        # what summaries() says of each type: healthy GPUs, most memory, emulated
        self.facts: dict[str, tuple[int, int, bool]] = {}
        self._next_position = 0

    # --- membership -----------------------------------------------------------------------

    def add(self, devices: Iterable[Device]) -> bool:
        """Devices joined (a node came up); returns whether a new type appeared."""
        added = list(devices)
        for device in added:
            if device.key in self.devices:
                raise ValueError(f"device {device.key!r} is already in the pool (node {device.node!r})")
        new_type = False
        for device in added:
            position, self._next_position = self._next_position, self._next_position + 1
            self.devices[device.key] = device
            self._position[device.key] = position
            self._key_at[position] = device.key
            self._keys_on.setdefault(device.node, []).append(device.key)
            if device.gpu_type not in self._free:
                new_type = True
                self._free[device.gpu_type] = SortedInts()
                self._nodes_of[device.gpu_type] = []
                self.nodes_with[device.gpu_type] = [0]
            if device.healthy:
                self._free[device.gpu_type].add(position)
                self._node_devices.setdefault((device.gpu_type, device.node), []).append(device.key)
                self._usable[(device.gpu_type, device.node)] = self._usable.get((device.gpu_type, device.node), 0) + 1
        if new_type:
            self.types = sorted(self._free)
        self._reindex({device.gpu_type for device in added})
        return new_type

    def declare(self, gpu_type: str) -> None:
        """A type offered before any device of it is here (an autoscaled cluster launches its
        nodes on demand): leases for it queue rather than being refused."""
        if gpu_type not in self._free:
            self._free[gpu_type] = SortedInts()
            self.facts[gpu_type] = (0, 0, False)
            self.types = sorted(self._free)
            self._reindex({gpu_type})  # no nodes yet: empty room and node counts

    def remove(self, node: str) -> None:
        """The node's devices leave; the caller has released every one of them first."""
        types = set()
        for key in self._keys_on.pop(node, []):
            assert key not in self._bound, f"device {key} removed while bound"
            device = self.devices.pop(key)
            types.add(device.gpu_type)
            position = self._position.pop(key)
            del self._key_at[position]
            if device.healthy:
                self._free[device.gpu_type].discard(position)
        for gpu_type in types:
            self._node_devices.pop((gpu_type, node), None)
            self._usable.pop((gpu_type, node), None)
            self._node_place.pop((gpu_type, node), None)
        self._reindex(types)

    def set_health(self, key: str, healthy: bool) -> Device:
        """Mark a device (un)healthy; an unhealthy one is offered to no new kernel."""
        device = self.devices[key]
        if device.healthy == healthy:
            return device
        node = (device.gpu_type, device.node)
        updated = Device(**{**device.__dict__, "healthy": healthy})
        usable = self.can_take(key)
        if healthy:
            self.devices[key] = updated
            keys = self._node_devices.setdefault(node, [])
            keys.insert(bisect.bisect_left([self._position[k] for k in keys], self._position[key]), key)
            self._usable[node] = self._usable.get(node, 0) + usable
            if key not in self._bound:
                self._free[device.gpu_type].add(self._position[key])
        else:
            self._node_devices[node].remove(key)
            self._usable[node] -= usable
            if key not in self._bound:
                self._free[device.gpu_type].discard(self._position[key])
            if not self._node_devices[node]:
                del self._node_devices[node], self._usable[node], self._node_place[node]
            self.devices[key] = updated
        self._reindex({device.gpu_type})
        return updated

    def _reindex(self, types: Iterable[str]) -> None:
        """Rebuild what is kept per type from the per-node counts (on membership changes only)."""
        for gpu_type in types:
            nodes = [node for node in self._node_devices if node[0] == gpu_type]
            nodes.sort(key=lambda node: self._position[self._node_devices[node][0]])
            self._nodes_of[gpu_type] = nodes
            self._node_place.update((node, place) for place, node in enumerate(nodes))
            self._room[gpu_type] = FirstFit([self._usable[node] for node in nodes])
            histogram = [0] * (max((len(self._node_devices[node]) for node in nodes), default=0) + 1)
            for node in nodes:
                histogram[self._usable[node]] += 1
            self.nodes_with[gpu_type] = histogram
            healthy = [self.devices[key] for node in nodes for key in self._node_devices[node]]
            self.facts[gpu_type] = (
                len(healthy),
                max((d.memory_mb for d in healthy), default=0),
                any(d.emulated for d in healthy),
            )

    # --- questions ------------------------------------------------------------------------

    def free_devices(self, gpu_type: str, limit: int) -> list[Device]:
        """The first ``limit`` healthy, unbound devices of the type, in inventory order."""
        free = self._free.get(gpu_type)
        return [] if free is None else [self.devices[self._key_at[p]] for p in free.first(limit)]

    def largest_node(self, gpu_type: str) -> int:
        histogram = self.nodes_with.get(gpu_type)
        return 0 if histogram is None else len(histogram) - 1

    def holder(self, key: str) -> str | None:
        return self._bound.get(key)

    def can_take(self, key: str) -> bool:
        """What a multi-GPU lease may use: an unbound GPU, or one held by a spare kernel."""
        holder = self._bound.get(key)
        return holder is None or self.preemptible.get(holder, True)

    def best_node(self, gpu_type: str, count: int) -> list[Device] | None:
        """``count`` GPUs on one node, unbound ones first, or None where no node has room.

        The node whose first usable GPU comes first in the inventory, among those with enough
        (nodes are listed by their first GPU, so none after the best so far can beat it).
        """
        if not any(self.nodes_with[gpu_type][count:]):
            return None
        best: NodeKey | None = None
        best_position = -1
        # Nodes before the first with room enough would all be skipped below.
        first = self._room[gpu_type].first_at_least(count)
        nodes = self._nodes_of[gpu_type]
        for place in range(len(nodes) if first is None else first, len(nodes)):
            node = nodes[place]
            keys = self._node_devices[node]
            if best is not None and self._position[keys[0]] > best_position:
                break
            if self._usable[node] < count:
                continue
            position = next(self._position[key] for key in keys if self.can_take(key))
            if best is None or position < best_position:
                best, best_position = node, position
        if best is None:
            return None
        usable = [self.devices[key] for key in self._node_devices[best] if self.can_take(key)]
        # Prefer unbound GPUs; preempt warm kernels only for what is missing.
        usable.sort(key=lambda d: d.key in self._bound)
        return usable[:count]

    def node_use(self, gpu_type: str) -> list[NodeUse]:
        """The type's nodes in the order they joined, with their healthy and usable GPUs."""
        return [
            NodeUse(node, len(self._node_devices[(gpu_type, node)]), self._usable[(gpu_type, node)])
            for _, node in self._nodes_of.get(gpu_type, [])
        ]

    # --- binding devices to slots -----------------------------------------------------------

    def new_slot(self, slot_id: str) -> None:
        self.preemptible[slot_id] = True  # no lease, not draining

    def forget_slot(self, slot_id: str) -> None:
        self.preemptible.pop(slot_id, None)

    def bind(self, key: str, slot_id: str) -> None:
        self._bound[key] = slot_id
        device = self.devices[key]
        if device.healthy:
            self._free[device.gpu_type].discard(self._position[key])
            if not self.preemptible[slot_id]:
                self._add_usable(device, -1)

    def unbind(self, key: str) -> None:
        slot_id = self._bound.pop(key)
        device = self.devices[key]
        if device.healthy:
            self._free[device.gpu_type].add(self._position[key])
            if not self.preemptible.get(slot_id, True):
                self._add_usable(device, 1)

    def set_preemptible(self, slot_id: str, keys: Iterable[str], preemptible: bool) -> None:
        if preemptible == self.preemptible.get(slot_id):
            return
        step = 1 if preemptible else -1
        for key in keys:
            if self._bound.get(key) == slot_id and self.devices[key].healthy:
                self._add_usable(self.devices[key], step)
        self.preemptible[slot_id] = preemptible

    def _add_usable(self, device: Device, step: int) -> None:
        node = (device.gpu_type, device.node)
        histogram = self.nodes_with[device.gpu_type]
        histogram[self._usable[node]] -= 1
        self._usable[node] += step
        histogram[self._usable[node]] += 1
        self._room[device.gpu_type].set(self._node_place[node], self._usable[node])

