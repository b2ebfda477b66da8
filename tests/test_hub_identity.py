"""What the gateway makes of the Hub's answer about a token: the user, their groups, operator or not, refused.

The Hub's user model is what ``GET /hub/api/user`` answers (tests/e2e/test_hub.py gets it from a
real Hub); here the decisions on it, which need no Hub.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from traitlets import TraitError

pytest.importorskip("jupyterhub", reason="pip install 'jupyter-gpu[hub]'")

from kernel_gateway.errors import ApiError
from kernel_gateway.hub import HubIdentityProvider
from kernel_gateway.identity import User

ACCESS = "access:services!service=jupyter-gpu"


@pytest.fixture(autouse=True)
def outside_a_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JUPYTERHUB_OAUTH_ACCESS_SCOPES", "JUPYTERHUB_SERVICE_NAME", "JUPYTERHUB_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)


def provider(**config: Any) -> HubIdentityProvider:
    return HubIdentityProvider(api_url="http://127.0.0.1:8081/hub/api", **config)


def model(name: str = "alice", scopes: tuple[str, ...] = (ACCESS,), **extra: Any) -> dict[str, Any]:
    return {"kind": "user", "name": name, "groups": ["physics"], "scopes": list(scopes), **extra}


def test_a_hub_user_with_the_services_scope_is_that_user_with_their_groups() -> None:
    assert provider().user_from_model(model()) == User("alice", frozenset({"physics"}), admin=False)


def test_operators_by_an_unfiltered_admin_scope_or_by_name() -> None:
    hub = provider(operators=["carol"])
    assert hub.user_from_model(model("ops", (ACCESS, "admin:users"))).admin
    # admin:users over oneself only (as every user has read:users!user=...) makes nobody an operator
    assert not hub.user_from_model(model("alice", (ACCESS, "admin:users!user=alice"))).admin
    assert hub.user_from_model(model("carol")).admin
    assert provider(operator_scopes=["custom:gpu-operator"]).user_from_model(
        model("dan", (ACCESS, "custom:gpu-operator"))).admin


def test_a_token_without_the_services_scope_or_of_a_service_is_refused_saying_why() -> None:
    with pytest.raises(ApiError) as refused:
        provider().user_from_model(model(scopes=("access:servers!server=alice/",)))
    assert refused.value.status_code == 403 and ACCESS in refused.value.message
    # another service's access is not this one's
    with pytest.raises(ApiError):
        provider().user_from_model(model(scopes=("access:services!service=other",)))
    # access to every service includes this one
    assert provider().user_from_model(model(scopes=("access:services",))).name == "alice"
    with pytest.raises(ApiError) as service:
        provider().user_from_model({"kind": "service", "name": "cron", "scopes": [ACCESS]})
    assert "only Hub users hold GPU leases" in service.value.message


def test_the_scope_follows_the_service_name_or_what_the_hub_says(monkeypatch: pytest.MonkeyPatch) -> None:
    assert provider(service_name="gpus").access_scopes == ["access:services!service=gpus"]
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "pool")
    assert provider().access_scopes == ["access:services!service=pool"]
    monkeypatch.setenv("JUPYTERHUB_OAUTH_ACCESS_SCOPES", '["access:services!service=pool", "custom:x"]')
    assert provider().access_scopes == ["access:services!service=pool", "custom:x"]


def test_the_hubs_answers_are_kept_at_most_thirty_seconds() -> None:
    assert provider().hub_auth.cache_max_age == 30
    assert provider(cache_max_age=5).hub_auth.cache_max_age == 5
    with pytest.raises(TraitError, match="give 1 to 30 seconds"):
        provider(cache_max_age=300)


def test_no_cache_age_keeps_a_revoked_tokens_answer_forever() -> None:
    """JupyterHub's cache reads a max age of 0 as "forever": 0 would let a revoked token work for good."""
    with pytest.raises(TraitError, match="keeps answers forever at 0"):
        provider(cache_max_age=0)
    # what is allowed does forget: the Hub's answer about a token is asked again after the age
    hub_auth = provider(cache_max_age=1).hub_auth
    hub_auth.cache["token:alice"] = model()
    assert "token:alice" in hub_auth.cache
    time.sleep(1.1)
    assert "token:alice" not in hub_auth.cache
