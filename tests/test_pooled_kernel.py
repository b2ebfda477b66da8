"""The pooled kernels' stdout/stderr: a flush with nothing pending is free, output is never held back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from ipykernel.iostream import IOPubThread
from jupyter_client.session import Session

from jupyter_gpu.pooled_kernel import PooledOutStream


@pytest.fixture
def iopub() -> Iterator[tuple[IOPubThread, zmq.Socket[bytes], Session]]:
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    session = Session(key=b"")
    thread = IOPubThread(pub, session=session)
    thread.start()
    # a PUB drops what it sends before the SUB's subscription lands
    while not sub.poll(10):
        thread.send_multipart([b"ping"])
    while sub.poll(100):
        sub.recv_multipart()
    yield thread, sub, session
    thread.stop()
    thread.close()
    sub.close(linger=0)
    context.term()


def received_text(sub: zmq.Socket[bytes], session: Session) -> str:
    texts = []
    while sub.poll(200):
        _, frames = session.feed_identities(sub.recv_multipart())
        texts.append(session.deserialize(frames)["content"]["text"])
    return "".join(texts)


def count_schedules(thread: IOPubThread) -> list[Any]:
    scheduled: list[Any] = []
    original = thread.schedule

    def schedule(f: Any) -> None:
        scheduled.append(f)
        original(f)

    thread.schedule = schedule  # type: ignore[method-assign]
    return scheduled


def test_flush_with_nothing_written_does_not_wait_on_the_iopub_thread(iopub: Any) -> None:
    thread, sub, session = iopub
    stream = PooledOutStream(session, thread, "stdout", watchfd=False)
    scheduled = count_schedules(thread)
    for _ in range(10):
        stream.flush()
    assert scheduled == []
    assert received_text(sub, session) == ""


def test_written_text_is_sent_by_the_flush_and_the_next_flush_is_free(iopub: Any) -> None:
    thread, sub, session = iopub
    stream = PooledOutStream(session, thread, "stdout", watchfd=False)
    stream.flush_interval = 60  # only an explicit flush sends
    scheduled = count_schedules(thread)
    stream.write("hello ")
    stream.write("world\n")
    stream.flush()
    assert len(scheduled) >= 2  # the flush went through the IOPub thread and waited for it
    assert received_text(sub, session) == "hello world\n"
    before = len(scheduled)
    stream.flush()
    assert len(scheduled) == before


def test_text_written_by_other_threads_is_flushed_too(iopub: Any) -> None:
    thread, sub, session = iopub
    stream = PooledOutStream(session, thread, "stdout", watchfd=False)
    stream.flush_interval = 60
    writers = [threading.Thread(target=lambda i=i: [stream.write(f"{i}\n") for _ in range(100)]) for i in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stream.flush()
    text = received_text(sub, session)
    assert sorted(text.splitlines()) == sorted(f"{i}" for i in range(4) for _ in range(100))
