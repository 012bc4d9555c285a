"""kcompile.loading: every MODEL form, .pt2 lifting, bad inputs, input files untouched."""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kcompile import zoo
from kcompile.errors import KcompileError, UsageError
from kcompile.loading import lift_exported, load_model, rebuild_arch
from cli_helpers import sha

# torch's own GraphModule deepcopy / run_decompositions emit this deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

DIGITS_X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))



def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def perturbed_state(name: str, seed: int = 1, **kwargs) -> dict:
    """A state_dict of zoo model ``name`` that differs from its seeded default."""
    model = zoo.build(name, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def digits_pt2(tmp_path_factory):
    """digits-resnet (shipped weights) saved with torch.export.save; returns (path, reference model)."""
    model = zoo.build("digits-resnet").eval()
    path = tmp_path_factory.mktemp("pt2") / "digits.pt2"
    torch.export.save(torch.export.export(model, (DIGITS_X,)), str(path))
    return path, model


# ----------------------------------------------------------------------------- zoo:NAME

def test_zoo_source():
    model = load_model("zoo:digits-resnet")
    assert not model.training
    assert model.kcompile_arch == {"spec": "zoo:digits-resnet", "kwargs": {}}
    assert_state_equal(model, zoo.build("digits-resnet").state_dict())
    m2 = load_model("zoo:resnet56", arch_kwargs={"num_classes": 3})
    assert m2.fc.out_features == 3 and m2.kcompile_arch["kwargs"] == {"num_classes": 3}
    assert rebuild_arch(m2.kcompile_arch).fc.out_features == 3


def test_zoo_source_errors():
    with pytest.raises(UsageError, match="unknown zoo model 'nope'.*resnet18"):
        load_model("zoo:nope")
    with pytest.raises(UsageError, match="--arch is only for state_dict"):
        load_model("zoo:resnet56", arch="zoo:resnet56")


# ----------------------------------------------------------------------------- state_dict + --arch

def test_state_dict_with_zoo_arch(tmp_path):
    state = perturbed_state("resnet56")
    path = tmp_path / "r56.pth"
    torch.save(state, path)
    before = sha(path)
    model = load_model(str(path), arch="zoo:resnet56")
    assert_state_equal(model, state)
    assert not model.training
    assert model.kcompile_arch == {"spec": "zoo:resnet56", "kwargs": {}}
    assert sha(path) == before
    rebuilt = rebuild_arch(model.kcompile_arch)
    assert type(rebuilt) is type(model) and set(rebuilt.state_dict()) == set(state)


def test_state_dict_of_digits_with_other_num_classes(tmp_path):
    state = perturbed_state("digits-resnet", num_classes=4)
    path = tmp_path / "d4.pt"
    torch.save(state, path)
    model = load_model(str(path), arch="zoo:digits-resnet", arch_kwargs='{"num_classes": 4}')
    assert_state_equal(model, state)
    assert rebuild_arch(model.kcompile_arch).fc.out_features == 4


def test_wrapped_and_dataparallel_state_dicts(tmp_path):
    state = perturbed_state("digits-resnet")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    assert_state_equal(load_model(str(tmp_path / "w.pth"), arch="zoo:digits-resnet"), state)


def test_state_dict_with_module_callable(tmp_path):
    lin = nn.Linear(4, 3)
    torch.save(lin.state_dict(), tmp_path / "lin.pth")
    model = load_model(str(tmp_path / "lin.pth"), arch="torch.nn:Linear",
                       arch_kwargs={"in_features": 4, "out_features": 3})
    assert isinstance(model, nn.Linear) and torch.equal(model.weight, lin.weight)
    assert model.kcompile_arch == {"spec": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 3}}
    model2 = load_model(str(tmp_path / "lin.pth"), arch="torch.nn:Linear",
                        arch_kwargs={"in_features": 4, "out_features": 3})
    assert torch.equal(model2.bias, lin.bias)


ARCH_FILE = '''
import torch
from torch import nn
from helper_mod import WIDTH   # neighbour import must work

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, WIDTH, 3)
        self.fc = nn.Linear(WIDTH, num_classes)
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def make(num_classes=10):
    return Net(num_classes)

def not_a_module():
    return 42

def broken():
    raise RuntimeError("boom")
'''


def test_state_dict_with_file_callable(tmp_path, monkeypatch):
    (tmp_path / "helper_mod.py").write_text("WIDTH = 5\n")
    (tmp_path / "mynet.py").write_text(ARCH_FILE)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ref = nn.ModuleDict({"conv": nn.Conv2d(1, 5, 3), "fc": nn.Linear(5, 2)})
    torch.save(ref.state_dict(), tmp_path / "net.pth")
    model = load_model("net.pth", arch="mynet.py:make", arch_kwargs={"num_classes": 2})
    assert torch.equal(model.fc.weight, ref.fc.weight)
    spec = model.kcompile_arch["spec"]
    assert spec == f"{tmp_path.resolve() / 'mynet.py'}:make"  # absolute path recorded
    monkeypatch.chdir("/")
    rebuilt = rebuild_arch(model.kcompile_arch)
    assert rebuilt.fc.out_features == 2 and type(rebuilt).__name__ == "Net"
    with pytest.raises(KcompileError, match="returned a int, not an nn.Module"):
        load_model(str(tmp_path / "net.pth"), arch=f"{tmp_path}/mynet.py:not_a_module")
    with pytest.raises(KcompileError, match="RuntimeError: boom"):
        load_model(str(tmp_path / "net.pth"), arch=f"{tmp_path}/mynet.py:broken")
    with pytest.raises(KcompileError, match="has no attribute 'missing'"):
        load_model(str(tmp_path / "net.pth"), arch=f"{tmp_path}/mynet.py:missing")
    with pytest.raises(KcompileError, match="no such file"):
        load_model(str(tmp_path / "net.pth"), arch=f"{tmp_path}/other.py:make")


def test_torchvision_arch_not_installed(tmp_path, monkeypatch):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "tv.pth")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails whatever is installed
    with pytest.raises(KcompileError, match="needs torchvision, which is not installed") as e:
        load_model(str(tmp_path / "tv.pth"), arch="torchvision:resnet18")
    one_line(e)


def test_torchvision_arch_uses_no_weights(tmp_path, monkeypatch):
    calls = []
    models = types.ModuleType("torchvision.models")
    models.list_models = lambda: ["tiny"]

    def get_model(name, weights="DEFAULT", **kw):
        calls.append((name, weights, kw))
        return nn.Linear(2, kw.get("num_classes", 1000))

    models.get_model = get_model
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    state = nn.Linear(2, 3).state_dict()
    torch.save(state, tmp_path / "tv.pth")
    model = load_model(str(tmp_path / "tv.pth"), arch="torchvision:tiny", arch_kwargs={"num_classes": 3})
    assert calls == [("tiny", None, {"num_classes": 3})]
    assert_state_equal(model, state)
    with pytest.raises(UsageError, match="torchvision has no model 'huge'"):
        load_model(str(tmp_path / "tv.pth"), arch="torchvision:huge")


@pytest.mark.parametrize("arch, err, match", [
    ("resnet18", UsageError, "bad --arch 'resnet18'"),
    ("zoo:resnet-9000", UsageError, "unknown zoo model"),
    ("no_such_package_xyz.mod:f", KcompileError, "cannot import module 'no_such_package_xyz.mod'"),
    ("kcompile.zoo:no_such_builder", KcompileError, "has no attribute 'no_such_builder'"),
    ("kcompile.zoo:SEED", KcompileError, "is not callable"),
    ("bad module:f", UsageError, "neither a module name nor a .py file"),
])
def test_bad_arch_specs(tmp_path, arch, err, match):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "m.pth")
    with pytest.raises(err, match=match) as e:
        load_model(str(tmp_path / "m.pth"), arch=arch)
    one_line(e)


def test_bad_arch_kwargs(tmp_path):
    torch.save(perturbed_state("resnet56"), tmp_path / "m.pth")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_model(str(tmp_path / "m.pth"), arch="zoo:resnet56", arch_kwargs="{num_classes: 3")
    with pytest.raises(UsageError, match="bad keyword"):
        load_model(str(tmp_path / "m.pth"), arch="zoo:resnet56", arch_kwargs={"depth": 20})


def test_state_dict_without_arch(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(perturbed_state("digits-resnet"), path)
    with pytest.raises(UsageError, match="sd.pth is a state_dict; .*--arch") as e:
        load_model(str(path))
    one_line(e)


def test_state_dict_mismatches_name_first_offending_key(tmp_path):
    state = perturbed_state("resnet56")
    path = tmp_path / "r56.pth"
    torch.save(state, path)
    with pytest.raises(KcompileError, match=r"key 'conv1.weight' has shape \(16, 3, 3, 3\) in the file "
                                            r"but \(16, 1, 3, 3\)") as e:
        load_model(str(path), arch="zoo:digits-resnet")
    assert "r56.pth" in one_line(e)
    missing = dict(state)
    del missing["fc.bias"]
    torch.save(missing, path)
    with pytest.raises(KcompileError, match="missing key 'fc.bias'"):
        load_model(str(path), arch="zoo:resnet56")
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(KcompileError, match="unexpected key 'extra.weight'"):
        load_model(str(path), arch="zoo:resnet56")


# ----------------------------------------------------------------------------- clustered .pth

def test_clustered_checkpoint_is_delegated(tmp_path, monkeypatch):
    seen = []
    fake = types.ModuleType("kcompile.checkpoint")
    fake.load_clustered = lambda obj: seen.append(obj) or nn.Identity()
    monkeypatch.setitem(sys.modules, "kcompile.checkpoint", fake)
    path = tmp_path / "c.pth"
    torch.save({"format": "kcompile-clustered", "version": 1, "state": {"w": torch.ones(2)}}, path)
    before = sha(path)
    model = load_model(str(path))
    assert isinstance(model, nn.Identity)
    assert seen[0]["format"] == "kcompile-clustered" and torch.equal(seen[0]["state"]["w"], torch.ones(2))
    assert sha(path) == before
    with pytest.raises(UsageError, match="clustered checkpoint that describes itself"):
        load_model(str(path), arch="zoo:resnet18")


def test_clustered_checkpoint_without_checkpoint_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kcompile.checkpoint", None)  # import fails
    path = tmp_path / "c.pth"
    torch.save({"format": "kcompile-clustered"}, path)
    with pytest.raises(KcompileError, match="clustered checkpoint but kcompile.checkpoint is unavailable") as e:
        load_model(str(path))
    one_line(e)


# ----------------------------------------------------------------------------- .pt2

def _count(model, kinds=(nn.Conv2d, nn.Linear)):
    return sum(isinstance(m, kinds) for m in model.modules())


def test_pt2_lifts_layers_and_keeps_outputs(digits_pt2):
    path, ref = digits_pt2
    before = sha(path)
    model = load_model(str(path))
    assert _count(model, nn.Conv2d) == _count(ref, nn.Conv2d) == 11
    assert _count(model, nn.Linear) == 1
    assert not any(n.op == "call_function" and ("conv" in str(n.target) or "linear" in str(n.target))
                   for n in model.graph.nodes)
    assert set(model.state_dict()) == set(ref.state_dict())  # holders replaced in place
    with torch.no_grad():
        assert torch.equal(model(DIGITS_X), ref(DIGITS_X))
    assert sha(path) == before


def test_pt2_record_rebuild_and_copy(digits_pt2):
    path, ref = digits_pt2
    model = load_model(str(path))
    rec = model.kcompile_arch
    assert rec["spec"] == "pt2" and rec["program"].dtype == torch.uint8
    assert rec["program"].numpy().tobytes() == path.read_bytes()
    rebuilt = rebuild_arch(rec)
    clone = copy.deepcopy(model)
    assert clone.kcompile_arch["spec"] == "pt2"  # survives GraphModule.__deepcopy__
    assert torch.equal(clone.kcompile_arch["program"], rec["program"])
    clone.train()
    clone.eval()  # re-enabled after torch.export disabled them
    with torch.no_grad():
        assert torch.equal(rebuilt(DIGITS_X), ref(DIGITS_X))
        assert torch.equal(clone(DIGITS_X), ref(DIGITS_X))
    # A clustering pass replaces layers by name: the graph must follow.
    clone.get_submodule("layer1.0").conv1 = nn.Identity()  # 16 -> 16 channels, shapes still fit
    with torch.no_grad():
        assert not torch.equal(clone(DIGITS_X), ref(DIGITS_X))


def test_pt2_detected_by_content_and_arch_rejected(digits_pt2, tmp_path):
    path, ref = digits_pt2
    renamed = tmp_path / "program.pt"
    renamed.write_bytes(path.read_bytes())
    with torch.no_grad():
        assert torch.equal(load_model(str(renamed))(DIGITS_X), ref(DIGITS_X))
    with pytest.raises(UsageError, match="--arch is only for state_dict"):
        load_model(str(path), arch="zoo:digits-resnet")


class _Functional(nn.Module):
    """Functional conv/linear on root attributes, a shared weight and a 'same' padding."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)
        self.w = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.w2 = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.register_buffer("lw", torch.randn(2, 4))

    def forward(self, x):
        x = self.dw(F.conv2d(x, self.w))
        x = F.conv2d(F.conv2d(x, self.w2, padding="same"), self.w2, padding=1, dilation=1)
        return F.linear(x.mean((2, 3)), self.lw)


@pytest.mark.parametrize("decompose", [False, True])
def test_lift_functional_calls(decompose):
    torch.manual_seed(0)
    model = _Functional().eval()
    x = torch.randn(2, 3, 9, 9)
    ep = torch.export.export(model, (x,))
    if decompose:  # aten.convolution instead of aten.conv2d; linear -> mm (not lifted)
        ep = ep.run_decompositions()
    lifted = lift_exported(ep.module())
    with torch.no_grad():
        assert torch.equal(lifted(x), model(x))
    assert _count(lifted, nn.Conv2d) == 4
    assert _count(lifted, nn.Linear) == (0 if decompose else 1)
    assert lifted.w2_lifted.weight is lifted.w2_lifted_1.weight  # shared weight stays shared
    assert not hasattr(lifted, "w")  # replaced by w_lifted, no duplicate entry


# ----------------------------------------------------------------------------- pickled modules

def test_pickled_module_refused_then_trusted(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    path = tmp_path / "whole.pth"
    torch.save(module, path)
    before = sha(path)
    with pytest.raises(KcompileError, match="whole.pth is a pickled module .*refusing to unpickle it "
                                            r"\(arbitrary code execution\). Re-run with --trust-pickle") as e:
        load_model(str(path))
    one_line(e)
    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    assert torch.equal(loaded[0].weight, module[0].weight)
    assert loaded.kcompile_arch == {"spec": "pickle", "class": "torch.nn.modules.container.Sequential"}
    with pytest.raises(KcompileError, match="cannot rebuild"):
        rebuild_arch(loaded.kcompile_arch)
    assert sha(path) == before


def test_pickled_data_refused(tmp_path):
    path = tmp_path / "np.pth"
    torch.save({"w": np.zeros(3)}, path)
    with pytest.raises(KcompileError, match="contains pickled Python objects .*--trust-pickle"):
        load_model(str(path))


# ----------------------------------------------------------------------------- broken inputs

def _make_bad(tmp_path, kind, digits_pt2):
    valid = tmp_path / "valid.pth"
    torch.save(perturbed_state("digits-resnet"), valid)
    p = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return tmp_path / "missing.pth", "no such file"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "empty file"
    if kind == "truncated":
        p.write_bytes(valid.read_bytes()[:100])
        return p, "corrupt or truncated"
    if kind == "truncated_tail":
        data = valid.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "corrupt or truncated"
    if kind == "random":
        p.write_bytes(np.random.default_rng(0).bytes(2000))
        return p, "corrupt"
    if kind == "directory":
        p.mkdir()
        return p, "is a directory"
    if kind == "list":
        torch.save([1, 2, 3], p)
        return p, "not a model file: it holds a list"
    if kind == "tensor":
        torch.save(torch.zeros(3), p)
        return p, "not a model file: it holds a Tensor"
    if kind == "pt2_truncated":
        p = tmp_path / "bad.pt2"
        p.write_bytes(digits_pt2[0].read_bytes()[:100])
        return p, "corrupt or truncated .pt2"
    if kind == "pt2_random":
        p = tmp_path / "rand.pt2"
        p.write_bytes(np.random.default_rng(1).bytes(500))
        return p, "corrupt or truncated .pt2"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "truncated_tail", "random", "directory",
                                  "list", "tensor", "pt2_truncated", "pt2_random"])
@pytest.mark.parametrize("trust", [False, True])
def test_bad_files(tmp_path, digits_pt2, kind, trust):
    path, match = _make_bad(tmp_path, kind, digits_pt2)
    before = sha(path) if path.is_file() else None
    with pytest.raises(KcompileError, match=match) as e:
        load_model(str(path), arch="zoo:digits-resnet", trust_pickle=trust)
    assert str(path) in one_line(e)
    if before is not None:
        assert sha(path) == before


def test_missing_spec_like_source_hints_at_arch():
    with pytest.raises(KcompileError, match="only zoo:NAME names a model directly"):
        load_model("torchvision:resnet18")


def test_rebuild_arch_bad_records():
    with pytest.raises(KcompileError, match="bad architecture record"):
        rebuild_arch({"kwargs": {}})
    with pytest.raises(KcompileError, match="uint8 tensor"):
        rebuild_arch({"spec": "pt2", "program": [1, 2]})
    with pytest.raises(KcompileError, match="cannot load the torch.export program"):
        rebuild_arch({"spec": "pt2", "program": torch.zeros(10, dtype=torch.uint8)})
