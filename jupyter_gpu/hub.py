"""Finding the gateway from inside a JupyterHub single-user server, with nothing set up.

The Hub gives every server it spawns (and so every kernel there) ``JUPYTERHUB_API_URL`` and
``JUPYTERHUB_API_TOKEN``. The gateway runs as one of the Hub's services; the Hub's service
list says where (``GET {JUPYTERHUB_API_URL}/services``), and the same token, owned by the
notebook's user, is what the gateway checks with the Hub. Standard library only: a kernel
need not have JupyterHub installed.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping

from .protocol import URL_ENV, Reason

API_URL_ENV = "JUPYTERHUB_API_URL"
API_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"
#: The gateway's name among the Hub's services.
SERVICE_ENV = "JUPYTER_GPU_SERVICE"
DEFAULT_SERVICE = "jupyter-gpu"


class HubDiscoveryError(RuntimeError):
    """The Hub did not say where the gateway is; the message says what to set up."""

    reason = Reason.NOT_CONFIGURED


def in_hub(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started by a JupyterHub (it has the Hub's API URL and a token)."""
    return bool(environ.get(API_URL_ENV) and environ.get(API_TOKEN_ENV))


def hub_token(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(API_TOKEN_ENV, "")


def gateway_url_from_hub(environ: Mapping[str, str] = os.environ, timeout: float = 10.0) -> str:
    """The gateway's URL from the Hub's service list; HubDiscoveryError saying why not."""
    api_url = environ.get(API_URL_ENV, "").rstrip("/")
    name = environ.get(SERVICE_ENV, "") or DEFAULT_SERVICE
    request = urllib.request.Request(f"{api_url}/services", headers={
        "Authorization": f"token {hub_token(environ)}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            services = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 403:
            raise HubDiscoveryError(
                f"the JupyterHub at {api_url} does not show its services to this server's token: the Hub's operator "
                f"grants the scopes list:services!service={name} and read:services!service={name} to users' "
                f"servers (see the README, 'Sharing a pool safely'), or set {URL_ENV}") from None
        raise HubDiscoveryError(f"the JupyterHub at {api_url} answered {exc.code} to GET /services: set {URL_ENV} "
                                "to the gateway's address") from None
    except (OSError, ValueError) as exc:
        raise HubDiscoveryError(f"the JupyterHub at {api_url} does not answer ({exc}): set {URL_ENV} to the "
                                "gateway's address") from None
    service = services.get(name) if isinstance(services, dict) else None
    if not isinstance(service, dict):
        offered = ", ".join(sorted(services)) if isinstance(services, dict) and services else "none"
        raise HubDiscoveryError(f"the JupyterHub at {api_url} has no service {name!r} visible to this server "
                                f"(it shows: {offered}): set {SERVICE_ENV} to the gateway's service name, or {URL_ENV}")
    url = str(service.get("url") or "").rstrip("/")
    if not url:
        raise HubDiscoveryError(f"the JupyterHub service {name!r} has no url (the token may lack "
                                f"read:services!service={name}): set {URL_ENV}")
    return url
