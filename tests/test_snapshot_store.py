"""The snapshot store, on a local directory and on S3 (moto's server, boto3 with an endpoint URL)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_gpu import snapshot
from jupyter_gpu.snapshot_format import read_header
from kernel_gateway.snapshot_store import (
    ORPHAN_SECONDS,
    LocalSnapshotStore,
    S3SnapshotStore,
    SnapshotQuotaExceeded,
    SnapshotStore,
)
from kernel_gateway.snapshots import take_file

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
TTL = 24 * 3600.0
PART = 5 * 2**20  # S3's smallest multipart part


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A function that opens the store (again: a restarted gateway opens the same one)."""
    if request.param == "local":
        def local(clock: FakeClock, quota: int = 0) -> SnapshotStore:
            return LocalSnapshotStore(str(tmp_path / "store"), TTL, quota, clock)
        return local
    endpoint = request.getfixturevalue("s3_endpoint")
    client = s3_client(endpoint)
    bucket = f"snap-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)

    def s3(clock: FakeClock, quota: int = 0) -> SnapshotStore:
        return S3SnapshotStore(f"s3://{bucket}/kept", TTL, quota, clock, client=client, multipart_bytes=PART)
    return s3


def snapshot_file(tmp_path: Path, nbytes: int = 1000, name: str = "x") -> str:
    import numpy as np

    path = str(tmp_path / f"written-{os.urandom(4).hex()}")
    snapshot.save(path, {name: np.full(nbytes // 8, 1.5)})
    return path


def test_put_list_fetch_replace_and_restart(make_store: Any, tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(clock)
    first = store.put("alice", "nb.ipynb", snapshot_file(tmp_path), {"names": ["x"], "unsaved": {"f": "file"}},
                      "a100", "lease1")
    assert [r.id for r in store.list("alice")] == [first.id] and store.list("bob") == []
    clock.now += 10
    second = store.put("alice", "nb.ipynb", snapshot_file(tmp_path, name="y"), {"names": ["y"]})
    other = store.put("alice", "other.ipynb", snapshot_file(tmp_path), {"names": ["x"]})
    assert {r.id for r in store.list("alice")} == {second.id, other.id}  # the newer one replaced the first
    assert store.find("alice", "nb.ipynb").names == ["y"]
    dest = str(tmp_path / "fetched")
    store.fetch("alice", second.id, dest)
    assert read_header(dest)[0]["variables"][0]["name"] == "y"
    assert store.usage("alice") == second.nbytes + other.nbytes
    public = second.public(clock.now + 5)
    assert "user" not in public and public["age"] == 5.0 and public["expires_in"] == TTL - 5
    # a restarted gateway opens the same store and finds them
    assert {r.id for r in make_store(clock).list("alice")} == {second.id, other.id}


def test_one_user_cannot_reach_anothers_snapshots(make_store: Any, tmp_path: Path) -> None:
    store = make_store(FakeClock())
    mine = store.put("alice", "nb.ipynb", snapshot_file(tmp_path), {"names": ["x"]})
    assert store.find("bob", "nb.ipynb") is None and store.list("bob") == []
    with pytest.raises(KeyError):
        store.fetch("bob", mine.id, str(tmp_path / "stolen"))
    assert not (tmp_path / "stolen").exists()
    assert store.delete("bob", mine.id) is False and store.list("alice")
    with pytest.raises(KeyError):  # an id that is a path is not even looked up
        store.fetch("alice", "../" + mine.id, str(tmp_path / "x"))
    assert store.user_key("alice") != store.user_key("bob") and "alice" not in store.user_key("alice")


def test_expiry_with_a_fake_clock(make_store: Any, tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(clock)
    store.put("alice", "old.ipynb", snapshot_file(tmp_path), {"names": ["x"]})
    clock.now += TTL / 2
    store.put("alice", "new.ipynb", snapshot_file(tmp_path), {"names": ["x"]})
    clock.now += TTL / 2
    assert [r.notebook for r in store.list("alice")] == ["new.ipynb"]
    clock.now += TTL
    assert store.sweep() == 1 and store.list("alice") == []


def test_quota_refuses_a_snapshot_that_would_not_fit(make_store: Any, tmp_path: Path) -> None:
    store = make_store(FakeClock(), quota=150_000)
    store.put("alice", "a.ipynb", snapshot_file(tmp_path, 100_000), {"names": ["x"]})
    store.put("alice", "a.ipynb", snapshot_file(tmp_path, 120_000), {"names": ["x"]})  # replaces: fits
    with pytest.raises(SnapshotQuotaExceeded, match=r"over your quota of 0\.00 GB.*%gpu snapshots"):
        store.put("alice", "b.ipynb", snapshot_file(tmp_path, 100_000), {"names": ["x"]})
    assert [r.notebook for r in store.list("alice")] == ["a.ipynb"]
    store.put("bob", "b.ipynb", snapshot_file(tmp_path, 100_000), {"names": ["x"]})  # quotas are per user


def test_local_interrupted_copy_is_never_listed_and_is_swept(tmp_path: Path) -> None:
    clock = FakeClock()
    store = LocalSnapshotStore(str(tmp_path / "store"), TTL, clock=clock)
    folder = tmp_path / "store" / store.user_key("alice")
    folder.mkdir()
    partial = folder / ("ab" * 16 + ".snap")
    partial.write_bytes(b"half a snapshot")  # its manifest, written last, never came
    assert store.list("alice") == []
    os.utime(partial, (clock.now - ORPHAN_SECONDS - 1,) * 2)
    assert store.sweep() == 1 and not partial.exists()


def test_s3_multipart_upload_and_an_interrupted_one(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="multipart")
    clock = FakeClock()
    store = S3SnapshotStore("s3://multipart/p", TTL, clock=clock, client=client, multipart_bytes=PART)
    path = snapshot_file(tmp_path, 4 * PART + 12345)
    with open(path, "rb") as file:
        original = file.read()
    record = store.put("alice", "nb.ipynb", path, {"names": ["x"]})
    head = client.head_object(Bucket="multipart", Key=f"p/{store.user_key('alice')}/{record.id}.snap")
    assert head["ETag"].strip('"').endswith("-5")  # went up in 5 parts
    store.fetch("alice", record.id, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == original

    parts = []

    def fail_third_part(**kwargs: Any) -> None:
        parts.append(1)
        if len(parts) == 3:
            raise ConnectionError("network gone during the upload")

    client.meta.events.register("before-call.s3.UploadPart", fail_third_part)
    try:
        with pytest.raises(Exception, match="network gone"):
            store.put("alice", "second.ipynb", snapshot_file(tmp_path, 4 * PART), {"names": ["x"]})
    finally:
        client.meta.events.unregister("before-call.s3.UploadPart", fail_third_part)
    # nothing half-restorable: only the first snapshot is listed
    assert [r.notebook for r in store.list("alice")] == ["nb.ipynb"]
    clock.now += 10 * ORPHAN_SECONDS  # boto3 aborted the upload already; the sweep finds nothing left over
    store.sweep()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="multipart").get("Contents", [])]
    assert len([k for k in keys if k.endswith(".snap")]) == 1
    assert client.list_multipart_uploads(Bucket="multipart").get("Uploads", []) == []


@pytest.mark.parametrize("staging_root", ["same", "/dev/shm"])
def test_a_link_planted_by_the_kernel_is_never_taken_into_the_store(tmp_path: Path, staging_root: str) -> None:
    """The kernel names its snapshot file; a symlink or hard link to a gateway file there
    is refused, on the same file system (rename) and across file systems (copy)."""
    if staging_root != "same" and not os.path.isdir(staging_root):
        pytest.skip("no /dev/shm")
    secret = tmp_path / "users.json"
    secret.write_text("the gateway's token hashes")
    spool = tmp_path / "spool"
    spool.mkdir()
    staging = Path(tempfile.mkdtemp(dir=tmp_path if staging_root == "same" else staging_root, prefix="staging-"))
    try:
        (staging / "a").symlink_to(secret)
        with pytest.raises((ValueError, OSError)):
            take_file(str(staging / "a"), str(spool))
        if staging_root == "same":  # hard links cannot cross file systems
            os.link(secret, staging / "b")
            with pytest.raises(ValueError, match="not a plain file"):
                take_file(str(staging / "b"), str(spool))
        assert list(spool.iterdir()) == [] and secret.read_text() == "the gateway's token hashes"
        (staging / "c").write_bytes(b"a real snapshot")
        taken = take_file(str(staging / "c"), str(spool))
        assert Path(taken).read_bytes() == b"a real snapshot" and not (staging / "c").exists()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def test_a_snapshot_folder_swapped_for_a_link_is_not_followed(tmp_path: Path) -> None:
    """The kernel owns its staging folder: it can replace ``snapshot/`` with a link to another
    folder (another kernel's staging, the gateway's store) holding a file of the expected name.
    Nothing is taken from there."""
    elsewhere = tmp_path / "another-kernels-staging" / "snapshot"
    elsewhere.mkdir(parents=True)
    (elsewhere / "f00d").write_bytes(b"someone else's variables")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "snapshot").symlink_to(elsewhere, target_is_directory=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(OSError):
        take_file(str(staging / "snapshot" / "f00d"), str(spool))
    assert list(spool.iterdir()) == [] and (elsewhere / "f00d").read_bytes() == b"someone else's variables"
