"""`kcompile energy`: terminal table, --json contract fields, self-contained --html, bad input."""

import hashlib
import json
import os
import re

import pytest
import torch

from kcompile.checkpoint import save
from tiny_models import tiny
from cli_helpers import run



@pytest.fixture
def clustered(tmp_path):
    from kcompile.cluster import cluster

    p = tmp_path / "c.pth"
    save(cluster(tiny(), "kse", q=2), p)
    return p


def test_energy_table_and_json(tmp_path, clustered, capsys):
    out = tmp_path / "e.json"
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--json", str(out)], capsys)
    assert code == 0, e
    assert "Eyeriss" in o and "conv" in o and "not modelled" in o
    d = json.loads(out.read_text())
    assert d["layers"] and "total" in d
    for l in d["layers"]:
        for k in ("name", "kind", "macs", "fa_compute", "weight_rep", "activation_rep", "eyeriss", "joules_45nm"):
            assert k in l, k
    kinds = {l["name"]: l["kind"] for l in d["layers"]}
    assert kinds["conv"] == "clustered-conv" and kinds["stem"] == "conv" and kinds["fc"] == "linear"
    assert d["total"]["eyeriss"] < d["dense_total"]["eyeriss"]
    assert any(n["kind"] == "BatchNorm2d" and n["macs"] > 0 for n in d["not_modelled"])
    assert d["bits"] == {"weights": 8, "activations": 8}


def test_energy_html_is_self_contained(tmp_path, clustered, capsys):
    out = tmp_path / "e.html"
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--html", str(out), "--bits", "4,8"],
                     capsys)
    assert code == 0, e
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "data:image/png;base64," in text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert refs and all(r.startswith("data:") for r in refs)
    assert "<link" not in text and "<script" not in text
    assert "4-bit" in text and "eyeriss" in text.lower()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_html_written_atomically(tmp_path, clustered, capsys, monkeypatch):
    import kcompile.energy.html as h

    def boom(*a, **k):
        raise RuntimeError("render failed")

    out = tmp_path / "e.html"
    out.write_text("old")
    monkeypatch.setattr(h, "energy_html", boom)
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--html", str(out)], capsys)
    assert code == 1 and out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "e.html"]


@pytest.mark.parametrize("bits", ["8", "0,8", "8,64", "x,y", "8,8,8"])
def test_invalid_bits_exit_2(tmp_path, clustered, capsys, bits):
    out = tmp_path / "e.json"
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--bits", bits, "--json", str(out)],
                     capsys)
    assert code == 2
    assert e.count("\n") == 1 and "bit width" in e and "Traceback" not in e
    assert not out.exists()


@pytest.mark.parametrize("content", ["{oops", '{"normalised": {"dram": -5}}', '{"normalised": {"hbm": 1}}'])
def test_invalid_table_exit_2(tmp_path, clustered, capsys, content):
    t = tmp_path / "t.json"
    t.write_text(content)
    out = tmp_path / "e.json"
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--table", str(t), "--json", str(out)],
                     capsys)
    assert code == 2 and e.count("\n") == 1 and "t.json" in e
    assert not out.exists()


def test_user_table_and_input_unchanged(tmp_path, clustered, capsys):
    before = hashlib.sha256(clustered.read_bytes()).hexdigest()
    t = tmp_path / "hw.toml"
    t.write_text('name = "my-chip"\n[normalised]\ndram = 50\n')
    out = tmp_path / "e.json"
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--table", str(t), "--json", str(out)],
                     capsys)
    assert code == 0, e
    d = json.loads(out.read_text())
    assert d["table"]["name"] == "my-chip" and d["table"]["dram"] == 50
    assert hashlib.sha256(clustered.read_bytes()).hexdigest() == before


def test_bad_shape_and_missing_folder(tmp_path, clustered, capsys):
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8"], capsys)
    assert code == 2 and e.count("\n") == 1
    code, o, e = run(["energy", str(clustered), "--input-shape", "1,3,8,8", "--json",
                      str(tmp_path / "nope" / "e.json")], capsys)
    assert code == 1 and e.count("\n") == 1


def test_energy_zoo_default_shape(capsys):
    code, o, e = run(["energy", "zoo:digits-resnet"], capsys)
    assert code == 0, e
    assert "total" in o


def test_help(capsys):
    code, o, e = run(["energy", "--help"], capsys)
    assert code == 0 and "--bits" in o and "--table" in o and "--html" in o
