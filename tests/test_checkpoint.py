"""Saving and loading clustered models: self-describing, weights_only, bit-identical."""

import hashlib

import pytest
import torch

import kcompile
from kcompile.cluster import cluster
from kcompile.errors import KcompileError
from kcompile.layers import clustered_layers
from tiny_models import tiny

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
METHODS = [("son", {"k": 8, "transforms": 4}), ("kse", {"G": 3}), ("dkm", {"rate": 0.2, "sparsity": 0.1}),
           ("filter", {"ratio": 0.5})]


@pytest.mark.parametrize("method,opts", METHODS)
def test_round_trip_is_bit_identical(tmp_path, method, opts):
    cm = cluster(tiny(width=16), method, iters=5, **opts).eval()
    path = tmp_path / "m.pth"
    kcompile.save(cm, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "kcompile-clustered" and raw["method"]["method"] == method
    back = kcompile.load(str(path))
    with torch.no_grad():
        assert torch.equal(cm(X), back(X))
    assert [n for n, _ in clustered_layers(back)] == [n for n, _ in clustered_layers(cm)]
    for (_, a), (_, b) in zip(clustered_layers(cm), clustered_layers(back)):
        assert a.index.dtype == b.index.dtype and torch.equal(a.index, b.index)


def test_shared_codebook_stays_shared_after_load(tmp_path):
    cm = cluster(tiny(), "son", k=8, iters=5)
    kcompile.save(cm, tmp_path / "m.pth")
    back = kcompile.load(str(tmp_path / "m.pth"))
    assert back.stem.codebook is back.conv.codebook
    assert sum(1 for _ in back.parameters()) == sum(1 for _ in cm.parameters())


def test_save_is_atomic_and_input_untouched(tmp_path, monkeypatch):
    cm = cluster(tiny(), "son", k=8, iters=5)
    target = tmp_path / "out.pth"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        kcompile.save(cm, target)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KcompileError, match="does not exist"):
        kcompile.save(cm, tmp_path / "nope" / "x.pth")


def test_cluster_leaves_source_model_unchanged():
    m = tiny()
    before = hashlib.sha256(b"".join(t.numpy().tobytes() for t in m.state_dict().values())).hexdigest()
    cluster(m, "dkm", rate=0.3, iters=5)
    after = hashlib.sha256(b"".join(t.numpy().tobytes() for t in m.state_dict().values())).hexdigest()
    assert before == after
