"""Kept state through a node's receiving end, on loopback: the gateway takes the snapshot a kernel
wrote on its node and stages a restore there; what a hostile kernel plants is never taken.

End to end (a notebook's variables from a lease on one Ray node to the next lease on another)
is in tests/ray_cluster/test_ray_pool.py.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from jupyter_gpu.snapshot_format import RESTORE_NAME, SNAPSHOT_SUBDIR
from kernel_gateway.node_snapshot_relay import NodeSnapshotError, send_to_node, take_from_node
from pool_manager.node_bulk import BulkEndpoint, NodeReceiver
from pool_manager.staging_io import SPLICE_BYTES


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir(mode=0o700)
    return folder


def kernel_wrote(receiver: NodeReceiver, data: bytes) -> tuple[str, Path]:
    """A snapshot file as the kernel writes it on its node: (its name, its path)."""
    name = secrets.token_hex(16)
    folder = Path(receiver.staging) / SNAPSHOT_SUBDIR
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return name, folder / name


def test_the_gateway_takes_the_snapshot_whole_and_nothing_stays_on_the_node(receiver: NodeReceiver,
                                                                            spool: Path) -> None:
    data = os.urandom(3 * SPLICE_BYTES + 11)
    name, on_node = kernel_wrote(receiver, data)
    taken = take_from_node(receiver.endpoint, name, str(spool), 10 * len(data))
    assert Path(taken).read_bytes() == data and Path(taken).parent == spool
    assert not on_node.exists()


def test_a_snapshot_larger_than_the_gateway_takes_is_refused_naming_both_sizes(receiver: NodeReceiver,
                                                                                spool: Path) -> None:
    name, on_node = kernel_wrote(receiver, b"x" * 5000)
    with pytest.raises(NodeSnapshotError, match="5,000 bytes, more than the 4,096"):
        take_from_node(receiver.endpoint, name, str(spool), 4096)
    assert not on_node.exists() and list(spool.iterdir()) == []


def test_a_link_planted_as_the_snapshot_is_never_taken(receiver: NodeReceiver, spool: Path, tmp_path: Path) -> None:
    private = tmp_path / "node-private"
    private.write_text("the node's own secret")
    name = secrets.token_hex(16)
    folder = Path(receiver.staging) / SNAPSHOT_SUBDIR
    folder.mkdir()
    os.symlink(private, folder / name)
    with pytest.raises(NodeSnapshotError, match="not a plain file"):
        take_from_node(receiver.endpoint, name, str(spool), 2**20)
    os.link(private, folder / name)  # a second name of a file outside: not the kernel's own file
    with pytest.raises(NodeSnapshotError, match="not a plain file"):
        take_from_node(receiver.endpoint, name, str(spool), 2**20)
    assert list(spool.iterdir()) == [] and private.read_text() == "the node's own secret"


def test_a_snapshot_folder_that_is_a_link_is_never_followed(receiver: NodeReceiver, spool: Path,
                                                            tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = secrets.token_hex(16)
    (elsewhere / name).write_text("not the kernel's")
    os.symlink(elsewhere, Path(receiver.staging) / SNAPSHOT_SUBDIR)
    with pytest.raises(NodeSnapshotError, match="no snapshot folder"):
        take_from_node(receiver.endpoint, name, str(spool), 2**20)
    assert (elsewhere / name).exists() and list(spool.iterdir()) == []


def test_only_a_snapshot_name_is_taken(receiver: NodeReceiver, spool: Path) -> None:
    with pytest.raises(NodeSnapshotError, match="not a snapshot name"):
        take_from_node(receiver.endpoint, "../../etc", str(spool), 2**20)


def test_a_restore_lands_whole_as_the_kernels_restore_file(receiver: NodeReceiver, tmp_path: Path) -> None:
    data = os.urandom(2 * SPLICE_BYTES + 3)
    kept = tmp_path / "kept"
    kept.write_bytes(data)
    send_to_node(receiver.endpoint, str(kept))
    folder = Path(receiver.staging) / SNAPSHOT_SUBDIR
    assert (folder / RESTORE_NAME).read_bytes() == data
    assert [entry.name for entry in folder.iterdir()] == [RESTORE_NAME]  # no partial file left


def test_without_the_kernels_secret_nothing_is_taken(receiver: NodeReceiver, spool: Path) -> None:
    name, on_node = kernel_wrote(receiver, b"variables")
    stranger = BulkEndpoint(receiver.endpoint.host, receiver.endpoint.port, secrets.token_hex(32))
    with pytest.raises(NodeSnapshotError, match="not authorized"):
        take_from_node(stranger, name, str(spool), 2**20)
    assert on_node.read_bytes() == b"variables"
