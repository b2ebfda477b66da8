"""The user's default GPU type, shared by the JupyterLab sidebar and the ``%%gpu`` magic.

The sidebar's setting reaches kernels through a small file in the Jupyter data directory:
the server extension writes it, the magic reads it when a cell names no type. Both run on
the user's own machine (the notebook server and its kernels), so a file is all it takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir

DEFAULT_TYPE_ENV = "JUPYTER_GPU_DEFAULT_TYPE"


def default_type_file() -> Path:
    return Path(jupyter_data_dir()) / "jupyter_gpu" / "default_type.json"


def read_default_type() -> str:
    """The sidebar's choice, else ``$JUPYTER_GPU_DEFAULT_TYPE``, else ``any``."""
    try:
        chosen = json.loads(default_type_file().read_text()).get("gpu_type", "")
    except (OSError, ValueError, AttributeError):
        chosen = ""
    return str(chosen or os.environ.get(DEFAULT_TYPE_ENV, "") or "any")


def write_default_type(gpu_type: str) -> None:
    path = default_type_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"gpu_type": gpu_type}))
    os.replace(temporary, path)
