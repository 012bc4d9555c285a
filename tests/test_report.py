"""`inspect`: storage, method accountings and FLOP counts against hand computations."""

import math

import pytest
import torch

from kcompile.cluster import cluster
from kcompile.report import inspect_model, method_ratio
from tiny_models import tiny


def test_son_formula_matches_paper_accounting():
    cm = cluster(tiny(), "son", k=4, iters=5)
    cws = [m.clustered_weight() for m in (cm.stem, cm.conv, cm.dw)]
    N = 8 * 3 + 8 * 8 + 16
    assert method_ratio("son", cws)["son"] == pytest.approx(N * 32 * 9 / (N * (2 + 16) + 4 * 32 * 9))


def test_inspect_totals_and_macs():
    m = tiny()
    cm = cluster(m, "filter", ratio=0.5, iters=5)
    rep = inspect_model(cm, (1, 3, 8, 8))
    rows = {r["name"]: r for r in rep["layers"]}
    # conv: 8x8x3x3 at 8x8 output; 4 distinct filters
    assert rows["conv"]["macs_dense"] == 8 * 8 * 9 * 64
    assert rows["conv"]["macs_shared"] == 4 * 8 * 9 * 64
    assert rows["conv"]["compressed_bytes"] == math.ceil((4 * 72 * 32 + 8 * 2) / 8)
    dense_params = sum(p.numel() for p in m.parameters()) * 4
    assert rep["dense_bytes"] == dense_params
    assert rep["compression_ratio"] > 1
    # fc MACs counted once per image, dense
    assert rep["macs_dense"] == 8 * 27 * 64 + 8 * 72 * 64 + 16 * 8 * 64 + 16 * 9 * 16 + 160


def test_dkm_entropy_coded_ratio_exceeds_plain():
    cm = cluster(tiny(), "dkm", k=16, sparsity=0.5, iters=5)
    r = inspect_model(cm, (1, 3, 8, 8))["method_ratios"]
    assert r["dkm_entropy_coded"] > r["dkm_plain"] > 1
