"""The pooled kernels' stdout/stderr: a flush with nothing pending is free, output is never held back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from ipykernel.iostream import IOPubThread
from jupyter_client.session import Session

from jupyter_gpu.pooled_kernel import PooledOutStream, pieces


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
    # IOPubThread.stop() stops its loop with its event-pipe GC task still pending, which Python
    # reports at garbage collection ("Task was destroyed but it is pending!"): end it first.
    asyncio.run_coroutine_threadsafe(_cancel(thread._event_pipe_gc_task), thread.io_loop.asyncio_loop).result(5)
    thread.stop()
    thread.close()
    sub.close(linger=0)
    context.term()


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def received(sub: zmq.Socket[bytes], session: Session) -> list[tuple[str, str]]:
    """What arrived, in order: ("text", stream text) and ("marker", what send_multipart sent)."""
    events = []
    while sub.poll(300):
        frames = sub.recv_multipart()
        if frames[0] == b"marker":
            events.append(("marker", frames[1].decode()))
            continue
        _, parts = session.feed_identities(frames)
        events.append(("text", session.deserialize(parts)["content"]["text"]))
    return events


def received_text(sub: zmq.Socket[bytes], session: Session) -> str:
    return "".join(text for kind, text in received(sub, session) if kind == "text")


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
    stream.write("hello ")
    stream.write("world\n")
    scheduled = count_schedules(thread)
    stream.flush()
    assert len(scheduled) == 1  # the send is queued, not waited for
    assert received_text(sub, session) == "hello world\n"
    stream.flush()
    assert len(scheduled) == 1


def test_what_is_published_after_a_flush_arrives_after_the_flushed_text(iopub: Any) -> None:
    thread, sub, session = iopub
    stream = PooledOutStream(session, thread, "stdout", watchfd=False)
    for i in range(300):
        stream.write(f"{i}\n")
        stream.flush()
        thread.send_multipart([b"marker", str(i).encode()])  # as the kernel's idle status goes
    text_so_far = ""
    for kind, value in received(sub, session):
        if kind == "text":
            text_so_far += value
        else:
            assert f"{value}\n" in text_so_far.splitlines(keepends=True)
    assert text_so_far == "".join(f"{i}\n" for i in range(300))


def test_flushed_text_written_faster_than_it_is_sent_travels_in_fewer_messages(iopub: Any) -> None:
    thread, sub, session = iopub
    stream = PooledOutStream(session, thread, "stdout", watchfd=False)
    for i in range(5000):
        print(i, file=stream, flush=True)
    events = received(sub, session)
    assert "".join(text for _, text in events) == "".join(f"{i}\n" for i in range(5000))
    assert len(events) < 5000


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


def test_pieces_cut_after_newlines_and_join_to_the_text() -> None:
    assert pieces("short") == ["short"]
    text = "".join(f"line {i}\n" for i in range(1000))
    cut = pieces(text, size=100)
    assert "".join(cut) == text
    assert all(len(piece) <= 100 and piece.endswith("\n") for piece in cut)
    one_long_line = "y" * 250
    assert pieces(one_long_line, size=100) == ["y" * 100, "y" * 100, "y" * 50]


def test_a_large_write_goes_out_in_pieces_in_order(iopub: Any) -> None:
    thread, sub, session = iopub
    stream = PooledOutStream(session, thread, "stdout", watchfd=False)
    text = ("y" * 99 + "\n") * 5000  # 500 kB
    stream.write(text)
    stream.flush()
    events = received(sub, session)
    assert "".join(value for _, value in events) == text
    assert len(events) == len(pieces(text)) > 1


def test_cached_signature_lookup_answers_as_ipykernel_does() -> None:
    from ipykernel.kernelbase import _accepts_parameters

    from jupyter_gpu.pooled_kernel import _accepts_parameters_cached

    class Shell:
        async def run_cell_async(self, raw_cell: str, *, cell_id: str | None = None) -> None: ...

        def anything(self, **kwargs: Any) -> None: ...

    for meth in (Shell().run_cell_async, Shell().anything, lambda cell: None):
        for _ in range(2):
            assert _accepts_parameters_cached(meth, ["cell_id", "cell_meta"]) == _accepts_parameters(
                meth, ["cell_id", "cell_meta"]
            )


def test_pooled_classes_are_used_only_with_the_ipykernel_they_were_written_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jupyter_gpu import pooled_kernel
    from pool_manager.backend import KERNEL_ARGUMENTS, POOLED_KERNEL_ARGUMENTS, kernel_arguments

    assert pooled_kernel.supported()  # this environment's ipykernel 7.4
    assert kernel_arguments() == [*KERNEL_ARGUMENTS, *POOLED_KERNEL_ARGUMENTS]
    # Only the minor releases whose private internals were read: a 7.5 may keep every name
    # and change what it means, so it runs stock until someone has checked.
    for release, expected in [("7.4.0", True), ("7.4.2", True), ("7.4.0rc1", True), ("7.5.0", False),
                              ("7.3.9", False), ("7.10.0", False), ("8.0.0", False), ("6.29.5", False),
                              ("nonsense", False)]:
        assert pooled_kernel.supported(release) is expected, release
    monkeypatch.setattr(pooled_kernel, "version", lambda name: "7.5.0")
    assert not pooled_kernel.supported()
    assert kernel_arguments() == list(KERNEL_ARGUMENTS)  # stock kernels: slower, never broken
