"""The notebook's side of kept state: what a released lease kept, and where it went next.

A value that stayed on the GPU kernel is a RemoteRef pointing at its lease. When that lease
ends and its variables are kept, the notebook's next lease restores them (the gateway says
which, in the lease's ``restore``): the RemoteRef then points at the new lease, and a
cell can use it again as if the GPU had never been given back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from .remote import RemoteRef


def waits_for_restore(value: Any, live_leases: set[str]) -> bool:
    """A RemoteRef of a lease that has ended: the next lease may restore it (checked then)."""
    return isinstance(value, RemoteRef) and value.lease_id not in live_leases


def adopt_restored(lease: dict[str, Any], ns: dict[str, Any]) -> list[str]:
    """Point the RemoteRefs this lease restores at it; returns their names."""
    restore = lease.get("restore") or {}
    if restore.get("error"):
        return []
    adopted = []
    for name in restore.get("names", []):
        value = ns.get(name)
        if isinstance(value, RemoteRef) and value.lease_id == restore.get("from_lease"):
            ns[name] = dataclasses.replace(value, lease_id=str(lease["id"]), gpu_type=str(lease.get("gpu_type")))
            adopted.append(name)
    return adopted


def ended_note(lease: dict[str, Any], remote_only: set[str], next_step: str = "Getting a fresh GPU kernel.") -> str:
    """Why a lease is gone, and whether what lived only there is kept for the next one;
    ``next_step``: what happens now (the next cell's note, or the watcher's while no cell runs)."""
    node = lease.get("node")
    where = f" on {node}" if node and node != "local" else ""
    note = f"jupyter-gpu: the {lease.get('gpu_type')} lease{where} ended ({lease.get('reason') or 'closed'})"
    if lease.get("reason_message"):  # which budget ended it, and when it resets
        note += f": {lease['reason_message']}"
    kept = lease.get("snapshot") or {}
    if kept.get("state") in ("saving", "kept"):
        lost = sorted(set(kept.get("unsaved", {})) & remote_only)
        note += "; its variables were kept and come back with the next lease"
        if lost:
            note += f", except these, which could not be saved: {', '.join(lost)}"
    else:
        if kept.get("state") == "failed":
            note += f"; its variables could not be kept ({kept.get('message')})"
        if remote_only:
            note += f"; these lived only there and are gone: {', '.join(sorted(remote_only))}"
    return f"{note}. {next_step}"


def format_snapshots(snapshots: list[dict[str, Any]], notebook: str) -> str:
    if not snapshots:
        return "jupyter-gpu: no variables are kept for you"
    lines = []
    for item in snapshots:
        mark = " (this notebook)" if item["notebook"] == notebook else ""
        if item.get("state") == "saving":
            lines.append(f"{item['notebook'] or '?'}{mark}: being saved from {item['gpu_type'] or '?'} now")
            continue
        names = ", ".join(item["names"][:8]) + (" ..." if len(item["names"]) > 8 else "")
        lines.append(f"{item['notebook'] or '?'}{mark}: {item['nbytes'] / 1e6:.1f} MB from {item['gpu_type'] or '?'}, "
                     f"kept {_ago(item['age'])} ago, expires in {_ago(item['expires_in'])}: {names}")
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"
