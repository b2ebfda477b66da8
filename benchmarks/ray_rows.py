"""Row 10 of the benchmark's table: the pool on a namespace Ray cluster (``scripts/bench --ray``).

benchmarks/ray_cluster.py measures (it needs root to make network namespaces, and says why not
where it cannot); this runs it as its own process, since it enters namespaces and its
``ray_cluster`` imports are the test harness's, and turns its results into table rows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from common import parse_emitted

SCRIPT = Path(__file__).resolve().parent / "ray_cluster.py"
#: per mode: x = 1 cells, first cells, bytes per transfer, transfers
SETTINGS = {"smoke": (5, 1, 10**6, 1), "quick": (30, 5, 10**8, 2), "full": (300, 10, 10**9, 3)}


def run(mode: str, timeout: float = 1800) -> dict[str, Any]:
    repeats, first_cells, size, transfers = SETTINGS[mode]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--emit", "--repeats", str(repeats), "--first-cells",
                           str(first_cells), "--transfer-bytes", str(size), "--transfers", str(transfers)],
                          capture_output=True, text=True, timeout=timeout)
    try:
        return dict(parse_emitted(proc.stdout))
    except ValueError:
        raise RuntimeError(f"ray_cluster.py exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}") from None


def table_rows(ray: Any) -> list[dict[str, Any]]:
    """benchmarks/run.py's row 10 (its ``add`` keywords), from :func:`measure`'s results."""
    if not isinstance(ray, dict) or "execute_x1" not in ray:
        return []
    x1, first, moved, death = (ray.get(key, {}) for key in ("execute_x1", "first_cell_warm", "transfer",
                                                             "node_death_to_lease_end"))
    size = f"{moved.get('bytes', 0) / 1e9:g} GB" if moved.get("bytes", 0) >= 10**9 else \
        f"{moved.get('bytes', 0) / 1e6:g} MB"
    rows = [
        {"what": "Ray: %%gpu h100 x = 1 on a held lease, kernel on another node", "system": "jupyter-gpu on Ray",
         "median": f"{x1['remote_ms']:.2f} ms", "p99": f"{x1['remote_p99_ms']:.2f} ms",
         "ratio_text": f"{x1['ratio']:.2f}x of local ({x1['local_ms']:.2f} ms)", "target": "<= 1.3x",
         "ok": x1["ratio"] <= 1.3},
        {"what": "  the same over the kernel websocket", "system": "jupyter-gpu on Ray",
         "median": f"{x1['websocket_remote_ms']:.2f} ms", "p99": f"local {x1['websocket_local_ms']:.2f} ms"},
        {"what": "Ray: first %%gpu cell of a new notebook, warm kernel on another node", "system": "jupyter-gpu on Ray",
         "median": f"{first['remote_ms']:.1f} ms", "p99": f"{first['remote_p99_ms']:.1f} ms",
         "ratio_text": f"local {first['local_ms']:.1f} ms", "target": "<= 50 ms", "ok": first["remote_ms"] <= 50},
        {"what": "  its parts over the websocket: lease, connect, execute", "system": "jupyter-gpu on Ray",
         "median": _parts(first["websocket_parts_ms"]), "p99": "local " + _parts(first["websocket_parts_local_ms"])},
    ]
    for direction in ("push", "pull"):
        share = moved[f"{direction}_share_of_tcp"]
        towards = "to" if direction == "push" else "from"
        rows.append({"what": f"Ray: {direction} numpy {size} {towards} a kernel on another node",
                     "system": "jupyter-gpu on Ray", "median": f"{moved[f'{direction}_mb_s']:,} MB/s",
                     "ratio_text": f"{share:.2f}x of TCP", "target": ">= 0.4x TCP", "ok": share >= 0.4})
        if f"websocket_{direction}_mb_s" in moved:
            rows.append({"what": "  the same over the websocket (c.RayPool.bulk_transfers = False)",
                         "system": "jupyter-gpu on Ray", "median": f"{moved[f'websocket_{direction}_mb_s']:,} MB/s",
                         "ratio_text": f"{moved[f'websocket_{direction}_share_of_tcp']:.2f}x of TCP"})
    rows.append({"what": f"Ray: send {size} one way between the same two namespaces", "system": "raw TCP (veth)",
                 "median": f"{moved['tcp_mb_s']:,} MB/s"})
    rows.append({"what": "Ray: kill -9 of a node to its lease ending (node_lost)", "system": "jupyter-gpu on Ray",
                 "median": f"{death['seconds']:.1f} s", "target": "<= 15 s", "ok": death["seconds"] <= 15})
    return rows


def _parts(parts: dict[str, float]) -> str:
    return ", ".join(f"{value:.1f}" for key, value in parts.items() if key != "total") + " ms"
