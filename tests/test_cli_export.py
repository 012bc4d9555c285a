"""`kcompile export` on good and bad input: files written, one-line errors, exit codes, no
partial file, inputs untouched."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kcompile import onnx_functions as F
from kcompile.checkpoint import save
from kcompile.cluster import cluster
from tiny_models import tiny
from cli_helpers import run, sha




def assert_clean_failure(code, err, expected_code, pattern, folder, out=None):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
    assert not [f for f in folder.iterdir() if f.name.startswith(".")], "temporary file left behind"


@pytest.fixture(scope="module")
def clustered_pth(tmp_path_factory):
    cm = cluster(tiny().eval(), "son", k=8, iters=3)
    p = tmp_path_factory.mktemp("cli") / "tiny_son.pth"
    save(cm, p)
    return p, cm


def test_export_zoo_model_dense(tmp_path, capsys):
    out = tmp_path / "d.onnx"
    code, o, e = run(["export", "zoo:digits-resnet", "--target", "onnx", "-o", str(out)], capsys)
    assert code == 0, e
    assert "wrote" in o and e == ""
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_export_clustered_checkpoint_custom_and_portable(tmp_path, clustered_pth, capsys):
    pth, cm = clustered_pth
    digest = sha(pth)
    out, port = tmp_path / "c.onnx", tmp_path / "p.onnx"
    code, o, e = run(["export", str(pth), "--target", "onnx", "-o", str(out), "--input-shape", "2,3,8,8"], capsys)
    assert code == 0 and e == "", e
    code, o, e = run(["export", str(pth), "--target", "onnx", "-o", str(port), "--input-shape", "2,3,8,8",
                      "--onnx-ops", "portable"], capsys)
    assert code == 0, e
    assert sha(pth) == digest
    m, p = onnx.load(out), onnx.load(port)
    assert {n.op_type for n in m.graph.node if n.domain == F.DOMAIN} == {F.CONV} and m.functions
    assert not p.functions and all(n.domain in ("", "ai.onnx") for n in p.graph.node)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2  # --input-shape fixes the batch
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    cm.eval()
    with torch.no_grad():
        ref = cm(torch.from_numpy(x)).numpy()
    for path in (out, port):
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert np.abs(y - ref).max() <= 1e-4 * np.ptp(ref)


def test_export_default_output_name(tmp_path, clustered_pth, capsys, monkeypatch):
    pth, _ = clustered_pth
    monkeypatch.chdir(tmp_path)
    code, o, e = run(["export", str(pth), "--target", "onnx", "--input-shape", "1,3,8,8"], capsys)
    assert code == 0, e
    assert (tmp_path / "tiny_son.onnx").exists()


def test_export_help(capsys):
    code, o, e = run(["export", "--help"], capsys)
    assert code == 0 and "--onnx-ops" in o and "--input-shape" in o


@pytest.mark.parametrize("argv,code,pattern", [
    (["--target", "tflite"], 2, "unsupported --target 'tflite'"),
    (["--target", "onnx", "--input-shape", "1,3,8"], 2, "invalid --input-shape '1,3,8'"),
    (["--target", "onnx", "--input-shape", "a,b,c,d"], 2, "invalid --input-shape 'a,b,c,d'"),
    (["--target", "onnx", "--onnx-ops", "fancy"], 2, "unknown --onnx-ops 'fancy'"),
])
def test_export_bad_options(tmp_path, capsys, argv, code, pattern):
    out = tmp_path / "x.onnx"
    c, o, e = run(["export", "zoo:digits-resnet", "-o", str(out), *argv], capsys)
    assert_clean_failure(c, e, code, pattern, tmp_path, out)


def test_export_unwritable_path(tmp_path, capsys):
    out = tmp_path / "missing" / "x.onnx"
    c, o, e = run(["export", "zoo:digits-resnet", "--target", "onnx", "-o", str(out)], capsys)
    assert_clean_failure(c, e, 1, "does not exist", tmp_path, out)
    c, o, e = run(["export", "zoo:digits-resnet", "--target", "onnx", "-o", str(tmp_path)], capsys)
    assert_clean_failure(c, e, 1, "is a directory", tmp_path)


def test_export_needs_input_shape_without_default(tmp_path, clustered_pth, capsys):
    pth, _ = clustered_pth
    out = tmp_path / "x.onnx"
    c, o, e = run(["export", str(pth), "--target", "onnx", "-o", str(out)], capsys)
    assert_clean_failure(c, e, 2, "pass --input-shape", tmp_path, out)


def test_export_wrong_input_shape_fails_without_partial_file(tmp_path, clustered_pth, capsys):
    pth, _ = clustered_pth
    out = tmp_path / "x.onnx"
    c, o, e = run(["export", str(pth), "--target", "onnx", "-o", str(out), "--input-shape", "1,5,8,8"], capsys)
    assert_clean_failure(c, e, 1, "cannot export the model for input shape (1, 5, 8, 8)", tmp_path, out)


def test_export_existing_file_replaced_only_on_success(tmp_path, clustered_pth, capsys):
    pth, _ = clustered_pth
    out = tmp_path / "x.onnx"
    out.write_bytes(b"old")
    c, o, e = run(["export", str(pth), "--target", "onnx", "-o", str(out), "--input-shape", "1,5,8,8"], capsys)
    assert c == 1 and out.read_bytes() == b"old"
    c, o, e = run(["export", str(pth), "--target", "onnx", "-o", str(out), "--input-shape", "1,3,8,8"], capsys)
    assert c == 0 and out.read_bytes() != b"old"


def test_export_tune_needs_llvm(tmp_path, clustered_pth, capsys):
    pth, _ = clustered_pth
    out = tmp_path / "m.onnx"
    code, o, e = run(["export", str(pth), "--target", "onnx", "--tune", "-o", str(out)], capsys)
    assert_clean_failure(code, e, 2, "--tune", tmp_path, out)
