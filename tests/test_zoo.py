"""kcompile.zoo: parameter counts, shapes, determinism, shipped digits weights."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from kcompile import zoo
from kcompile.data import evaluate, load_dataset
from kcompile.errors import UsageError

# Reference counts (torchvision's for the ImageNet-layout models).
PARAMS = {
    "digits-resnet": 82_426,
    "resnet18": 11_689_512,
    "resnet56": 853_018,
    "vgg16-cifar": 14_728_266,
    "wrn16-4": 2_748_890,
    "mobilenetv2": 3_504_872,
    "alexnet": 61_100_840,
    "googlenet": 6_624_904,
}
# Small inputs keep the ImageNet models fast (all use adaptive pooling).
SMALL_INPUT = {
    "digits-resnet": (3, 1, 8, 8),
    "resnet18": (2, 3, 64, 64),
    "resnet56": (2, 3, 32, 32),
    "vgg16-cifar": (2, 3, 32, 32),
    "wrn16-4": (2, 3, 32, 32),
    "mobilenetv2": (2, 3, 64, 64),
    "alexnet": (1, 3, 64, 64),
    "googlenet": (2, 3, 64, 64),
}


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    return zoo.build(name, pretrained=False).eval()


def test_names_cover_required_models_and_shapes():
    assert set(zoo.names()) == set(PARAMS)
    assert set(zoo.INPUT_SHAPES) == set(zoo.names())
    assert zoo.input_shape("digits-resnet") == (1, 1, 8, 8)
    assert zoo.input_shape("zoo:resnet18") == (1, 3, 224, 224)
    for name in ("resnet56", "vgg16-cifar", "wrn16-4"):
        assert zoo.input_shape(name) == (1, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    assert sum(p.numel() for p in _model(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_forward_shape_and_layer_types(name):
    model = _model(name)
    x = torch.randn(*SMALL_INPUT[name], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], 1000 if zoo.input_shape(name)[-1] == 224 else 10)
    assert torch.isfinite(y).all()
    kinds = {type(m) for m in model.modules()}
    assert nn.Conv2d in kinds and nn.Linear in kinds
    assert (nn.BatchNorm2d in kinds) == (name != "alexnet")


@pytest.mark.parametrize("name", ["digits-resnet", "resnet56", "wrn16-4", "mobilenetv2"])
def test_num_classes_kwarg(name):
    model = zoo.build(name, pretrained=False, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(*SMALL_INPUT[name])).shape == (SMALL_INPUT[name][0], 7)


def test_default_input_shape_runs_for_imagenet_model():
    with torch.no_grad():
        assert _model("resnet18")(torch.zeros(zoo.input_shape("resnet18"))).shape == (1, 1000)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = zoo.build("resnet56")
    assert torch.equal(state, torch.get_rng_state())
    b = zoo.build("resnet56")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.conv1.weight.std() > 0  # really initialised, not zeros


def test_torchvision_compatible_keys():
    keys = {n: set(_model(n).state_dict()) for n in ("resnet18", "mobilenetv2", "googlenet", "alexnet")}
    assert {"conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight", "fc.bias"} <= keys["resnet18"]
    assert {"features.0.0.weight", "features.1.conv.1.weight", "features.2.conv.0.0.weight",
            "features.18.1.bias", "classifier.1.weight"} <= keys["mobilenetv2"]
    assert {"conv1.conv.weight", "inception5b.branch4.1.conv.weight", "fc.weight"} <= keys["googlenet"]
    assert not any("aux" in k for k in keys["googlenet"])
    assert {"features.10.weight", "classifier.6.bias"} <= keys["alexnet"]


def test_resnet56_uses_parameter_free_option_a_shortcuts():
    convs = [m for m in _model("resnet56").modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55 and all(c.kernel_size == (3, 3) for c in convs)


def test_unknown_name_lists_available():
    with pytest.raises(UsageError, match="unknown zoo model 'resnet-9000'.*digits-resnet.*googlenet"):
        zoo.build("resnet-9000")
    with pytest.raises(UsageError, match="available"):
        zoo.input_shape("nope")


def test_bad_kwargs_are_usage_errors():
    with pytest.raises(UsageError, match="zoo:resnet56.*bad keyword"):
        zoo.build("resnet56", width=3)
    with pytest.raises(UsageError, match="num_classes must be a positive integer"):
        zoo.build("resnet56", num_classes=0)
    with pytest.raises(UsageError, match="ships weights only"):
        zoo.build("digits-resnet", num_classes=5)
    assert zoo.build("digits-resnet", pretrained=False, num_classes=5).fc.out_features == 5


def test_shipped_weights_file_is_small_float32_state_dict():
    path = zoo.WEIGHTS_DIR / "digits_resnet.pt"
    assert path.stat().st_size < 500_000
    state = torch.load(path, weights_only=True)
    assert set(state) == set(zoo.build("digits-resnet", pretrained=False).state_dict())
    assert all(v.dtype == torch.float32 for k, v in state.items() if "num_batches" not in k)


def test_digits_resnet_pretrained_accuracy():
    _, test = load_dataset("digits")
    acc = evaluate(zoo.build("digits-resnet"), test)
    assert acc >= 95.0
    assert evaluate(zoo.build("digits-resnet", pretrained=False), test) < 50.0
