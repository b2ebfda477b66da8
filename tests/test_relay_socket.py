"""KernelSocket: the relay's ZMQ socket read and written straight from the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import zmq

from kernel_gateway.relay import KernelSocket

Pair = tuple[zmq.Socket[bytes], zmq.Socket[bytes], list[list[bytes]]]
pytestmark = pytest.mark.asyncio


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A ROUTER playing the kernel, and a DEALER behind a KernelSocket playing the relay."""
    context = zmq.Context()
    kernel = context.socket(zmq.ROUTER)
    port = kernel.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    received: list[list[bytes]] = []
    yield kernel, dealer, received
    kernel.close(linger=0)
    dealer.close(linger=0)
    context.term()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def test_every_reply_is_read_even_when_it_arrives_while_sending(pair: Pair) -> None:
    kernel, dealer, received = pair
    socket = KernelSocket(dealer, lambda frames: received.append([f.bytes for f in frames]),
                          asyncio.get_running_loop())
    for i in range(500):
        socket.send([b"request", str(i).encode()])
        if i % 7 == 0:  # replies land between and during sends, as a kernel's do
            while kernel.poll(0):
                identity, *frames = kernel.recv_multipart()
                kernel.send_multipart([identity, b"reply", frames[1]])
        await asyncio.sleep(0)
    while len(received) < 500:
        while kernel.poll(10):
            identity, *frames = kernel.recv_multipart()
            kernel.send_multipart([identity, b"reply", frames[1]])
        await asyncio.sleep(0.001)
    assert [frames[1] for frames in received] == [str(i).encode() for i in range(500)]
    socket.close()


async def test_sends_the_kernel_has_no_room_for_wait_in_order(pair: Pair) -> None:
    kernel, dealer, received = pair
    dealer.sndhwm = 1
    kernel.rcvhwm = 1
    socket = KernelSocket(dealer, lambda frames: received.append([f.bytes for f in frames]),
                          asyncio.get_running_loop())
    payload = b"x" * 1_000_000
    for i in range(50):
        socket.send([str(i).encode(), payload])
    assert socket.backlog  # the high-water mark held some back instead of blocking the loop
    seen: list[bytes] = []
    while len(seen) < 50:
        await asyncio.sleep(0.001)
        while kernel.poll(0):
            seen.append(kernel.recv_multipart()[1])
    assert seen == [str(i).encode() for i in range(50)]
    assert not socket.backlog
    socket.close()


async def test_a_flood_is_read_in_batches_that_let_the_loop_run(pair: Pair) -> None:
    kernel, dealer, received = pair
    socket = KernelSocket(dealer, lambda frames: received.append([f.bytes for f in frames]),
                          asyncio.get_running_loop())
    socket.send([b"hello"])
    await until(lambda: bool(kernel.poll(0)))
    identity = kernel.recv_multipart()[0]
    for i in range(5 * KernelSocket.BATCH):
        kernel.send_multipart([identity, str(i).encode()])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(ticker())
    await until(lambda: len(received) == 5 * KernelSocket.BATCH)
    task.cancel()
    assert [frames[0] for frames in received] == [str(i).encode() for i in range(5 * KernelSocket.BATCH)]
    assert ticks >= 4
    socket.close()
