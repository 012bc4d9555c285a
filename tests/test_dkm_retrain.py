"""kcompile.dkm_retrain: the spectral k-means regulariser's gradient, F, and re-training."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from kcompile.dkm_retrain import (KMeansRegularizer, indicator, penalty, penalty_grad, retrain_dkm,
                                  row_matrix, top_right_singular)
from kcompile.errors import UsageError
from kcompile.layers import clustered_layers
from tiny_models import tiny


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@settings(max_examples=15, deadline=None)
@given(s=st.integers(1, 5), n=st.integers(2, 40), kfrac=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_penalty_gradient_is_lambda_W_I_minus_FFt(s, n, kfrac, seed):
    k = max(1, min(n, round(kfrac * n)))
    W = torch.randn(s, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    F = _orthonormal(n, k, seed + 1)
    lam = 1e-3
    penalty(W, F, lam).backward()
    direct = lam * W.detach() @ (torch.eye(n, dtype=torch.float64) - F @ F.t())
    torch.testing.assert_close(W.grad, direct)
    torch.testing.assert_close(penalty_grad(W.detach(), F, lam), direct)


def test_row_matrix_and_svd():
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    W = row_matrix(w)
    assert W.shape == (3, 24) and torch.equal(W[:, 5], w.reshape(-1, 3)[5])
    assert row_matrix(torch.randn(5, 4, 1, 1)).shape == (1, 20)
    F = top_right_singular(W, 2)
    assert F.shape == (24, 2)
    torch.testing.assert_close(F.t() @ F, torch.eye(2), atol=1e-5, rtol=0)
    _, S, _ = torch.linalg.svd(W)
    # the relaxed k-means energy with the SVD's F is the tail of the squared spectrum
    torch.testing.assert_close(penalty(W, F, 2.0), (S[2:] ** 2).sum(), atol=1e-4, rtol=1e-5)
    # K >= s: F spans W's row space and the term vanishes
    assert float(penalty_grad(W, top_right_singular(W, 10), 1.0).abs().max()) < 1e-5


def test_hard_relaxation_pulls_rows_to_their_centroid():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    F = indicator(labels, 3, torch.float64)
    torch.testing.assert_close(F.t() @ F, torch.eye(3, dtype=torch.float64))
    W = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cent = torch.stack([W[:, labels == j].mean(1) for j in range(3)], 1)
    torch.testing.assert_close(penalty_grad(W, F, 0.5), 0.5 * (W - cent[:, labels]))


def test_regularizer_matches_formula_on_a_model():
    m = tiny()
    for relax in ("spectral", "hard"):
        reg = KMeansRegularizer(m, rate=0.1, lam=0.01, relax=relax)
        reg.refresh()
        for name, mod in reg.layers:
            W = row_matrix(mod.weight.detach())
            st_ = reg.state[name]
            F = st_.F if relax == "spectral" else indicator(st_.labels, int(st_.labels.max()) + 1)
            want = penalty_grad(W, F, 0.01).t().reshape(mod.weight.shape)
            torch.testing.assert_close(reg.layer_grad(name, mod.weight), want, atol=1e-6, rtol=1e-5)
    # the stem (3x3x3 -> 8 filters: N = 72 rows, K = 7 >= s = 3): spectral term is zero
    reg = KMeansRegularizer(m, rate=0.1, lam=0.01)
    reg.refresh()
    assert float(reg.layer_grad("stem", m.stem.weight).abs().max()) < 1e-6
    # with k=2 < s=3 it is not
    reg = KMeansRegularizer(m, k=2, lam=0.01)
    reg.refresh()
    assert float(reg.layer_grad("stem", m.stem.weight).abs().max()) > 1e-5


def test_sparsity_rows_pulled_to_zero():
    m = tiny()
    reg = KMeansRegularizer(m, rate=0.25, lam=1.0, sparsity=0.5, relax="hard")
    reg.refresh()
    zero = reg.state["conv"].zero
    assert int(zero.sum()) == round(0.5 * zero.numel())
    G = row_matrix(reg.layer_grad("conv", m.conv.weight))
    W = row_matrix(m.conv.weight.detach())
    torch.testing.assert_close(G[:, zero], W[:, zero])
    with pytest.raises(UsageError):
        KMeansRegularizer(m, sparsity=1.0)


def test_retrain_gives_a_dkm_clustered_model():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cm = retrain_dkm(m, data, rate=0.25, epochs=2, lam=1e-2, svd_every=1, relax="hard", iters=5,
                     show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # input untouched
    layers = dict(clustered_layers(cm))
    assert set(layers) == {"stem", "conv", "pw", "dw"} and all(l.method == "dkm" for l in layers.values())
    rt = cm.kcompile_method["retrain"]
    assert rt["epochs"] == 2 and len(rt["history"]) == 2 and rt["history"][0]["regulariser_at_start"] > 0
    with pytest.raises(UsageError):
        retrain_dkm(cm, data, epochs=1, show_progress=False)


def test_recalibrate_bn_matches_data_statistics():
    from kcompile.dkm_retrain import recalibrate_bn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 8, 8, generator=g)
    data = TensorDataset(x, torch.zeros(40, dtype=torch.long))
    m = tiny()
    m.bn.momentum = 0.1
    out = recalibrate_bn(m, data, batch_size=8)
    assert out is m and not m.training and m.bn.momentum == 0.1
    pre = m.stem(x)
    torch.testing.assert_close(m.bn.running_mean, pre.mean(dim=(0, 2, 3)).detach(), atol=1e-5, rtol=1e-4)


def _retrain_rank(rank, world, model, data):
    cm = retrain_dkm(model, data, rate=0.25, epochs=2, lam=1e-2, svd_every=1, relax="hard", iters=5,
                     batch_size=16, show_progress=False)
    return torch.cat([m.codebook.detach().reshape(-1) for _, m in clustered_layers(cm)])


def test_retrain_two_ranks_ddp_identical_on_every_rank():
    from kcompile import distributed as kd

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    a, b = kd.spawn(_retrain_rank, 2, (tiny(), data), timeout=60)
    assert torch.equal(a, b)
    single = _retrain_rank(0, 1, tiny(), data)
    assert a.shape == single.shape and not torch.equal(a, single)  # different batch split, same recipe
