"""kcompile.energy: Deep k-Means metrics, Eyeriss-style counts, tables, not-modelled layers."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from kcompile.energy import (Accesses, EnergyTable, LayerSpec, estimate, estimate_specs, fa, fa_mac,
                             load_table, parse_bits)
from kcompile.energy.costs import default_table
from kcompile.energy.eyeriss import accesses
from kcompile.energy.layers import op_counts
from kcompile.errors import UsageError
from kcompile.ir import ClusteredWeight
from kcompile.layers import ClusteredConv2d
from tiny_models import tiny


def one_conv(cin=1, cout=1, k=3, bias=False):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=bias))


def row_cw(K, O=4, C=2, seed=0):
    """A row-unit IR of a (O, C, 3, 3) weight whose index is o % K (hand-countable)."""
    g = torch.Generator().manual_seed(seed)
    idx = (torch.arange(O).view(O, 1, 1) % K).expand(O, C, 3).contiguous().to(torch.uint8)
    return ClusteredWeight(unit="row", shape=(O, C, 3, 3), codebook=torch.randn(K, 3, generator=g),
                           index=idx, method="dkm")


# ------------------------------------------------------------------ Deep k-Means metrics by hand
def test_fa_by_hand():
    # FA(9) at 8x8 bits: 9*64 + 8*(8+8+4-1) = 728
    assert fa(9, 8, 8) == 728
    assert fa(9, 4, 2) == 9 * 8 + 8 * (2 + 4 + 4 - 1)
    assert fa(1, 8, 8) == 64
    assert fa_mac(8, 8) == 80


def test_one_layer_dense_metrics_by_hand():
    rep = estimate(one_conv(), input_shape=(1, 1, 3, 3), bits=(8, 8))
    assert len(rep.layers) == 1 and not rep.not_modelled
    l = rep.layers[0]
    assert l.macs == 9 and l.dense_macs == 9
    assert l.dkm.fa_compute == 728
    assert l.dkm.weight_rep == 1 * 9 * 8          # N_w = 1 use, |W| = 9, B_w = 8
    assert l.dkm.activation_rep == 1 * 9 * 8      # 9 activations each used once, B_x = 8
    assert l.dkm.mac_units == pytest.approx(728 / 80 + 6 * (72 / 8 + 72 / 8))


def test_bias_adds_one_to_D():
    rep = estimate(one_conv(bias=True), input_shape=(1, 1, 3, 3))
    assert rep.layers[0].dkm.fa_compute == fa(10, 8, 8)


def test_clustered_layer_metrics_by_hand():
    cw = row_cw(K=2)
    layer = ClusteredConv2d(cw)
    rep = estimate(nn.Sequential(layer), input_shape=(1, 2, 5, 5))
    l = rep.layers[0]
    assert l.kind == "clustered-conv" and l.form == "conv-then-add"
    # storage: codebook 2*3*8 + 24 rows * 1 index bit = 72 bits; used at P = 9 positions
    assert l.weight_bits == 72
    assert l.dkm.weight_rep == 9 * 72
    assert l.dkm.activation_rep == 4 * 18 * 9 * 8          # unchanged by sharing
    # products: 2 distinct centroids per (channel, row) * 6 (c, r) * 3 taps * 9 positions = 324
    # dots 36 of D = 18: additions kept, adder width 8+8+5-1 = 20
    assert l.dkm.fa_compute == 324 * 64 + 36 * 17 * 20
    assert l.dense.dkm.fa_compute == 36 * fa(18, 8, 8)
    assert l.dense.dkm.weight_rep == 9 * 4 * 18 * 8


# ------------------------------------------------------------------ Eyeriss counts by hand
def test_eyeriss_counts_dense_by_hand():
    spec = LayerSpec("c", "conv", (4, 2, 3, 3), (1, 2, 5, 5), (3, 3))
    a = accesses(spec, 8, 8)
    assert a.macs == 648                  # 4*2*3*3*9
    assert a.rf == 3 * 648
    assert a.array == 4 * 2 * 3 * 9       # one transfer per 1-D row result
    # buffer: inputs 50 * ceil(4/16) + weights 72 words * (N*H' = 3) + psums 36 * (2*1 - 1)
    assert a.buffer == 50 + 72 * 3 + 36
    assert a.dram == 50 + 72 + 36
    e = default_table().normalised(a)
    assert e.total == 648 + 1944 + 2 * 216 + 6 * 302 + 200 * 158


def test_eyeriss_counts_clustered_by_hand():
    spec = LayerSpec("c", "clustered-conv", (4, 2, 3, 3), (1, 2, 5, 5), (3, 3), cw=row_cw(K=2))
    ops = op_counts(spec)
    assert (ops.products, ops.accum, ops.macs) == (324, 216, 540)
    a = accesses(spec, 8, 8)
    assert a.macs == 540 and a.mults == 324
    assert a.rf == 3 * 324 + 216 * (2 + 1 / 8)      # index read: 1 bit of an 8-bit word
    assert a.array == 216
    assert a.buffer == 50 + 9 * 3 + 36               # 72 stored bits = 9 weight words
    assert a.dram == 50 + 9 + 36
    assert default_table().normalised(a).total == pytest.approx(540 + 1431 + 432 + 6 * 113 + 200 * 95)


def test_accesses_add_up():
    a, b = Accesses(macs=1, rf=2, dram=3), Accesses(macs=4, buffer=5)
    s = sum([a, b])
    assert s == Accesses(macs=5, rf=2, buffer=5, dram=3)
    rep = estimate(tiny(), input_shape=(1, 3, 8, 8))
    assert rep.total["eyeriss"] == pytest.approx(sum(l.eyeriss.total for l in rep.layers))
    assert rep.total["dkm_mac_units"] == pytest.approx(sum(l.dkm.mac_units for l in rep.layers))


# ------------------------------------------------------------------ sharing is monotone in K
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), O=st.sampled_from([8, 16]), C=st.sampled_from([2, 4]))
def test_sharing_reduces_estimates_monotonically_with_K(seed, O, C):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 16, (O, C, 3), generator=g)
    prev = None
    for K in (1, 2, 4, 8, 16):  # x % K is a function of x % 2K: distinct products nest
        cw = ClusteredWeight(unit="row", shape=(O, C, 3, 3), codebook=torch.randn(K, 3, generator=g),
                             index=(base % K).to(torch.uint8), method="dkm")
        spec = LayerSpec("c", "clustered-conv", (O, C, 3, 3), (1, C, 8, 8), (6, 6), cw=cw)
        rep = estimate_specs([spec])
        cur = rep.layers[0]
        dense = cur.dense
        assert cur.eyeriss.total <= dense.eyeriss.total + 1e-9
        assert cur.dkm.mac_units <= dense.dkm.mac_units + 1e-9
        if prev is not None:
            assert cur.eyeriss.total >= prev.eyeriss.total - 1e-9
            assert cur.dkm.mac_units >= prev.dkm.mac_units - 1e-9
            assert cur.joules.total >= prev.joules.total - 1e-18
        prev = cur


def test_clustered_model_cheaper_than_dense_for_every_method():
    from kcompile.cluster import cluster

    m = tiny()
    for method, opts in (("dkm", {"rate": 0.1, "iters": 3}), ("kse", {"q": 2}), ("son", {"k": 8}),
                         ("filter", {"select": "fixed", "ratio": 0.5})):
        rep = estimate(cluster(m, method, **opts), input_shape=(1, 3, 8, 8))
        assert rep.total["eyeriss"] < rep.dense_total["eyeriss"], method
        assert rep.total["dkm_mac_units"] < rep.dense_total["dkm_mac_units"], method


def test_filter_sharing_across_depthwise_groups_saves_nothing():
    # two identical filters of a depthwise conv still see different channels
    cw = ClusteredWeight(unit="filter", shape=(2, 1, 3, 3), codebook=torch.randn(1, 9),
                         index=torch.zeros(2, dtype=torch.uint8), method="filter")
    spec = LayerSpec("dw", "clustered-conv", (2, 1, 3, 3), (1, 2, 5, 5), (3, 3), groups=2, cw=cw)
    assert op_counts(spec).macs == 2 * 9 * 9


def test_shared_codebook_charged_by_share():
    from kcompile.cluster import cluster

    cm = cluster(tiny(), "son", k=8, scope="network")
    rep = estimate(cm, input_shape=(1, 3, 8, 8))
    shares = {}
    from kcompile.energy.layers import describe_model

    specs, _ = describe_model(cm, (1, 3, 8, 8))
    for s in specs:
        if s.cw is not None and s.cw.codebook_key:
            shares.setdefault(s.cw.codebook_key, 0.0)
            shares[s.cw.codebook_key] += s.codebook_share
    assert shares and all(v == pytest.approx(1.0) for v in shares.values())
    assert rep.total["weight_bits"] < rep.dense_total["weight_bits"]


# ------------------------------------------------------------------ not modelled, model untouched
class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(24, 2)

    def forward(self, x):
        return self.fc(self.bn(self.c1(x.flatten(2))).flatten(1))


def test_not_modelled_layers_listed_with_macs():
    rep = estimate(Odd(), input_shape=(1, 2, 10, 1))
    names = {n.name: n for n in rep.not_modelled}
    assert names["c1"].kind == "Conv1d" and names["c1"].macs == 3 * 8 * 2 * 3
    assert names["bn"].macs == 24
    assert [l.name for l in rep.layers] == ["fc"]
    assert rep.total["not_modelled_macs"] == 144 + 24
    d = rep.as_dict()
    assert {"name": "c1", "kind": "Conv1d", "macs": 144} in d["not_modelled"]


def test_model_not_modified():
    m = tiny()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    estimate(m, input_shape=(2, 3, 8, 8))
    assert m.training
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not m._forward_hooks and all(not mod._forward_hooks for mod in m.modules())


def test_report_dict_has_contract_fields():
    d = estimate(tiny(), input_shape=(1, 3, 8, 8)).as_dict()
    json.dumps(d)
    for l in d["layers"]:
        for k in ("name", "kind", "macs", "fa_compute", "weight_rep", "activation_rep", "eyeriss", "joules_45nm"):
            assert k in l
    assert "total" in d and d["total"]["eyeriss"] > 0


def test_batch_scales_linearly():
    r1 = estimate(tiny(), input_shape=(1, 3, 8, 8))
    r4 = estimate(tiny(), input_shape=(4, 3, 8, 8))
    assert r4.total["macs"] == 4 * r1.total["macs"]
    assert r4.total["fa_compute"] == 4 * r1.total["fa_compute"]


# ------------------------------------------------------------------ tables and bits
def test_default_table_is_the_papers():
    t = default_table()
    assert (t.mac, t.rf, t.array, t.buffer, t.dram) == (1, 1, 2, 6, 200)
    assert (t.mult_fp32, t.add_fp32, t.add_int32, t.mult_int32, t.sram_read_32, t.dram_read_32) == (3.7, 0.9, 0.1, 3.1, 5, 640)


def test_user_table_json_and_toml(tmp_path):
    p = tmp_path / "hw.json"
    p.write_text(json.dumps({"name": "mine", "normalised": {"dram": 100}}))
    t = load_table(p)
    assert t.dram == 100 and t.buffer == 6 and t.name == "mine"
    q = tmp_path / "hw.toml"
    q.write_text('name = "toml"\n[absolute_pj]\ndram_read_32 = 320.0\n')
    t2 = load_table(str(q))
    assert t2.dram_read_32 == 320 and t2.dram == 200
    m = tiny()
    assert estimate(m, (1, 3, 8, 8), table=p).total["eyeriss"] < estimate(m, (1, 3, 8, 8)).total["eyeriss"]


@pytest.mark.parametrize("content", [
    "{not json", json.dumps([1, 2]), json.dumps({"normalised": {"dram": -1}}),
    json.dumps({"normalised": {"sram": 1}}), json.dumps({"bogus": 1}), json.dumps({"name": "empty"}),
    json.dumps({"normalised": {"mac": 0}}), json.dumps({"normalised": {"rf": "one"}}),
])
def test_invalid_tables_are_one_line_usage_errors(tmp_path, content):
    p = tmp_path / "t.json"
    p.write_text(content)
    with pytest.raises(UsageError) as e:
        load_table(p)
    assert "\n" not in str(e.value) and "t.json" in str(e.value)


def test_missing_table_file():
    with pytest.raises(UsageError, match="does not exist"):
        load_table("/nonexistent/table.json")


@pytest.mark.parametrize("bits", [(0, 8), (8, 33), "8", "a,b", (8.0, 8), (8, 8, 8), "8,8,8", None])
def test_invalid_bits(bits):
    with pytest.raises(UsageError):
        parse_bits(bits)
    if bits is not None:
        with pytest.raises(UsageError):
            estimate(tiny(), (1, 3, 8, 8), bits=bits)


def test_bits_change_compute_cost():
    m = tiny()
    r8 = estimate(m, (1, 3, 8, 8), bits=(8, 8))
    r4 = estimate(m, (1, 3, 8, 8), bits="4,4")
    assert parse_bits("4,8") == (4, 8)
    assert r4.total["fa_compute"] < r8.total["fa_compute"]
    assert r4.total["joules_45nm"] < r8.total["joules_45nm"]
    assert r4.total["macs"] == r8.total["macs"]


def test_joules_match_table_by_hand():
    t = EnergyTable()
    a = Accesses(macs=1, mults=1, adds=1)
    e = t.joules(a, 32, 32, 32)
    assert e.compute == pytest.approx((3.1 + 0.1) * 1e-12)
    a = Accesses(dram=1, buffer=2)
    assert t.joules(a, 32, 32, 32).data == pytest.approx((640 + 10) * 1e-12)
    assert t.joules(a, 8, 8, 32).data == pytest.approx((640 + 10) / 4 * 1e-12)


def test_bad_input_shape_is_an_error():
    from kcompile.errors import KcompileError

    with pytest.raises(KcompileError):
        estimate(tiny(), input_shape=(1, 5, 8, 8))
    assert math.isfinite(estimate(tiny(), input_shape=(1, 3, 16, 16)).total["eyeriss"])


def test_energy_is_a_leaf_package():
    """energy/ imports only kcompile.ir / kcompile.errors of kcompile (static check of every file)."""
    import ast
    from pathlib import Path

    import kcompile.energy as en

    bad = []
    for f in Path(en.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kcompile"):
                if node.module not in ("kcompile.ir", "kcompile.errors"):
                    bad.append(f"{f.name}: {node.module}")
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                bad.append(f"{f.name}: relative import above the package")
            if isinstance(node, ast.Import):
                bad += [f"{f.name}: {a.name}" for a in node.names
                        if a.name.startswith("kcompile") and a.name not in ("kcompile.ir", "kcompile.errors")]
    assert not bad, bad


def test_stats_by_hand():
    from kcompile.energy.stats import r2, ranks, spearman

    assert r2([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)
    assert list(ranks([3, 1, 3])) == [2.5, 1.0, 2.5]
    assert math.isnan(r2([1, 1], [1, 2]))


def test_roofline_fit_recovers_a_line():
    from kcompile.energy.latency import Roofline

    feats = [(1e6, 1e4), (2e6, 5e4), (4e6, 2e4), (8e6, 9e4)]
    t = [2e-9 * o + 5e-8 * w + 1e-4 for o, w in feats]
    m = Roofline.fit(feats, t)
    assert m.sec_per_op == pytest.approx(2e-9, rel=1e-6) and m.overhead_s == pytest.approx(1e-4, rel=1e-6)
    assert np.allclose(m.predict(feats), t)
