"""The demo end to end on one method with tiny settings: artifacts agree, report written."""

from kcompile.demo import run_demo


def test_demo_one_method(tmp_path):
    rows = run_demo(epochs=0, runs=2, out_dir=tmp_path, methods=(("filter", {"ratio": 0.5, "iters": 5}, "filter 0.5"),),
                    backends=("torch-dense", "torch-decoded", "onnxruntime-stock"), show_progress=False)
    (row,) = rows
    assert max(row["agreement"].values()) < 1e-4  # every runtime matches PyTorch
    assert {"torch-dense", "onnxruntime-stock"} <= set(row["latency_ms"])
    assert row["compression"] > 1 and row["energy_ratio"] > 1
    html = (tmp_path / "report.html").read_text()
    assert "filter 0.5" in html and "data:image/png;base64" in html and "src=\"http" not in html
    for f in ("filter.onnx", "filter-portable.onnx", "filter-llvm.so"):
        assert (tmp_path / f).stat().st_size > 0
