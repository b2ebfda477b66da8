"""The wheel carries the JupyterLab extension and turns both halves on: ``pip install`` is the only step."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import jupyter_gpu

ROOT = Path(__file__).resolve().parent.parent
DATA = f"jupyter_gpu-{jupyter_gpu.__version__}.data/data"
LABEXTENSION = f"{DATA}/share/jupyter/labextensions/jupyter-gpu"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def run(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure the test says what it printed."""
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT))
    (built,) = out.glob("jupyter_gpu-*.whl")
    return built


def test_the_wheel_holds_the_built_extension_and_the_server_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"{LABEXTENSION}/package.json" in names
    assert f"{LABEXTENSION}/install.json" in names
    assert f"{LABEXTENSION}/static/style.js" in names
    assert f"{LABEXTENSION}/schemas/jupyter-gpu/plugin.json" in names
    assert any(name.startswith(f"{LABEXTENSION}/static/remoteEntry.") for name in names)
    config = json.loads(zipfile.ZipFile(wheel).read(f"{DATA}/etc/jupyter/jupyter_server_config.d/jupyter_gpu.json"))
    assert config == {"ServerApp": {"jpserver_extensions": {"jupyter_gpu": True}}}
    # one copy of each file, in share/ only
    assert not any(name.startswith("jupyter_gpu/labextension/") for name in names)
    assert not any(name.startswith(("labextension/", "node_modules/")) for name in names)


def test_pip_install_alone_enables_the_lab_and_the_server_extension(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    run(str(bin_dir / "pip"), "install", "-q", str(wheel), "jupyterlab>=4.2")

    def jupyter(*args: str) -> str:
        return run(str(bin_dir / "jupyter"), *args, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})

    lab = jupyter("labextension", "list")
    assert "jupyter-gpu v" in lab and "enabled" in lab.split("jupyter-gpu v")[1].splitlines()[0]
    assert "OK" in lab.split("jupyter-gpu v")[1].splitlines()[0]
    server = jupyter("server", "extension", "list")
    assert "jupyter_gpu enabled" in " ".join(server.replace("\x1b[32m", "").replace("\x1b[0m", "").split())
    assert f"jupyter_gpu {jupyter_gpu.__version__} OK" in server.replace("\x1b[32m", "").replace("\x1b[0m", "")


def test_the_npm_package_and_the_python_package_share_one_version() -> None:
    # the extension's version shows in `jupyter labextension list`; it is kept by hand in package.json
    assert json.loads((ROOT / "package.json").read_text())["version"] == jupyter_gpu.__version__
