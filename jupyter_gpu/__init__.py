"""jupyter-gpu: run notebook cells on warm GPU kernels drawn from a shared pool.

Kept import-light: the gateway imports :mod:`jupyter_gpu.protocol` and must not pull in IPython.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext jupyter_gpu``: adds ``%%gpu`` and ``%gpu``."""
    from .magic import GpuMagics

    ipython.register_magics(GpuMagics)  # type: ignore[attr-defined]
