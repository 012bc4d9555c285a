"""kcompile.finetune: single-process and 2-rank DistributedDataParallel fine-tuning."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import TensorDataset

import kcompile
from kcompile import distributed as kd
from kcompile.data import evaluate
from kcompile.finetune import FinetuneConfig, finetune
from kcompile.layers import clustered_layers
from tiny_models import tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread_dynamo_loaded(one_torch_thread):
    """One torch thread (conftest), and torch._dynamo imported once here: DDP imports it, and
    the forked ranks inherit it instead of importing it each."""
    import torch._dynamo  # noqa: F401


def _templates_data(n: int, seed: int) -> TensorDataset:
    """Learnable toy task: 10 fixed random (3, 8, 8) templates (distinct channel means) plus noise."""
    gt = torch.Generator().manual_seed(123)
    t = 1.5 * torch.randn(10, 3, 1, 1, generator=gt) + torch.randn(10, 3, 8, 8, generator=gt)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(t[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g), y)


@pytest.fixture(scope="module")
def shared_model():
    """TinyNet clustered with Son's network-wide codebook: stem, conv and dw share one 3x3 book."""
    cm = kcompile.cluster(tiny(), "son", k=16, iters=5)
    books = {id(m.codebook) for n, m in clustered_layers(cm) if m.codebook_key}
    assert len(books) == 1 and sum(1 for _, m in clustered_layers(cm) if m.codebook_key) >= 2
    return cm


def _book(model):
    return next(m.codebook for _, m in clustered_layers(model) if m.codebook_key)


def _ddp_grads(rank, world, model, x, y):
    """One DDP backward on this rank's half of the batch; (local grad, reduced grad) of the book."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    half = x.shape[0] // world
    xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    local = copy.deepcopy(model)
    nn.functional.cross_entropy(local(xs), ys).backward()
    net = DDP(model)
    nn.functional.cross_entropy(net(xs), ys).backward()
    return _book(local).grad.clone(), _book(model).grad.clone()


def test_shared_centroid_gradient_summed_across_ranks(shared_model):
    model = copy.deepcopy(shared_model).eval()  # BN on running stats: halves add up exactly
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(ref(x), y).backward()
    full = _book(ref).grad
    # the full-batch gradient of a shared centroid is the sum over every member in every layer
    per_layer = []
    for name, _ in clustered_layers(ref):
        one = copy.deepcopy(model)
        keep = dict(clustered_layers(one))[name]
        for n2, m2 in clustered_layers(one):
            if n2 != name and m2.codebook_key:
                m2.codebook = nn.Parameter(m2.codebook.detach().clone())  # detach the other layers
        if keep.codebook_key:
            nn.functional.cross_entropy(one(x), y).backward()
            per_layer.append(keep.codebook.grad)
    torch.testing.assert_close(sum(per_layer), full, rtol=1e-4, atol=1e-6)
    out = kd.spawn(_ddp_grads, 2, (model, x, y), timeout=30)
    (l0, r0), (l1, r1) = out
    torch.testing.assert_close(r0, r1, rtol=0, atol=0)
    torch.testing.assert_close(r0, full, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((l0 + l1) / 2, full, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(l0, full, rtol=1e-3, atol=1e-6)


def _ddp_finetune(rank, world, model, train, test, cfg):
    losses = finetune(model, train, cfg, show_progress=False)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return losses, evaluate(model, test), flat


def test_two_rank_finetune_matches_one_process(shared_model):
    train, test = _templates_data(384, 0), _templates_data(200, 1)
    cfg = FinetuneConfig(epochs=8, lr=0.2, batch_size=32, seed=0)
    single = copy.deepcopy(shared_model)
    before = evaluate(single, test)
    losses1 = finetune(single, train, cfg, show_progress=False)
    acc1 = evaluate(single, test)
    out = kd.spawn(_ddp_finetune, 2, (copy.deepcopy(shared_model), train, test, cfg), timeout=60)
    (losses2, acc2, flat0), (losses2b, acc2b, flat1) = out
    assert torch.equal(flat0, flat1)  # every rank holds the same model
    assert losses2 == losses2b and acc2 == acc2b  # losses are all-reduced
    assert acc1 > before + 20 and acc2 > before + 20
    assert abs(acc1 - acc2) <= 8.0, (acc1, acc2)
    assert abs(losses1[-1] - losses2[-1]) <= 0.15, (losses1, losses2)
    assert losses2[-1] < losses2[0]


def test_single_process_unchanged_api(shared_model):
    m = copy.deepcopy(shared_model)
    losses = finetune(m, _templates_data(64, 2), FinetuneConfig(epochs=2, batch_size=16), show_progress=False)
    assert len(losses) == 2 and all(l > 0 for l in losses)
    assert not m.training
    assert not torch.equal(_book(m), _book(shared_model))
    assert dist.is_initialized() is False


@pytest.mark.slow
def test_torchrun_cluster_finetune_two_ranks(tmp_path):
    """`torchrun --nproc-per-node 2 -m kcompile.cli cluster ... --finetune-epochs 1`: DDP, rank 0 writes."""
    import os
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "c.pth"
    r = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "kcompile.cli", "cluster", "zoo:digits-resnet",
                        "-o", str(out), "--method", "dkm", "--rate", "0.25", "--data", "digits",
                        "--finetune-epochs", "1"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "KCOMPILE_QUIET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("fine-tuned") == 1 and r.stdout.count("wrote") == 1  # only rank 0 reports and writes
    assert kcompile.load(str(out)) is not None
