"""A node's receiving end for bulk bytes, on loopback: what the gateway does, and what an attacker tries.

The end-to-end path (a notebook's push and pull relayed through the gateway to a kernel on a
Ray node) is in tests/ray_cluster/test_ray_pool.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from jupyter_gpu.transfer import new_download_id
from pool_manager.node_bulk import DOWNLOAD, UPLOAD, BulkEndpoint, NodeReceiver, open_node_transfer, read_line
from pool_manager.staging_io import ALLOCATE_BYTES, SPLICE_BYTES, move


def upload(endpoint: BulkEndpoint, data: bytes) -> dict[str, object]:
    node, answer = open_node_transfer(endpoint, UPLOAD, "", len(data))
    assert answer == {"ready": True}, answer
    with node:
        node.sendall(data)
        return json.loads(read_line(node))  # type: ignore[no-any-return]


def test_an_upload_lands_whole_in_the_staging_directory(receiver: NodeReceiver) -> None:
    data = os.urandom(3 * SPLICE_BYTES + 17)
    result = upload(receiver.endpoint, data)
    assert result["nbytes"] == len(data)
    assert (Path(receiver.staging) / str(result["upload"])).read_bytes() == data


def test_a_large_upload_allocated_ahead_holds_exactly_its_bytes(receiver: NodeReceiver) -> None:
    """Past ALLOCATE_BYTES a helper allocates the file ahead of the writes: the file the kernel
    maps must still be exactly the bytes sent, no longer, whatever the helper allocated."""
    data = os.urandom(2 * ALLOCATE_BYTES + 17)
    result = upload(receiver.endpoint, data)
    path = Path(receiver.staging) / str(result["upload"])
    assert path.stat().st_size == len(data)
    assert path.read_bytes() == data


def test_a_download_sends_what_the_kernel_writes_into_its_fifo(receiver: NodeReceiver) -> None:
    data = os.urandom(2 * SPLICE_BYTES + 5)
    download_id = new_download_id()
    fifo = os.path.join(receiver.staging, download_id)
    os.mkfifo(fifo, 0o600)

    def kernel_writes() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=kernel_writes)
    writer.start()
    node, answer = open_node_transfer(receiver.endpoint, DOWNLOAD, download_id, len(data))
    assert answer == {"ready": True}, answer
    received = bytearray()
    with node:
        while chunk := node.recv(1 << 20):
            received += chunk
    writer.join()
    assert bytes(received) == data
    assert not os.path.exists(fifo)  # unlinked once open: a second fetch finds nothing
    _, again = open_node_transfer(receiver.endpoint, DOWNLOAD, download_id, len(data))
    assert again["reason"] == "not_found" and download_id in str(again["message"])


def test_a_pull_that_is_a_link_is_never_served(receiver: NodeReceiver, tmp_path: Path) -> None:
    secret_file = tmp_path / "gateway.sqlite"
    secret_file.write_text("the gateway's database")
    download_id = new_download_id()
    os.symlink(secret_file, os.path.join(receiver.staging, download_id))
    _, answer = open_node_transfer(receiver.endpoint, DOWNLOAD, download_id, 10)
    assert answer["reason"] == "not_found"


@pytest.mark.parametrize("secret", ["", "00" * 32])
def test_a_caller_without_the_kernels_secret_is_refused(receiver: NodeReceiver, secret: str) -> None:
    download_id = new_download_id()
    os.mkfifo(os.path.join(receiver.staging, download_id), 0o600)
    forged = BulkEndpoint(receiver.endpoint.host, receiver.endpoint.port, secret)
    for op, transfer_id in ((UPLOAD, ""), (DOWNLOAD, download_id)):
        _, answer = open_node_transfer(forged, op, transfer_id, 100)
        assert answer["reason"] == "unauthorized", answer
    assert os.listdir(receiver.staging) == [download_id]  # nothing written, the pull still offered


def test_a_recorded_request_cannot_be_replayed(receiver: NodeReceiver) -> None:
    """Someone who saw the gateway's request on the wire cannot send it again: each connection
    has its own challenge, and the secret itself never crosses."""
    endpoint = receiver.endpoint
    with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as first:
        challenge = read_line(first).decode()
        request = {"op": UPLOAD, "id": "", "nbytes": 10, "mac": endpoint.mac(challenge, UPLOAD, "", 10)}
    assert endpoint.secret not in json.dumps(request)
    with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as replay:
        read_line(replay)
        replay.sendall(json.dumps(request).encode() + b"\n")
        assert json.loads(read_line(replay))["reason"] == "unauthorized"
    assert os.listdir(receiver.staging) == []


@pytest.mark.parametrize("declared", [10 * SPLICE_BYTES, 4 * ALLOCATE_BYTES], ids=["small", "allocated-ahead"])
def test_an_upload_cut_short_leaves_no_file(receiver: NodeReceiver, declared: int) -> None:
    node, answer = open_node_transfer(receiver.endpoint, UPLOAD, "", declared)
    assert answer == {"ready": True}
    node.sendall(os.urandom(SPLICE_BYTES))
    node.shutdown(socket.SHUT_WR)
    result = json.loads(read_line(node))
    node.close()
    assert result["reason"] == "upload_failed" and "closed the connection after" in result["message"], result
    assert os.listdir(receiver.staging) == []


def test_move_passes_bytes_from_one_socket_to_another() -> None:
    """The gateway's relay: client socket -> pipe -> node socket, never through Python."""
    data = os.urandom(SPLICE_BYTES * 2 + 3)
    client, gateway_in = socket.socketpair()
    gateway_out, node = socket.socketpair()
    sender = threading.Thread(target=client.sendall, args=(data,))
    sender.start()
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_recv_all(node, len(data))))
    reader.start()
    move(gateway_in, gateway_out.fileno(), len(data), float("inf"))
    sender.join()
    reader.join()
    assert bytes(received) == data
    for sock in (client, gateway_in, gateway_out, node):
        sock.close()


def _recv_all(sock: socket.socket, nbytes: int) -> bytes:
    got = bytearray()
    while len(got) < nbytes:
        got += sock.recv(nbytes - len(got))
    return bytes(got)
