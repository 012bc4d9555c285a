"""`kcompile bench` / kcompile.bench on a tiny model with the torch backends (no timing asserts)."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from kcompile.bench import (BACKENDS, BackendUnavailable, Case, densify, layer_suite, make_runner,
                            parse_backends, run_bench, time_fn)
from kcompile.checkpoint import save
from kcompile.errors import UsageError
from tiny_models import tiny
from cli_helpers import run

RECORD_KEYS = ("model", "layer", "backend", "batch", "threads", "median_ms", "min_ms", "max_ms", "runs")


def skip_notes(res):
    """The notes about backends (the machine-load note comes and goes with other jobs)."""
    return [n for n in res.notes if not n.startswith("load average")]



@pytest.fixture(scope="module")
def clustered():
    from kcompile.cluster import cluster

    return cluster(tiny(), "kse", q=2, iters=5)


def test_parse_backends():
    assert parse_backends("torch") == ("torch-dense", "torch-decoded")
    assert parse_backends("numba,torch-dense") == ("torch-dense", "numba")
    assert parse_backends(None) == BACKENDS[:6]  # no GPU here: CPU backends only
    assert parse_backends("all") == BACKENDS
    with pytest.raises(UsageError):
        parse_backends("cuda-magic")
    with pytest.raises(UsageError):
        parse_backends(",")


def test_densify_matches_clustered(clustered):
    d = densify(clustered)
    assert not any(callable(getattr(m, "clustered_weight", None)) for m in d.modules())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(d(x), clustered.eval()(x), atol=1e-5)
    assert any(callable(getattr(m, "clustered_weight", None)) for m in clustered.modules())  # input untouched


def test_time_fn_counts_runs():
    calls = []
    t = time_fn(lambda x: calls.append(1), np.zeros(1), runs=4, warmup=2)
    assert len(calls) == 6 and t.runs == 4 and t.min_ms <= t.median_ms <= t.max_ms


def test_missing_backend_is_skipped_with_a_note(clustered, monkeypatch):
    import kcompile.bench as B

    def broken(*a, **k):
        raise BackendUnavailable("not built yet")

    monkeypatch.setattr(B, "_compiled_runner", broken)
    case = Case("tiny", None, clustered, (1, 3, 8, 8), "kse")
    res = run_bench([case], ("torch-dense", "tvm-llvm"), threads=1, runs=2, warmup=0, show_progress=False)
    assert [r["backend"] for r in res.records] == ["torch-dense"]
    notes = skip_notes(res)
    assert len(notes) == 1 and "tvm-llvm" in notes[0] and "not built yet" in notes[0]


def test_cuda_backends_skipped_without_gpu(clustered):
    case = Case("tiny", "conv", clustered, (1, 3, 8, 8), "kse")
    res = run_bench([case], ("numba-cuda", "tvm-cuda"), threads=1, runs=1, warmup=0, show_progress=False)
    assert [r["backend"] for r in res.records] == ["torch-dense"]
    notes = skip_notes(res)
    assert len(notes) == 2 and all("GPU" in n for n in notes)


def test_failing_backend_does_not_crash(clustered, monkeypatch):
    import kcompile.bench as B

    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(B, "_numba_runner", boom)
    case = Case("tiny", None, clustered, (1, 3, 8, 8), "kse")
    res = run_bench([case], ("numba",), threads=1, runs=2, warmup=0, show_progress=False)
    assert [r["backend"] for r in res.records] == ["torch-dense"]
    notes = skip_notes(res)
    assert len(notes) == 1 and "kernel exploded" in notes[0] and "\n" not in notes[0]


def test_cli_bench_torch_backends_contract_json(tmp_path, clustered, capsys):
    p = tmp_path / "c.pth"
    save(clustered, p)
    out = tmp_path / "b.json"
    html = tmp_path / "b.html"
    code, o, e = run(["bench", str(p), "--input-shape", "1,3,8,8", "--backends", "torch", "--runs", "3",
                      "--warmup", "1", "--threads", "1", "--batch", "2", "--per-layer", "--json", str(out),
                      "--html", str(html)], capsys)
    assert code == 0, e
    recs = json.loads(out.read_text())
    assert isinstance(recs, list) and recs
    for r in recs:
        for k in RECORD_KEYS:
            assert k in r, k
        assert r["batch"] == 2 and r["threads"] == 1 and r["runs"] == 3
        assert r["backend"] in ("torch-dense", "torch-decoded")
        assert r["layer"] is not None and r["dense_median_ms"] is not None
        assert r["max_abs_err"] < 1e-4
    layers = {r["layer"] for r in recs}
    assert {"conv/dense", "conv/kse", "stem/dense"} <= layers
    text = html.read_text()
    assert "data:image/png;base64," in text and 'src="http' not in text and "href=" not in text


def test_cli_bench_whole_model_record_has_null_layer(tmp_path, clustered, capsys):
    p = tmp_path / "c.pth"
    save(clustered, p)
    out = tmp_path / "b.json"
    code, o, e = run(["bench", str(p), "--input-shape", "1,3,8,8", "--backends", "torch-decoded", "--runs", "2",
                      "--warmup", "0", "--json", str(out)], capsys)
    assert code == 0, e
    recs = json.loads(out.read_text())
    assert {r["backend"] for r in recs} == {"torch-dense", "torch-decoded"}  # baseline always in the run
    assert all(r["layer"] is None for r in recs)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--suite", "layers", "--runs", "0"],
                                  ["bench", "--suite", "layers", "--backends", "gpu9000"],
                                  ["bench", "zoo:nope", "--backends", "torch"]])
def test_cli_bench_bad_input(argv, capsys, tmp_path):
    code, o, e = run(argv + ["--json", str(tmp_path / "x.json")], capsys)
    assert code in (1, 2) and e.count("\n") == 1 and "Traceback" not in e
    assert not (tmp_path / "x.json").exists()


def test_layer_suite_cases_small():
    from kcompile.bench import SUITE_METHODS

    methods = tuple(m for m in SUITE_METHODS if m[1] in ("kse", "filter"))
    cases = layer_suite(shapes=((8, 8, 6, 1),), methods=methods, iters=3)
    assert [c.layer.split("/", 1)[1] for c in cases] == ["dense", "kse-q8", "kse-qO/4", "filter-n=O/4"]
    assert all(any(callable(getattr(m, "clustered_weight", None)) for m in c.module.modules()) for c in cases[1:])
    res = run_bench(cases, ("torch-decoded",), threads=1, runs=2, warmup=0, show_progress=False)
    assert len(res.records) == 2 * len(cases)
    assert all(r["dense_median_ms"] is not None and "eyeriss" in r for r in res.records)
    corr = res.correlations("eyeriss")
    assert set(corr) == {"torch-dense", "torch-decoded"} and all(-1 <= c["spearman"] <= 1 for c in corr.values())


def test_time_blocks_rounds_of_blocks_and_failures():
    from kcompile.bench import time_blocks

    calls, errors = [], []

    def fn(name, fail_after=None):
        def run(x):
            calls.append(name)
            if fail_after is not None and calls.count(name) > fail_after:
                raise RuntimeError("boom")
        return run

    times = time_blocks({"a": fn("a"), "b": fn("b"), "c": fn("c", fail_after=3)}, np.zeros(1), runs=5, rounds=2,
                        settle=0, on_error=lambda name, e: errors.append((name, str(e))))
    assert len(times["a"]) == len(times["b"]) == 5  # split 3 + 2 over the rounds
    # round 1: a's block (1 untimed + 3 timed), then b's, then c's (fails on its 4th call); round 2 skips c
    assert calls == ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["a"] * 3 + ["b"] * 3
    assert errors == [("c", "boom")] and len(times["c"]) == 2
    calls.clear()
    times = time_blocks({"a": fn("a")}, np.zeros(1), runs=3, rounds=5, settle=0, rewarm=False)
    assert calls == ["a"] * 3 and len(times["a"]) == 3  # never more rounds than runs


def test_case_runners_replace_the_built_backend(clustered):
    calls = []

    def mine(x):
        calls.append(x.shape)
        with torch.no_grad():
            return clustered.eval()(torch.from_numpy(x)).numpy()

    case = Case("tiny", None, clustered, (1, 3, 8, 8), "kse", runners={"onnxruntime-stock": mine})
    res = run_bench([case], ("torch-dense", "onnxruntime-stock"), threads=1, runs=2, warmup=1, show_progress=False)
    rec = {r["backend"]: r for r in res.records}
    assert set(rec) == {"torch-dense", "onnxruntime-stock"} and rec["onnxruntime-stock"]["runs"] == 2
    assert rec["onnxruntime-stock"]["max_abs_err"] < 1e-5
    assert len(calls) == 1 + 1 + 2 + 2  # check, warm-up, one re-warm per round, timed
