"""The package's public API (CONTRACT): names stay callable whatever was imported before."""

import importlib

import kcompile


def test_api_names_are_the_functions_even_after_submodule_imports():
    for mod in ("kcompile.cluster", "kcompile.export", "kcompile.compiler", "kcompile.loading", "kcompile.checkpoint",
                "kcompile.ort"):
        importlib.import_module(mod)
    for name in ("load", "cluster", "save", "export", "compile", "onnxruntime_session"):
        assert callable(getattr(kcompile, name)), name
    assert callable(kcompile.energy.estimate)
    assert kcompile.__version__
