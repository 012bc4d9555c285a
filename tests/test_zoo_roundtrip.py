"""Every zoo model x every method: cluster -> save -> load gives bit-identical outputs."""

import pytest
import torch

import kcompile
from kcompile import zoo
from kcompile.layers import clustered_layers

# small K and few k-means iterations: this checks plumbing, not clustering quality
OPTS = {"son": {"k": 16, "iters": 2}, "kse": {"q": 4, "iters": 2}, "dkm": {"k": 8, "iters": 2},
        "filter": {"ratio": 0.05, "iters": 2}}
BIG = {"resnet18", "alexnet", "googlenet", "vgg16-cifar"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in names]


@pytest.mark.parametrize("method", sorted(OPTS))
@pytest.mark.parametrize("name", _params(zoo.names()))
def test_cluster_save_load(tmp_path, name, method):
    model = kcompile.load(f"zoo:{name}")
    cm = kcompile.cluster(model, method, **OPTS[method]).eval()
    assert clustered_layers(cm)
    kcompile.save(cm, tmp_path / "m.pth")
    back = kcompile.load(str(tmp_path / "m.pth"))
    shape = zoo.input_shape(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(cm(x), back(x))
