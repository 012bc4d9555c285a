"""The four clustering methods: math against hand-computed values and brute force."""

import math

import pytest
import torch

from kcompile.cluster import cluster
from kcompile.errors import KcompileError, UsageError
from kcompile.layers import clustered_layers
from kcompile.methods import kse, son
from kcompile.methods.filter import elbow, weight_change
from tiny_models import NoConvNet, tiny

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ son
def test_son_normalise_handles_zero_and_centre_sign():
    k = torch.tensor([[0.0] * 9, [1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, -2, 0, 0, 0, 0.0]])
    units, s = son.normalise(k)
    assert s.tolist() == [0.0, 1.0, -2.0]  # zero kernel: scale 0; centre 0 -> sign +1
    assert units[0].abs().sum() == 0 and units[2, 4] == 1.0
    assert torch.allclose(units * s[:, None], k)


def test_son_scope_parsing():
    assert son.parse_scope("network", 3, 256) == [("network", [0, 1, 2], 256)]
    assert [g[1] for g in son.parse_scope("layer", 2, 8)] == [[0], [1]]
    assert son.parse_scope("0-0=4,1-2=8", 3, 256) == [("0-0", [0], 4), ("1-2", [1, 2], 8)]
    for bad in ("0-5=4", "1-0=4", "x", "0-1=4,1-1=2"):
        with pytest.raises(UsageError):
            son.parse_scope(bad, 3, 256)


def test_son_network_scope_shares_one_codebook_per_kernel_size():
    m = tiny()
    cm = cluster(m, "son", k=8, iters=10)
    layers = dict(clustered_layers(cm))
    assert set(layers) == {"stem", "conv", "dw"}  # 1x1 and linear stay dense
    assert layers["stem"].codebook is layers["conv"].codebook is layers["dw"].codebook
    assert layers["conv"].index.dtype == torch.uint8 and layers["conv"].scale_dtype == torch.float16
    assert type(m.stem).__name__ == "Conv2d"  # input untouched
    # exact reconstruction when K equals the number of kernels
    cm = cluster(m, "son", k=8 * 3, scope="0-0=24", iters=30)
    assert torch.allclose(cm.stem.weight, m.stem.weight, atol=2e-3)


def test_son_tic_recovers_flipped_kernels():
    torch.manual_seed(0)
    m = tiny()
    base = torch.randn(1, 9)
    base[:, 4] = base[:, 4].abs() + 1  # positive centre so normalisation keeps the sign
    w = m.conv.weight.detach()
    with torch.no_grad():
        for o in range(w.shape[0]):
            for c in range(w.shape[1]):
                b = base[0].reshape(3, 3) * (1 + o)
                w[o, c] = b.flip(1) if (o * c) % 2 else b
    # one centroid suffices once horizontal flips are allowed; without TIC it cannot be exact
    cm = cluster(m, "son", k=1, transforms=2, scope="1-1=1", iters=20)
    assert torch.allclose(cm.conv.weight, m.conv.weight, atol=1e-3 * w.abs().max())
    plain = cluster(m, "son", k=1, scope="1-1=1", iters=20)
    assert not torch.allclose(plain.conv.weight, m.conv.weight, atol=1e-1 * w.abs().max())
    assert int(cm.conv.transform.max()) == 1


def test_son_k_larger_than_kernels_is_an_error():
    with pytest.raises(UsageError, match="larger than the number of units"):
        cluster(tiny(), "son", k=10_000)


# ------------------------------------------------------------------------ kse
def _entropy_brute(w):
    O, C = w.shape[:2]
    out = []
    for c in range(C):
        ks = [w[o, c].reshape(-1).double() for o in range(O)]
        dm = []
        for i in range(O):
            d = sorted(float((ks[i] - ks[j]).norm()) for j in range(O) if j != i)
            dm.append(sum(d[:5]))
        tot = sum(dm)
        out.append(-sum(p * math.log2(p) for p in (v / tot for v in dm) if p > 0))
    return torch.tensor(out, dtype=torch.float64)


def test_kse_entropy_matches_brute_force_over_input_channels():
    w = torch.randn(7, 3, 3, 3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(kse.channel_entropy(w), _entropy_brute(w))
    w[:, 1] = 1.0  # identical kernels: 0/0 -> entropy 0
    assert kse.channel_entropy(w)[1] == 0


def test_kse_counts_g4_t0():
    q = kse.centroid_counts(torch.tensor([0.0, 0.2, 0.3, 0.6, 0.74, 0.76, 1.0], dtype=torch.float64), 64, 4, 0)
    assert q.tolist() == [0, 0, 16, 32, 32, 64, 64]


def test_kse_layer_structure():
    m = tiny(width=16)
    cm = cluster(m, "kse", G=4, iters=10)
    names = [n for n, _ in clustered_layers(cm)]
    assert names == ["conv", "pw"]  # first conv and the depthwise conv stay dense
    cw = cm.conv.clustered_weight()
    q = cw.book_sizes()
    assert set(q.tolist()) <= {0, 4, 8, 16}
    if cw.full is not None:
        c = int(cw.full.nonzero()[0])
        assert torch.allclose(cm.conv.weight[:, c], m.conv.weight[:, c])
    if cw.pruned is not None:
        assert torch.count_nonzero(cm.conv.weight[:, cw.pruned]) == 0
    cq = cluster(m, "kse", q=3, iters=10).conv.clustered_weight()
    assert cq.book_sizes().tolist() == [3] * 16 and cq.pruned is None


# ------------------------------------------------------------------------ dkm
def test_dkm_rows_and_scalars():
    m = tiny()
    cm = cluster(m, "dkm", rate=0.25, iters=10)
    assert cm.conv.unit == "row" and cm.conv.index.shape == (8, 8, 3) and cm.conv.codebook.shape == (48, 3)
    assert cm.pw.unit == "scalar" and cm.pw.codebook.shape == (round(0.25 * 128), 1)
    cs = cluster(m, "dkm", k=4, sparsity=0.5, iters=10)
    rows = cs.conv.weight.reshape(-1, 3)
    assert (rows.norm(dim=1) == 0).sum() >= 0.5 * rows.shape[0]
    with pytest.raises(UsageError):
        cluster(m, "dkm", k=10_000)


# ------------------------------------------------------------------------ filter
def test_filter_fixed_gives_n_distinct_filters_and_report():
    m = tiny()
    cm = cluster(m, "filter", select="fixed", ratio=0.5, iters=20)
    assert len(torch.unique(cm.pw.weight.reshape(16, -1), dim=0)) == 8
    rep = cm.kcompile_report["pw"]
    assert rep["n"] == 8 and 0 < rep["fraction_changed"] <= 1 and rep["max_abs_dw"] >= rep["mean_abs_dw"]
    assert weight_change(torch.zeros(4), torch.tensor([0.0, 1, -2, 0]))["fraction_changed"] == 0.5
    first = cluster(m, "filter", ratio=0.5, first_layer_only=True)
    assert [n for n, _ in clustered_layers(first)] == ["stem"]


def test_filter_elbow_and_inertia():
    assert elbow([1, 2, 3, 4, 5], [100, 10, 8, 6, 4]) == 2
    m = tiny()
    cm = cluster(m, "filter", select="inertia", limit=1e9, iters=5)
    assert cm.kcompile_report["pw"]["n"] == 16 // 2 + 1  # huge limit: the search reaches its floor
    w = cluster(m, "filter", select="wcss", wcss_range="0.5-1.0", iters=5)
    assert 8 <= w.kcompile_report["pw"]["n"] <= 16


# ------------------------------------------------------------------------ shared checks
@pytest.mark.parametrize("method,opts", [("son", {"k": 4}), ("kse", {}), ("dkm", {}), ("filter", {})])
def test_nan_and_inf_weights_are_refused(method, opts):
    m = tiny(width=16)
    with torch.no_grad():
        m.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(KcompileError, match="layer conv: weight contains NaN"):
        cluster(m, method, **opts)


def test_all_zero_model_and_no_clusterable_layer():
    m = tiny()
    with torch.no_grad():
        for mod in (m.stem, m.conv, m.dw):
            mod.weight.zero_()
    with pytest.raises(UsageError, match="0 non-zero"):
        cluster(m, "son", k=4)
    with pytest.raises(KcompileError, match="no layer"):
        cluster(NoConvNet(), "son")
    with pytest.raises(UsageError, match="unknown method"):
        cluster(tiny(), "bogus")
    with pytest.raises(UsageError, match="no option"):
        cluster(tiny(), "son", rate=0.3)


def test_finetuning_moves_centroids_with_indices_fixed():
    from torch.utils.data import TensorDataset

    from kcompile.finetune import FinetuneConfig, finetune

    cm = cluster(tiny(), "son", k=8, iters=10)
    idx, book = cm.conv.index.clone(), cm.conv.codebook.detach().clone()
    ds = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    finetune(cm, ds, FinetuneConfig(epochs=1, batch_size=8), show_progress=False)
    assert torch.equal(cm.conv.index, idx) and not torch.equal(cm.conv.codebook.detach(), book)


def test_son_network_scope_keeps_a_rare_kernel_size_dense():
    import torch.nn as nn

    m = tiny(width=16)
    m.stem = nn.Conv2d(3, 16, 5, padding=2, bias=False)  # 48 5x5 kernels < K
    with pytest.warns(UserWarning, match="5x5 convs \\(stem\\) have only 48 kernels for K=64: kept dense"):
        cm = cluster(m, "son", k=64, iters=3)
    assert type(cm.stem).__name__ == "Conv2d" and cm.conv.unit == "kernel"
    with pytest.raises(UsageError, match="larger than the number of units"):
        cluster(m, "son", k=64, scope="0-0=64", iters=3)  # an explicit range is the user's K: an error
