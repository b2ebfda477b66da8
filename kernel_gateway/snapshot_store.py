"""Where kept kernel state waits between leases: a directory here, or S3 for many nodes.

A snapshot is two things: its blob (the file a kernel wrote, see jupyter_gpu.snapshot_format)
and its manifest (who, which notebook, size, names, expiry), written last. Only a snapshot
whose manifest exists is listed or restored, so a copy or an upload cut off half-way is
never half-restored; blobs without a manifest are swept once they are old.

Each user's snapshots live under a key derived with a secret of the store (HMAC of the
user name), and a request only ever names a snapshot id inside its own user's key: one
user cannot reach, or even find, another's. One snapshot per (user, notebook): a newer one
replaces it. Kept state expires after ``ttl`` seconds.
"""

from __future__ import annotations

import abc
import builtins
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

Clock = Callable[[], float]
_ID = re.compile(r"[0-9a-f]{32}")
_USER_KEY = re.compile(r"[0-9a-f]{40}")
#: A blob without a manifest this old is an interrupted write, never to be committed.
ORPHAN_SECONDS = 3600.0
_SECRET_NAME = "store-secret"


class SnapshotQuotaExceeded(RuntimeError):
    """Keeping this snapshot would take the user past their snapshot storage quota."""


@dataclass
class SnapshotRecord:
    """A kept snapshot, as its manifest says."""

    id: str
    user: str
    notebook: str
    created: float
    expires: float
    nbytes: int
    names: list[str] = field(default_factory=list)
    unsaved: dict[str, str] = field(default_factory=dict)
    gpu_type: str = ""
    lease_id: str = ""

    def public(self, now: float) -> dict[str, Any]:
        """The record as the API shows it to its owner."""
        info = asdict(self)
        del info["user"]
        info.update(age=round(now - self.created, 1), expires_in=round(max(0.0, self.expires - now), 1))
        return info


class SnapshotStore(abc.ABC):
    """The policy (keys, manifests, expiry, quota); subclasses move the bytes."""

    def __init__(self, ttl: float, quota_bytes: int = 0, clock: Clock = time.time) -> None:
        self.ttl = ttl
        self.quota_bytes = quota_bytes
        self.clock = clock
        self._secret: bytes | None = None

    # --- what subclasses do --------------------------------------------------------------

    @abc.abstractmethod
    def _load_secret(self) -> bytes | None: ...

    @abc.abstractmethod
    def _save_secret(self, secret: bytes) -> bytes:
        """Store ``secret`` unless one exists already; return the one that is kept."""

    @abc.abstractmethod
    def _put_blob(self, user_key: str, snapshot_id: str, path: str) -> None:
        """Move (or copy) the file at ``path`` into the store as the blob of ``snapshot_id``."""

    @abc.abstractmethod
    def _put_manifest(self, user_key: str, snapshot_id: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _manifests(self, user_key: str | None) -> list[tuple[str, str, bytes]]:
        """``(user_key, id, manifest)`` of one user's snapshots, or of everyone's for None."""

    @abc.abstractmethod
    def _get_blob(self, user_key: str, snapshot_id: str, dest: str) -> None: ...

    @abc.abstractmethod
    def _remove(self, user_key: str, snapshot_id: str) -> None:
        """Delete the manifest first, then the blob (never a manifest without its blob)."""

    @abc.abstractmethod
    def _remove_orphans(self, older_than: float) -> int: ...

    # --- the policy ----------------------------------------------------------------------

    def user_key(self, user: str) -> str:
        if self._secret is None:
            self._secret = self._load_secret() or self._save_secret(secrets.token_bytes(32))
        return hmac.new(self._secret, user.encode(), hashlib.sha256).hexdigest()[:40]

    def _records(self, user: str | None) -> list[tuple[str, SnapshotRecord]]:
        records = []
        for user_key, snapshot_id, data in self._manifests(None if user is None else self.user_key(user)):
            try:
                record = SnapshotRecord(**json.loads(data))
            except (ValueError, TypeError):
                continue  # not one of ours, or damaged: never restored
            if record.id == snapshot_id and (user is None or record.user == user):
                records.append((user_key, record))
        return records

    def list(self, user: str) -> list[SnapshotRecord]:
        """The user's snapshots that have not expired, newest first."""
        now = self.clock()
        live = []
        for user_key, record in self._records(user):
            if record.expires <= now:
                self._remove(user_key, record.id)
            else:
                live.append(record)
        return sorted(live, key=lambda record: -record.created)

    def everyone(self) -> builtins.list[SnapshotRecord]:
        """Every user's snapshots that have not expired (what a starting gateway indexes)."""
        now = self.clock()
        return [record for _, record in self._records(None) if record.expires > now]

    def find(self, user: str, notebook: str) -> SnapshotRecord | None:
        return next((record for record in self.list(user) if record.notebook == notebook), None)

    def usage(self, user: str) -> int:
        """Bytes the user's kept snapshots take."""
        return sum(record.nbytes for record in self.list(user))

    def put(self, user: str, notebook: str, path: str, summary: dict[str, Any], gpu_type: str = "",
            lease_id: str = "") -> SnapshotRecord:
        """Keep the snapshot file at ``path`` (taken: it is moved or deleted) as the
        notebook's, replacing the one it had. Raises SnapshotQuotaExceeded."""
        nbytes = os.path.getsize(path)
        older = [r for r in self.list(user) if r.notebook == notebook]
        if self.quota_bytes:
            after = self.usage(user) - sum(r.nbytes for r in older) + nbytes
            if after > self.quota_bytes:
                os.unlink(path)
                raise SnapshotQuotaExceeded(
                    f"the variables of this notebook ({nbytes / 1e9:.2f} GB) were not kept: with them your snapshots "
                    f"would take {after / 1e9:.2f} GB, over your quota of {self.quota_bytes / 1e9:.2f} GB. "
                    "Free room with %gpu snapshots / %gpu release --forget in other notebooks"
                )
        now = self.clock()
        record = SnapshotRecord(
            id=secrets.token_hex(16), user=user, notebook=notebook, created=now, expires=now + self.ttl,
            nbytes=nbytes, names=list(summary.get("names", [])), unsaved=dict(summary.get("unsaved", {})),
            gpu_type=gpu_type, lease_id=lease_id,
        )
        user_key = self.user_key(user)
        self._put_blob(user_key, record.id, path)
        self._put_manifest(user_key, record.id, json.dumps(asdict(record)).encode())  # the commit
        for old in older:
            self._remove(user_key, old.id)
        return record

    def fetch(self, user: str, snapshot_id: str, dest: str) -> None:
        """Copy the user's snapshot to the file ``dest`` (a kernel's staging area)."""
        if not _ID.fullmatch(snapshot_id):
            raise KeyError(snapshot_id)
        self._get_blob(self.user_key(user), snapshot_id, dest)

    def delete(self, user: str, snapshot_id: str) -> bool:
        """Forget one of the user's snapshots; False when they have none of that id."""
        for user_key, record in self._records(user):
            if record.id == snapshot_id:
                self._remove(user_key, record.id)
                return True
        return False

    def sweep(self) -> int:
        """Delete expired snapshots of every user and blobs whose write never committed."""
        now = self.clock()
        expired = [(key, record) for key, record in self._records(None) if record.expires <= now]
        for user_key, record in expired:
            self._remove(user_key, record.id)
        return len(expired) + self._remove_orphans(now - ORPHAN_SECONDS)


class LocalSnapshotStore(SnapshotStore):
    """A directory on the gateway's machine: ``ROOT/<user key>/<id>.snap`` and ``<id>.json``."""

    def __init__(self, root: str, ttl: float, quota_bytes: int = 0, clock: Clock = time.time) -> None:
        super().__init__(ttl, quota_bytes, clock)
        self.root = root
        os.makedirs(root, mode=0o700, exist_ok=True)

    def _load_secret(self) -> bytes | None:
        try:
            with open(os.path.join(self.root, _SECRET_NAME), "rb") as file:
                return file.read() or None
        except FileNotFoundError:
            return None

    def _save_secret(self, secret: bytes) -> bytes:
        path = os.path.join(self.root, _SECRET_NAME)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another gateway on this store was first
            return self._load_secret() or secret
        with open(fd, "wb") as file:
            file.write(secret)
        return secret

    def _dir(self, user_key: str) -> str:
        path = os.path.join(self.root, user_key)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def _user_dirs(self) -> list[str]:
        return [entry.name for entry in os.scandir(self.root) if entry.is_dir() and _USER_KEY.fullmatch(entry.name)]

    def _put_blob(self, user_key: str, snapshot_id: str, path: str) -> None:
        final = os.path.join(self._dir(user_key), f"{snapshot_id}.snap")
        try:
            os.replace(path, final)  # the same file system: no bytes move
        except OSError:
            partial = final + ".part"
            shutil.copyfile(path, partial)  # copy_file_range/sendfile: no copy through Python
            os.replace(partial, final)
            os.unlink(path)

    def _put_manifest(self, user_key: str, snapshot_id: str, data: bytes) -> None:
        final = os.path.join(self._dir(user_key), f"{snapshot_id}.json")
        with open(final + ".part", "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(final + ".part", final)

    def _manifests(self, user_key: str | None) -> list[tuple[str, str, bytes]]:
        keys = [user_key] if user_key is not None else self._user_dirs()
        found = []
        for key in keys:
            folder = os.path.join(self.root, key)
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                stem, _, ext = name.partition(".")
                if ext == "json" and _ID.fullmatch(stem):
                    try:
                        with open(os.path.join(folder, name), "rb") as file:
                            found.append((key, stem, file.read()))
                    except FileNotFoundError:  # removed meanwhile
                        continue
        return found

    def _get_blob(self, user_key: str, snapshot_id: str, dest: str) -> None:
        source = os.path.join(self.root, user_key, f"{snapshot_id}.snap")
        try:
            shutil.copyfile(source, dest)
        except FileNotFoundError:
            raise KeyError(snapshot_id) from None

    def _remove(self, user_key: str, snapshot_id: str) -> None:
        for ext in ("json", "snap"):
            try:
                os.unlink(os.path.join(self.root, user_key, f"{snapshot_id}.{ext}"))
            except FileNotFoundError:
                pass

    def _remove_orphans(self, older_than: float) -> int:
        removed = 0
        for key in self._user_dirs():
            folder = os.path.join(self.root, key)
            names = set(os.listdir(folder))
            for name in names:
                uncommitted = name.endswith(".part") or (
                    name.endswith(".snap") and name.removesuffix(".snap") + ".json" not in names)
                path = os.path.join(folder, name)
                try:
                    if uncommitted and os.stat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


class S3SnapshotStore(SnapshotStore):
    """``s3://bucket/prefix``: what a pool of many nodes uses (written on one, restored on another).

    Blobs go up with boto3's managed transfer (multipart past ``multipart_bytes``, parts in
    parallel; a failed one is aborted by boto3, and the manifest was never written).
    """

    def __init__(self, url: str, ttl: float, quota_bytes: int = 0, clock: Clock = time.time,
                 client: Any = None, multipart_bytes: int = 64 * 2**20) -> None:
        super().__init__(ttl, quota_bytes, clock)
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"--snapshot-store {url!r}: name a bucket, as in s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
        except ImportError:
            raise ValueError(f"--snapshot-store {url}: S3 needs boto3 (pip install jupyter-gpu[s3])") from None
        self.client = client if client is not None else boto3.client("s3")

        self.transfer = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes)

    def _key(self, user_key: str, snapshot_id: str, ext: str) -> str:
        return f"{self.prefix}{user_key}/{snapshot_id}.{ext}"

    def _load_secret(self) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + _SECRET_NAME)["Body"]
            return bytes(body.read()) or None
        except self.client.exceptions.NoSuchKey:
            return None

    def _save_secret(self, secret: bytes) -> bytes:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + _SECRET_NAME, Body=secret)
        return self._load_secret() or secret

    def _put_blob(self, user_key: str, snapshot_id: str, path: str) -> None:
        try:
            self.client.upload_file(path, self.bucket, self._key(user_key, snapshot_id, "snap"), Config=self.transfer)
        finally:
            os.unlink(path)

    def _put_manifest(self, user_key: str, snapshot_id: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(user_key, snapshot_id, "json"), Body=data)

    def _objects(self, prefix: str) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
        return objects

    def _manifests(self, user_key: str | None) -> list[tuple[str, str, bytes]]:
        found = []
        for item in self._objects(self.prefix + (f"{user_key}/" if user_key else "")):
            parts = item["Key"][len(self.prefix):].split("/")
            if len(parts) != 2 or not parts[1].endswith(".json") or not _ID.fullmatch(parts[1][:-5]):
                continue
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            except self.client.exceptions.NoSuchKey:
                continue
            found.append((parts[0], parts[1][:-5], bytes(body)))
        return found

    def _get_blob(self, user_key: str, snapshot_id: str, dest: str) -> None:
        import botocore.exceptions

        try:
            self.client.download_file(self.bucket, self._key(user_key, snapshot_id, "snap"), dest,
                                      Config=self.transfer)
        except botocore.exceptions.ClientError as exc:
            raise KeyError(snapshot_id) from exc

    def _remove(self, user_key: str, snapshot_id: str) -> None:
        for ext in ("json", "snap"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(user_key, snapshot_id, ext))

    def _remove_orphans(self, older_than: float) -> int:
        objects = self._objects(self.prefix)
        keys = {item["Key"] for item in objects}
        removed = 0
        for item in objects:
            key = item["Key"]
            if key.endswith(".snap") and key[:-5] + ".json" not in keys and \
                    item["LastModified"].timestamp() < older_than:
                self.client.delete_object(Bucket=self.bucket, Key=key)
                removed += 1
        # Multipart uploads a crashed gateway left open (their parts cost storage).
        for upload in self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix).get("Uploads", []):
            if upload["Initiated"].timestamp() < older_than:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                removed += 1
        return removed


def open_store(location: str, ttl: float, quota_bytes: int = 0, clock: Clock = time.time) -> SnapshotStore:
    """``s3://bucket/prefix`` or a local directory."""
    if location.startswith("s3://"):
        return S3SnapshotStore(location, ttl, quota_bytes, clock)
    return LocalSnapshotStore(location, ttl, quota_bytes, clock)
