"""The gateway's malloc settings: freed megabytes are reused, not faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

#: In a fresh interpreter: apply the settings (or not), then copy a megabyte 200 times the way the
#: gateway's read path does (a buffer, then bytes of it), and print the minor faults those took.
COPIES = """
import resource, sys
from kernel_gateway.heap import keep_freed_memory
print(keep_freed_memory())
payload = bytes(1_000_000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    copy = bytes(bytearray(payload))
    del copy
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def copy_faults(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", COPIES], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_copies_of_a_megabyte_reuse_warm_pages() -> None:
    applied, faults = copy_faults()
    assert applied == "True"
    # a megabyte is ~245 pages: faulting each copy in again would be ~49,000 faults
    assert faults < 1000, f"{faults} minor faults for 200 copies of 1 MB"


def test_an_operators_own_malloc_setting_is_left_alone() -> None:
    applied, _ = copy_faults(MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
