"""The sandbox builder: its settings, and real bubblewrap runs of the commands it builds.

The attacks from one user's kernel on another's run end to end in tests/e2e/test_sandbox.py;
here: settings errors, the gateway's state hidden even where it lies inside a directory the
kernel must read, the CPU limit, and uids of real accounts never handed out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pool_manager.cgroups import CgroupError, CgroupLimiter, KernelLimits
from pool_manager.sandbox import Sandbox, UidPool, parse_memory, parse_uid_range

#: Why bubblewrap cannot sandbox here ('' where it can): not installed, or no namespaces.
NO_SANDBOX = "; ".join(Sandbox.probe("auto").isolation.warnings) if shutil.which("bwrap") else "no bubblewrap"
needs_bwrap = pytest.mark.skipif(bool(NO_SANDBOX), reason=NO_SANDBOX)


def test_sizes_and_uid_ranges_parse_and_bad_ones_say_what_to_write() -> None:
    assert parse_memory("64G") == 64 * 2**30
    assert parse_memory("512m") == 512 * 2**20
    assert parse_memory("1.5GiB") == 3 * 2**29
    assert parse_memory("") == 0
    with pytest.raises(ValueError, match=r"'lots' is not a size: write e.g. '64G'"):
        parse_memory("lots")
    assert parse_uid_range("60000-60999") == range(60000, 61000)
    for bad in ("0-100", "60999-60000", "60000", "60000-200000"):
        with pytest.raises(ValueError, match=rf"{bad!r} is not a range of unprivileged uids .*write e.g."):
            parse_uid_range(bad)
    with pytest.raises(ValueError, match=r"sandbox 'maybe' is not one of auto, required, off"):
        Sandbox.probe("maybe")


def test_a_uid_runs_one_kernel_of_the_machine_at_a_time_and_never_a_real_accounts(tmp_path: Path) -> None:
    nobody = 65534  # an account on every Debian system
    first = UidPool(range(nobody - 2, nobody + 1), lock_dir=str(tmp_path))
    second = UidPool(range(nobody - 2, nobody + 1), lock_dir=str(tmp_path))  # another gateway of the machine
    assert first.take() == nobody - 2
    assert second.take() == nobody - 1  # nobody - 2 is held by the first gateway's kernel
    with pytest.raises(RuntimeError, match=r"no free kernel uid in 65532-65534: every one runs a kernel. Widen"):
        second.take()  # 65534 is nobody's
    first.give_back(nobody - 2)
    assert second.take() == nobody - 2


def test_the_kernel_environment_keeps_nothing_of_the_gateways_secrets(tmp_path: Path) -> None:
    sandbox = Sandbox.probe("auto", parent_dir=str(tmp_path))
    if not sandbox.enabled:
        pytest.skip("bubblewrap is not usable here")
    kernel = sandbox.prepare("k0", None)
    try:
        env = sandbox.environment(kernel, {"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "s", "JUPYTER_GPU_TOKEN": "t",
                                           "LC_ALL": "C", "SSH_AUTH_SOCK": "/x"}, {"JUPYTER_GPU_SLOT": "k0"})
        assert env == {"PATH": "/usr/bin", "LC_ALL": "C", "HOME": str(kernel.home), "TMPDIR": "/tmp",
                       "USER": "jupyter", "JUPYTER_GPU_SLOT": "k0"}
    finally:
        sandbox.release(kernel)
        sandbox.close()


def run_inside(sandbox: Sandbox, code: str) -> dict[str, object]:
    kernel = sandbox.prepare(f"k{time.monotonic_ns()}", None)
    try:
        argv = sandbox.command(kernel, [sys.executable, "-c", code], ())
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                env=sandbox.environment(kernel, dict(os.environ), {}))
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))
    finally:
        sandbox.release(kernel)


@needs_bwrap
def test_gateway_state_inside_a_readable_directory_is_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Python path (read-only in the sandbox) that also holds the gateway's database and users file.
    site = tmp_path / "site"
    (site / "state").mkdir(parents=True)
    (site / "helper_module.py").write_text("VALUE = 42\n")
    (site / "state" / "usage.sqlite").write_text("secret usage")
    (site / "users.json").write_text("secret tokens")
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(site)])))
    sandbox = Sandbox.probe("required", parent_dir=str(tmp_path / "kernels"),
                            hidden=[str(site / "state"), str(site / "users.json")])
    (tmp_path / "kernels").mkdir()
    try:
        seen = run_inside(sandbox, f"""
import json, os, helper_module
def read(path):
    try:
        return open(path).read()
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({{"module": helper_module.VALUE, "db": read({str(site / "state" / "usage.sqlite")!r}),
                   "users": read({str(site / "users.json")!r}), "pid": os.getpid()}}))
""")
    finally:
        sandbox.close()
    assert seen == {"module": 42, "db": "FileNotFoundError", "users": "", "pid": 2}


@needs_bwrap
def test_the_gateways_working_directory_is_not_exposed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `python -m jupyter_gpu.cli gateway` started in an operator's home puts it on sys.path
    home = tmp_path / "operator"
    home.mkdir()
    (home / "id_rsa").write_text("private key")
    monkeypatch.chdir(home)
    monkeypatch.setattr(sys, "path", [str(home), *sys.path])
    sandbox = Sandbox.probe("required", parent_dir=str(tmp_path))
    try:
        seen = run_inside(sandbox, f"""
import json
try:
    found = open({str(home / "id_rsa")!r}).read()
except OSError as exc:
    found = type(exc).__name__
print(json.dumps({{"key": found}}))
""")
    finally:
        sandbox.close()
    assert seen == {"key": "FileNotFoundError"}


@needs_bwrap
def test_a_cpu_limit_holds_a_busy_kernel_to_its_share(tmp_path: Path) -> None:
    try:
        CgroupLimiter.probe(KernelLimits(cpus=0.05)).close()
    except CgroupError as exc:
        pytest.skip(f"no control group for CPU limits here: {exc}")
    sandbox = Sandbox.probe("required", cpus=0.05, parent_dir=str(tmp_path))
    try:
        used = run_inside(sandbox, """
import json, time
end = time.monotonic() + 1.5
while time.monotonic() < end:
    pass
print(json.dumps({"cpu": time.process_time()}))
""")
    finally:
        sandbox.close()
    # a twentieth of a core for 1.5 s and the interpreter's start: about 0.1 s (unlimited: 1.5 s on an idle machine)
    assert float(used["cpu"]) < 0.25
