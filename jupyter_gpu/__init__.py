"""jupyter-gpu: run notebook cells on warm GPU kernels drawn from a shared pool.

Kept import-light: the gateway imports :mod:`jupyter_gpu.protocol` and must not pull in IPython.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext jupyter_gpu``: adds ``%%gpu`` and ``%gpu``."""
    import threading

    from .magic import GpuMagics
    from .remote import missing_local_modules

    ipython.register_magics(GpuMagics)  # type: ignore[attr-defined]
    # Each lease's first cell asks which heavy modules this kernel lacks: a scan of sys.path,
    # ~20 ms the first time in a process and ~1 ms once the import system has cached the
    # directories. Done once now, off the first cell's path.
    threading.Thread(target=missing_local_modules, name="jupyter-gpu-module-scan", daemon=True).start()


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext jupyter_gpu``: ends the leases (their variables kept for the notebook's
    next lease), stops the notice watcher's thread and removes ``%%gpu`` and ``%gpu``."""
    manager = ipython.magics_manager  # type: ignore[attr-defined]
    magics = manager.registry.pop("GpuMagics", None)
    if magics is not None:
        magics.close()
    for kind in ("line", "cell"):
        manager.magics[kind].pop("gpu", None)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The sidebar's REST API (``/jupyter-gpu/...``); imported only by jupyter_server."""
    return [{"module": "jupyter_gpu.server_extension"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The built JupyterLab extension, for ``jupyter labextension develop``."""
    return [{"src": "labextension", "dest": "jupyter-gpu"}]
