"""``/metrics`` in the Prometheus text format, written by hand (no client library needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jupyter_gpu.protocol import GRANTED, QUEUED

if TYPE_CHECKING:
    from .gateway import Gateway


def render_metrics(gateway: Gateway) -> str:
    core = gateway.service.core
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    states = {QUEUED: 0, GRANTED: 0}
    for lease in core.leases.values():
        states[lease.state] = states.get(lease.state, 0) + 1
    family("jupyter_gpu_leases", "gauge", "Leases by state.", [(f'{{state="{s}"}}', n) for s, n in states.items()])
    summaries = core.summaries()
    family(
        "jupyter_gpu_queue_length",
        "gauge",
        "Queued lease requests that could take this type.",
        [(f'{{gpu_type="{s.gpu_type}"}}', s.queued) for s in summaries],
    )
    family(
        "jupyter_gpu_warm_kernels",
        "gauge",
        "Warm kernels ready to lease.",
        [(f'{{gpu_type="{s.gpu_type}"}}', s.warm) for s in summaries],
    )
    family(
        "jupyter_gpu_gpus",
        "gauge",
        "GPUs by type and whether they are leased.",
        [
            (f'{{gpu_type="{s.gpu_type}",state="{state}"}}', n)
            for s in summaries
            for state, n in (("leased", s.leased), ("free", s.free))
        ],
    )
    totals = gateway.metering.totals()
    family(
        "jupyter_gpu_gpu_seconds_total",
        "counter",
        "GPU-seconds held by leases, metered.",
        [(f'{{gpu_type="{t}"}}', v) for t, v in sorted(totals.items())],
    )
    if gateway.instance_hours is not None:  # an autoscaled pool: what was paid for, and how much of it was used
        paid = gateway.instance_hours.totals()
        family("jupyter_gpu_instance_seconds_total", "counter",
               "Seconds the GPU instances launched for the pool were up.",
               [(f'{{gpu_type="{t}"}}', seconds) for t, (seconds, _, _) in paid.items()])
        family("jupyter_gpu_paid_gpu_seconds_total", "counter", "GPU-seconds of the instances launched for the pool.",
               [(f'{{gpu_type="{t}"}}', gpu_seconds) for t, (_, gpu_seconds, _) in paid.items()])
        family("jupyter_gpu_paid_cost_dollars_total", "counter",
               "What the launched instances cost at their on-demand list price (an upper bound for spot).",
               [(f'{{gpu_type="{t}"}}', cost) for t, (_, _, cost) in paid.items()])
        family("jupyter_gpu_paid_utilization", "gauge", "GPU-seconds leased over GPU-seconds launched.",
               [(f'{{gpu_type="{t}"}}', totals.get(t, 0.0) / gpu_seconds)
                for t, (_, gpu_seconds, _) in paid.items() if gpu_seconds > 0])
    family(
        "jupyter_gpu_kernel_starts_total",
        "counter",
        "Kernels started by the pool.",
        [("", gateway.service.kernel_starts)],
    )
    family(
        "jupyter_gpu_messages_relayed_total",
        "counter",
        "Kernel messages relayed to clients.",
        [("", gateway.relay_totals.messages_relayed)],
    )
    # path="node": relayed to or from a kernel's Ray node, past the websocket
    family("jupyter_gpu_bulk_bytes_total", "counter", "Bytes of completed uploads and downloads, by where they went.",
           [(f'{{direction="{direction}",path="{path}"}}', n)
            for direction, moved in (("push", gateway.uploads.bytes_received), ("pull", gateway.downloads.bytes_sent))
            for path, n in moved.items()])
    return "\n".join(lines) + "\n"
