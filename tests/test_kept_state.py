"""The notebook's side of kept state: RemoteRefs follow to the lease that restored them."""

from __future__ import annotations

from typing import Any

from jupyter_gpu.kept_state import adopt_restored, ended_note, waits_for_restore
from jupyter_gpu.remote import RemoteRef


def ref(name: str, lease_id: str) -> RemoteRef:
    return RemoteRef(name, lease_id, "a100", {"type": "numpy.ndarray"}, "the cell ran with --no-pull")


def test_only_refs_of_the_restored_lease_and_in_its_snapshot_follow() -> None:
    ns: dict[str, Any] = {"kept": ref("kept", "old"), "unsaved": ref("unsaved", "old"),
                          "elsewhere": ref("elsewhere", "other"), "plain": 3}
    lease = {"id": "new", "gpu_type": "h100",
             "restore": {"from_lease": "old", "names": ["kept", "elsewhere", "plain"], "unsaved": {"unsaved": "x"}}}
    assert adopt_restored(lease, ns) == ["kept"]
    assert ns["kept"].lease_id == "new" and ns["kept"].gpu_type == "h100"
    assert ns["unsaved"].lease_id == "old" and ns["elsewhere"].lease_id == "other" and ns["plain"] == 3
    assert adopt_restored({"id": "n2", "restore": {"from_lease": "new", "names": ["kept"], "error": "gone"}},
                          ns) == []
    assert adopt_restored({"id": "n3"}, ns) == []


def test_refs_of_live_leases_are_checked_before_leasing_the_others_after() -> None:
    assert waits_for_restore(ref("x", "ended"), {"live"})
    assert not waits_for_restore(ref("x", "live"), {"live"})
    assert not waits_for_restore(5, set())


def test_the_note_at_the_end_of_a_lease_says_what_was_kept() -> None:
    kept = {"gpu_type": "a100", "reason": "idle", "snapshot": {"state": "kept", "unsaved": {"f": "open file"}}}
    note = ended_note(kept, {"model", "f"})
    assert "kept and come back with the next lease" in note and "could not be saved: f" in note
    failed = {"gpu_type": "a100", "reason": "idle", "snapshot": {"state": "failed", "message": "9 GB, 2 GB free"}}
    note = ended_note(failed, {"model"})
    assert "could not be kept (9 GB, 2 GB free)" in note and "gone: model" in note
    assert "gone: model" in ended_note({"gpu_type": "a100", "reason": "kernel_died"}, {"model"})
    lost = ended_note({"gpu_type": "h100", "reason": "node_lost", "node": "10.0.0.7"}, {"model"})
    assert lost.startswith("jupyter-gpu: the h100 lease on 10.0.0.7 ended (node_lost)") and "gone: model" in lost
    assert " on " not in ended_note({"gpu_type": "a100", "reason": "idle", "node": "local"}, set())
