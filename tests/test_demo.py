"""The demo end to end on one method with tiny settings: artifacts agree, report written;
the fresh-process torch check's verdict (no timing asserts: the figures are made up)."""

import pytest

from kcompile.bench import Timing
from kcompile.demo import _torch_check, run_demo


@pytest.mark.slow
def test_demo_one_method(tmp_path):
    rows = run_demo(epochs=0, runs=2, out_dir=tmp_path, methods=(("filter", {"ratio": 0.5, "iters": 5}, "filter 0.5"),),
                    backends=("torch-dense", "torch-decoded", "onnxruntime-stock"), show_progress=False)
    (row,) = rows
    assert max(row["agreement"].values()) < 1e-4  # every runtime matches PyTorch
    assert {"torch-dense", "onnxruntime-stock"} <= set(row["latency_ms"])
    assert row["compression"] > 1 and row["energy_ratio"] > 1
    assert row["torch_check"].get("fresh_median_ms", 0) > 0, row["torch_check"]
    html = (tmp_path / "report.html").read_text()
    assert "filter 0.5" in html and "data:image/png;base64" in html and "src=\"http" not in html
    assert "torch-dense check" in html
    for f in ("filter.onnx", "filter-portable.onnx", "filter-llvm.so", "filter-llvm.json"):
        assert (tmp_path / f).stat().st_size > 0


class _Alone:
    def __init__(self, timing=None, error=None):
        self.timing, self.error = timing, error

    def measure(self):
        if self.error:
            raise self.error
        return self.timing


def test_torch_check_flags_stalled_runs_only():
    rows = [{"label": "a", "latency_ms": {"torch-dense": 0.6}}, {"label": "b", "latency_ms": {"torch-dense": 30.0}},
            {"label": "c", "latency_ms": {"tvm-llvm": 0.2}}]
    check = _torch_check(_Alone(Timing(0.5, 0.4, 0.9, 20)), rows, threads=2)
    assert check["fresh_median_ms"] == 0.5 and check["fresh_min_ms"] == 0.4
    assert "0.600-30.000 ms" in check["note"] and "stalled for b (60x)" in check["note"] and "a (" not in check["note"]
    assert "stalled" not in _torch_check(_Alone(Timing(0.5, 0.4, 0.9, 20)), rows[:1], threads=2)["note"]
    assert "unavailable: boom" in _torch_check(_Alone(error=RuntimeError("boom")), rows, threads=2)["note"]
    assert _torch_check(None, rows, threads=2) == {}


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--runs", "0"], ["--epochs", "-1"]])
def test_cli_demo_bad_settings(argv, capsys, tmp_path):
    from cli_helpers import run

    code, o, e = run(["demo", *argv, "-o", str(tmp_path / "d")], capsys)
    assert code == 2 and e.count("\n") == 1 and "Traceback" not in e
    assert not (tmp_path / "d").exists()
