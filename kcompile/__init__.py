"""kcompile: a deployment compiler for clustered CNNs.

Public API (CONTRACT.md): ``load``, ``cluster``, ``save``, ``export``, ``compile``,
``onnxruntime_session``, ``energy``. Attributes are imported lazily so that
``kcompile.kernels`` / ``kcompile.energy`` (leaves that use only ``kcompile.ir``) and the CLI's
``--help`` stay light.
"""

__version__ = "0.1.0"

# `cluster` and `export` are both submodules and API functions: bind the functions eagerly, so
# that the import system (which sets package.submodule on first import) never shadows them.
from .cluster import cluster  # noqa: E402
from .export import export  # noqa: E402

_LAZY = {
    "load": ("kcompile.loading", "load_model"),
    "save": ("kcompile.checkpoint", "save"),
    "compile": ("kcompile.compiler", "compile_model"),
    "onnxruntime_session": ("kcompile.ort", "onnxruntime_session"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("energy", "kernels"):
        import importlib

        return importlib.import_module(f"kcompile.{name}")
    raise AttributeError(f"module 'kcompile' has no attribute {name!r}")
