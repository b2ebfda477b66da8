"""Users file and token checks: hashes only, mode 0600, live reload, header parsing."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from kernel_gateway.auth import TokenAuthenticator, add_user, list_users, remove_user, token_from_request


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    return str(tmp_path / "users.json")


def bump_mtime(path: str) -> None:
    """Make sure a rewrite is seen even on file systems with coarse timestamps."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_each_token_maps_to_its_user(users_file: str) -> None:
    alice = add_user(users_file, "alice")
    bob = add_user(users_file, "bob@example.org")
    auth = TokenAuthenticator.from_users_file(users_file)
    assert auth.requires_token
    assert auth.user_for(alice) == "alice"
    assert auth.user_for(bob) == "bob@example.org"
    assert auth.user_for(alice + "x") is None
    assert auth.user_for("") is None
    assert auth.user_for(None) is None
    assert list_users(users_file) == ["alice", "bob@example.org"]


def test_file_holds_only_hashes_with_mode_0600(users_file: str) -> None:
    token = add_user(users_file, "alice")
    text = Path(users_file).read_text()
    assert token not in text
    entry = json.loads(text)["users"]["alice"]
    assert set(entry) == {"token_sha256", "created"} and len(entry["token_sha256"]) == 64
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    assert [p.name for p in Path(users_file).parent.iterdir()] == ["users.json"]  # no temp file left behind


def test_changes_take_effect_without_restart(users_file: str) -> None:
    old = add_user(users_file, "alice")
    auth = TokenAuthenticator.from_users_file(users_file)
    carol = add_user(users_file, "carol")
    new = add_user(users_file, "alice")  # replace
    bump_mtime(users_file)
    assert auth.user_for(carol) == "carol"
    assert auth.user_for(new) == "alice"
    assert auth.user_for(old) is None

    assert remove_user(users_file, "carol") is True
    assert remove_user(users_file, "carol") is False
    bump_mtime(users_file)
    assert auth.user_for(carol) is None
    assert list_users(users_file) == ["alice"]


def test_malformed_reload_keeps_last_good_users(users_file: str, caplog: pytest.LogCaptureFixture) -> None:
    token = add_user(users_file, "alice")
    auth = TokenAuthenticator.from_users_file(users_file)
    Path(users_file).write_text("{not json")
    bump_mtime(users_file)
    with caplog.at_level(logging.WARNING, logger="kernel_gateway.auth"):
        assert auth.user_for(token) == "alice"
    assert users_file in caplog.text


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"people": {}}', '"users" object'),
        ('{"users": {"alice": {"token_sha256": "abc"}}}', "64 lower-case hex"),
        ('{"users": {"bad name": {"token_sha256": "' + "0" * 64 + '"}}}', "bad user name"),
    ],
)
def test_malformed_file_error_names_path(users_file: str, content: str, problem: str) -> None:
    Path(users_file).write_text(content)
    with pytest.raises(ValueError) as excinfo:
        TokenAuthenticator.from_users_file(users_file)
    assert users_file in str(excinfo.value) and problem in str(excinfo.value)
    with pytest.raises(ValueError, match=problem):
        add_user(users_file, "alice")  # never overwrite a file we could not read


def test_missing_file_error_names_path(users_file: str) -> None:
    with pytest.raises(ValueError, match="does not exist") as excinfo:
        TokenAuthenticator.from_users_file(users_file)
    assert users_file in str(excinfo.value)
    assert list_users(users_file) == []
    assert remove_user(users_file, "alice") is False


@pytest.mark.parametrize("name", ["", "-alice", ".x", "a b", "alice\n", "a/b", "x" * 65, "élise"])
def test_bad_names_rejected(users_file: str, name: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        add_user(users_file, name)
    assert repr(name) in str(excinfo.value) and "starting with a letter or digit" in str(excinfo.value)
    assert not os.path.exists(users_file)


def test_single_user_and_open_access() -> None:
    auth = TokenAuthenticator.single_user("s3cret")
    assert auth.user_for("s3cret") == "default"
    assert auth.user_for("other") is None and auth.user_for(None) is None
    assert TokenAuthenticator.single_user("s3cret", user="me").user_for("s3cret") == "me"
    with pytest.raises(ValueError):
        TokenAuthenticator.single_user("")

    open_auth = TokenAuthenticator.open_access()
    assert not open_auth.requires_token
    assert open_auth.user_for(None) == "default" and open_auth.user_for("anything") == "default"


@pytest.mark.parametrize(
    ("header", "query", "expected"),
    [
        ("token abc", None, "abc"),
        ("Bearer abc", None, "abc"),
        ("BEARER abc", "q", "abc"),
        ("Token  abc ", None, "abc"),
        ("Basic dXNlcjpwYXNz", "q", "q"),
        ("token", "q", "q"),
        (None, "q", "q"),
        ("", "q", "q"),
        (None, "", None),
        (None, None, None),
    ],
)
def test_token_from_request(header: str | None, query: str | None, expected: str | None) -> None:
    assert token_from_request(header, query) == expected
