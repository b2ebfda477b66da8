"""Users and their tokens: the users file the CLI edits, and the check the gateway runs per request.

Only SHA-256 hashes of tokens are stored. Tokens are 32 random bytes from ``secrets.token_urlsafe``,
so a fast unsalted hash is adequate: there is nothing to brute-force that is cheaper than guessing
256 random bits, and salting or stretching (bcrypt, scrypt) only defends low-entropy passwords.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_NAME_RULE = "1-64 characters from letters, digits and '._@-', starting with a letter or digit"
_HEX_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TOKEN_BYTES = 32


def _hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _check_name(name: str) -> None:
    # fullmatch, not match with '$': '$' would let a trailing newline through.
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad user name {name!r}: use {_NAME_RULE}")


def _read_users(path: str) -> dict[str, dict[str, str]]:
    """Parse and validate the users file; errors name the path and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"users file {path} does not exist: create it with `jupyter-gpu token add NAME`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read users file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"users file {path} is not valid JSON: {e}") from None
    # A malformed file is a bad value to the caller, not a programming error: ValueError, as documented.
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise ValueError(
            f'users file {path} must be a JSON object with a "users" object'
        )
    users: dict[str, dict[str, str]] = {}
    for name, entry in data["users"].items():
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"users file {path}: bad user name {name!r} ({_NAME_RULE})")
        digest = entry.get("token_sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not _HEX_SHA256_RE.fullmatch(digest):
            raise ValueError(f'users file {path}: user {name!r} needs "token_sha256" as 64 lower-case hex digits')
        users[name] = {key: value for key, value in entry.items() if isinstance(value, str)}
    return users


def _write_users(path: str, users: dict[str, dict[str, str]]) -> None:
    """Write atomically with mode 0600, so a reader never sees half a file and others never see hashes."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".users-", suffix=".tmp", dir=directory)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"users": users}, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_users_or_empty(path: str) -> dict[str, dict[str, str]]:
    return _read_users(path) if os.path.exists(path) else {}


def add_user(path: str, name: str) -> str:
    """Create or replace ``name``'s token; returns the plain token, which is shown once and never stored."""
    _check_name(name)
    users = _read_users_or_empty(path)
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    users[name] = {
        "token_sha256": _hash_token(token).hex(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_users(path, users)
    return token


def remove_user(path: str, name: str) -> bool:
    """Remove ``name``; False if there was no such user (or no file)."""
    users = _read_users_or_empty(path)
    if name not in users:
        return False
    del users[name]
    _write_users(path, users)
    return True


def list_users(path: str) -> list[str]:
    return sorted(_read_users_or_empty(path))


@dataclass(frozen=True)
class _FileStamp:
    """What identifies one version of the users file; the inode catches os.replace within one mtime tick."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: str) -> _FileStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


class TokenAuthenticator:
    """Maps a presented token to a user name, comparing in constant time."""

    def __init__(
        self, hashes: dict[str, bytes], *, users_file: str | None = None, open_user: str | None = None
    ) -> None:
        self._entries = tuple(hashes.items())
        self._users_file = users_file
        self._stamp = _FileStamp.of(users_file) if users_file is not None else None
        self._open_user = open_user
        #: False only for open access: the gateway then accepts any request (loopback dev use only).
        self.requires_token = open_user is None

    @classmethod
    def from_users_file(cls, path: str) -> TokenAuthenticator:
        """Tokens from a users file, re-read when it changes so `token add` needs no gateway restart."""
        return cls(_hashes(_read_users(path)), users_file=path)

    @classmethod
    def single_user(cls, token: str, user: str = "default") -> TokenAuthenticator:
        if not token:
            raise ValueError("empty token: give a token or use a users file")
        _check_name(user)
        return cls({user: _hash_token(token)})

    @classmethod
    def open_access(cls, user: str = "default") -> TokenAuthenticator:
        """Accept every request as ``user``: only for a gateway bound to loopback in development."""
        _check_name(user)
        return cls({}, open_user=user)

    def user_for(self, token: str | None) -> str | None:
        """The user owning ``token``, else None. Checks every stored hash, so timing reveals no position."""
        if self._open_user is not None:
            return self._open_user
        self._reload_if_changed()
        if not token:
            return None
        presented = _hash_token(token)
        found: str | None = None
        for user, digest in self._entries:
            if hmac.compare_digest(presented, digest):
                found = user
        return found

    def _reload_if_changed(self) -> None:
        if self._users_file is None:
            return
        stamp = _FileStamp.of(self._users_file)
        if stamp == self._stamp:
            return
        # Remember the stamp even on failure, so a bad file is warned about once, not on every request.
        self._stamp = stamp
        try:
            self._entries = tuple(_hashes(_read_users(self._users_file)).items())
        except ValueError as e:
            log.warning("keeping the previous %d users: %s", len(self._entries), e)


def _hashes(users: dict[str, dict[str, str]]) -> dict[str, bytes]:
    return {name: bytes.fromhex(entry["token_sha256"]) for name, entry in users.items()}


def token_from_request(authorization_header: str | None, query_token: str | None) -> str | None:
    """The token from ``Authorization: token T`` or ``Authorization: Bearer T``, else from ``?token=``."""
    if authorization_header:
        parts = authorization_header.split(None, 1)
        if len(parts) == 2 and parts[0].lower() in ("token", "bearer"):
            return parts[1].strip()
    return query_token or None
