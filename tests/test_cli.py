"""The CLI on good and bad input: one-line errors, exit codes, no partial output, input untouched."""

import json
import subprocess
import sys

import pytest
import torch

from tiny_models import NoConvNet, tiny
from cli_helpers import run, sha

TINY = None




@pytest.fixture
def sd(tmp_path):
    """A TinyNet state_dict file and its --arch."""
    m = tiny()
    p = tmp_path / "tiny.pth"
    torch.save(m.state_dict(), p)
    return p, m.kcompile_arch["spec"]


def test_cluster_inspect_round_trip(tmp_path, sd, capsys):
    p, arch = sd
    out = tmp_path / "c.pth"
    code, o, e = run(["cluster", str(p), "--arch", arch, "--method", "son", "--k", "8", "-o", str(out)], capsys)
    assert code == 0, e
    code, o, e = run(["inspect", str(out), "--json", "--input-shape", "1,3,8,8"], capsys)
    rep = json.loads(o)
    assert code == 0 and {"name", "method", "unit", "K", "index_bits", "dense_bytes", "compressed_bytes"} <= set(rep["layers"][0])
    assert rep["compression_ratio"] > 1
    code, o, e = run(["inspect", str(out), "--input-shape", "1,3,8,8"], capsys)
    assert code == 0 and "son accounting" in o


def _assert_clean_failure(code, err, expected_code, pattern, tmp_path, out, inputs):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    assert not out.exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")], "temporary file left behind"
    for path, digest in inputs:
        assert sha(path) == digest


@pytest.mark.parametrize("case", ["random", "truncated", "empty", "missing"])
def test_corrupt_files(tmp_path, sd, capsys, case):
    p, arch = sd
    bad = tmp_path / "bad.pth"
    if case == "random":
        bad.write_bytes(bytes(range(256)) * 10)
    elif case == "truncated":
        bad.write_bytes(p.read_bytes()[:100])
    elif case == "empty":
        bad.write_bytes(b"")
    out = tmp_path / "o.pth"
    code, _, err = run(["cluster", str(bad), "--arch", arch, "--method", "son", "-o", str(out)], capsys)
    inputs = [(bad, sha(bad))] if bad.exists() else []
    _assert_clean_failure(code, err, 1, "bad.pth", tmp_path, out, inputs)


def test_pickle_refused_without_flag(tmp_path, capsys):
    p = tmp_path / "whole.pth"
    torch.save(tiny(), p)
    digest = sha(p)
    out = tmp_path / "o.pth"
    code, _, err = run(["cluster", str(p), "--method", "son", "--k", "4", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, 1, "--trust-pickle", tmp_path, out, [(p, digest)])


@pytest.mark.parametrize("argv,expected_code,pattern", [
    (["--method", "bogus"], 2, "unknown method"),
    (["--method", "son", "--k", "100000"], 2, "larger than the number of units"),
    (["--method", "dkm", "--k", "100000"], 2, "larger than the number of units"),
    (["--method", "son", "--ratio", "0.5"], 2, "no option"),
    (["--method", "kse", "--G", "0"], 2, "G >= 1"),
])
def test_bad_requests(tmp_path, sd, capsys, argv, expected_code, pattern):
    p, arch = sd
    out = tmp_path / "o.pth"
    code, _, err = run(["cluster", str(p), "--arch", arch, *argv, "-o", str(out)], capsys)
    _assert_clean_failure(code, err, expected_code, pattern, tmp_path, out, [(p, sha(p))])


def test_unknown_arch(tmp_path, sd, capsys):
    p, _ = sd
    out = tmp_path / "o.pth"
    code, _, err = run(["cluster", str(p), "--arch", "zoo:nope", "--method", "son", "-o", str(out)], capsys)
    assert code in (1, 2) and "nope" in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("fill,expected_code,pattern", [(float("nan"), 1, "NaN"), (float("inf"), 1, "Inf"), (0.0, 2, "non-zero")])
def test_bad_weights(tmp_path, capsys, fill, expected_code, pattern):
    m = tiny()
    with torch.no_grad():
        for mod in (m.stem, m.conv, m.dw):
            mod.weight.fill_(fill)
    p = tmp_path / "w.pth"
    torch.save(m.state_dict(), p)
    out = tmp_path / "o.pth"
    code, _, err = run(["cluster", str(p), "--arch", m.kcompile_arch["spec"], "--method", "son", "--k", "4", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, expected_code, pattern, tmp_path, out, [(p, sha(p))])


def test_no_clusterable_layer(tmp_path, capsys):
    p = tmp_path / "n.pth"
    torch.save(NoConvNet().state_dict(), p)
    out = tmp_path / "o.pth"
    code, _, err = run(["cluster", str(p), "--arch", f"{__file__.rsplit('/', 1)[0]}/tiny_models.py:NoConvNet",
                        "--method", "dkm", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, 1, "no layer", tmp_path, out, [(p, sha(p))])


def test_unwritable_output_and_bad_shape(tmp_path, sd, capsys):
    p, arch = sd
    code, _, err = run(["cluster", str(p), "--arch", arch, "--method", "son", "--k", "4", "-o", str(tmp_path / "no" / "o.pth")], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run(["inspect", str(p), "--arch", arch, "--input-shape", "1,3,x"], capsys)
    assert code == 2 and "--input-shape" in err


def test_console_script_help_and_error():
    r = subprocess.run([sys.executable, "-m", "kcompile.cli", "cluster", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--method" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kcompile.cli", "cluster", "zoo:digits-resnet", "-o", "/nonexistent/x.pth",
                        "--method", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_inspect_invalid_filters_and_retrain_flag(tmp_path, sd, capsys):
    p, arch = sd
    code, o, _ = run(["inspect", str(p), "--arch", arch, "--json", "--input-shape", "1,3,8,8", "--invalid-threshold", "1e9"], capsys)
    inv = json.loads(o)["invalid_filters"]
    assert code == 0 and inv["invalid"] == inv["filters"] == 8 + 8 + 16 + 16  # every filter is below 1e9
    code, _, err = run(["cluster", str(p), "--arch", arch, "--method", "son", "--retrain-epochs", "1", "--data", "digits",
                        "-o", str(tmp_path / "o.pth")], capsys)
    assert code == 2 and "dkm only" in err and not (tmp_path / "o.pth").exists()
