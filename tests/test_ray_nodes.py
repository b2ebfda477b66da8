"""Reading Ray's node table: GPU types, emulated marks, joins and losses (no Ray needed)."""

from __future__ import annotations

from typing import Any

from pool_manager.ray_nodes import (
    EMULATED_RESOURCE,
    NodeTable,
    accelerator_name,
    accelerator_resource,
    devices_of,
    gpu_type_of,
    node_view,
)


def row(node_id: str, address: str, alive: bool = True, **resources: float) -> dict[str, Any]:
    """One entry of ``ray.nodes()`` as Ray 2.60 returns it (the fields we read)."""
    return {"NodeID": node_id, "NodeManagerAddress": address, "Alive": alive, "Resources": resources}


def a100_node(node_id: str = "a" * 56, address: str = "10.0.0.11", **extra: float) -> dict[str, Any]:
    return row(node_id, address, CPU=8, GPU=2, **{"accelerator_type:A100": 1}, **extra)


def test_ray_accelerator_names_become_the_types_users_ask_for() -> None:
    assert gpu_type_of("A100") == "a100"
    assert gpu_type_of("A100-80G") == "a100-80gb"
    assert gpu_type_of("H100") == "h100"
    assert gpu_type_of("A10G") == "a10g"  # a model name ending in G is not a memory size
    assert accelerator_name("a100-80gb") == "A100-80G" and accelerator_name("h100") == "H100"
    assert accelerator_resource("l4") == "accelerator_type:L4"


def test_a_gpu_node_offers_one_device_per_gpu_on_its_address() -> None:
    devices = devices_of(node_view(a100_node()))
    assert [(d.gpu_type, d.index, d.node, d.emulated) for d in devices] == [
        ("a100", 0, "10.0.0.11", False), ("a100", 1, "10.0.0.11", False)]
    assert len({d.key for d in devices}) == 2 and devices[0].memory_mb == 40960


def test_declared_gpus_are_marked_emulated() -> None:
    devices = devices_of(node_view(a100_node(**{EMULATED_RESOURCE: 1})))
    assert all(d.emulated for d in devices)


def test_a_node_without_gpus_offers_nothing_and_one_without_a_type_is_gpu() -> None:
    assert devices_of(node_view(row("h" * 56, "10.0.0.1", CPU=4))) == []
    assert [d.gpu_type for d in devices_of(node_view(row("g" * 56, "10.0.0.2", GPU=1)))] == ["gpu"]


def test_the_table_reports_joins_and_losses_once() -> None:
    table = NodeTable()
    head = row("h" * 56, "10.0.0.1", CPU=4)
    first = table.update([head, a100_node()])
    assert [n.address for n in first.joined] == ["10.0.0.11"] and not first.lost
    assert not table.update([head, a100_node()])  # nothing changed: nothing to say
    h100 = row("b" * 56, "10.0.0.12", GPU=1, **{"accelerator_type:H100": 1})
    assert [n.gpu_type for n in table.update([head, a100_node(), h100]).joined] == ["h100"]
    dead = table.update([head, a100_node(), {**h100, "Alive": False}])
    assert [n.address for n in dead.lost] == ["10.0.0.12"] and not dead.joined
    gone = table.update([head])  # Ray may also drop a dead node from the table altogether
    assert [n.address for n in gone.lost] == ["10.0.0.11"]
    assert table.by_address("10.0.0.11") is None


def test_a_machine_back_at_the_same_address_replaces_the_old_node() -> None:
    table = NodeTable()
    table.update([a100_node("a" * 56)])
    # Restarted faster than its death was noticed: Ray lists the new node id, the old one still alive.
    changes = table.update([a100_node("a" * 56), a100_node("c" * 56)])
    assert [n.node_id[0] for n in changes.joined] == ["c"] and [n.node_id[0] for n in changes.lost] == ["a"]
    replacement = table.by_address("10.0.0.11")
    assert replacement is not None and replacement.node_id[0] == "c"
    assert not table.update([a100_node("a" * 56), a100_node("c" * 56)])  # the old id never comes back
