"""kcompile.data: digits, .npz and image-folder datasets; evaluate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from kcompile.data import evaluate, load_dataset
from kcompile.errors import KcompileError


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- digits

def test_digits_split_shapes_and_normalisation():
    train, test = load_dataset("digits")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-3
    assert abs(float(xte.mean())) < 0.1  # test normalised with the training statistics
    counts = torch.bincount(yte, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    assert set(ytr.tolist()) == set(range(10))


def test_digits_split_is_fixed_whatever_the_seed():
    a, at = load_dataset("digits", seed=0)
    b, bt = load_dataset("digits", seed=7)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(at.tensors[1], bt.tensors[1])


# ----------------------------------------------------------------------------- npz

def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_npz_seeded_split_and_uint8_scaling(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 5, 5), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10)
    path = _npz(tmp_path, x=x, y=y)
    train, test = load_dataset(path, seed=1)
    assert len(train) == 40 and len(test) == 10
    assert train.tensors[0].shape == (40, 1, 5, 5)
    assert float(train.tensors[0].max()) <= 1.0 and float(train.tensors[0].min()) >= 0.0
    assert sorted(torch.bincount(test.tensors[1]).tolist()) == [2] * 5  # stratified
    again, _ = load_dataset(path, seed=1)
    other, _ = load_dataset(path, seed=2)
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert not torch.equal(train.tensors[1], other.tensors[1])


def test_npz_explicit_test_split(tmp_path):
    x = np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(4, 2, 3, 3)
    path = _npz(tmp_path, x=x, y=np.array([0, 1, 0, 1]), x_test=x[:2] * 2, y_test=np.array([1, 1]))
    train, test = load_dataset(path)
    assert torch.equal(train.tensors[0], torch.from_numpy(x))
    assert torch.equal(test.tensors[0], torch.from_numpy(x[:2] * 2))
    assert test.tensors[1].tolist() == [1, 1]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 1, 2, 2))}, "missing array 'y'"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, int)}, "array 'x' has shape"),
    ({"x": np.zeros((4, 1, 2, 2)), "y": np.zeros(3, int)}, "'y' has shape"),
    ({"x": np.zeros((4, 1, 2, 2)), "y": np.array([0.5, 1, 0, 1])}, "must be integers"),
    ({"x": np.zeros((4, 1, 2, 2)), "y": np.array([0, -1, 0, 1])}, "must be >= 0"),
    ({"x": np.zeros((4, 1, 2, 2)), "y": np.zeros(4, int), "x_test": np.zeros((1, 1, 2, 2))}, "given together"),
    ({"x": np.full((4, 1, 2, 2), np.nan), "y": np.zeros(4, int)}, "NaN"),
    ({"x": np.zeros((1, 1, 2, 2)), "y": np.zeros(1, int)}, "at least 2 samples"),
])
def test_npz_bad_contents(tmp_path, arrays, match):
    with pytest.raises(KcompileError, match=match) as e:
        load_dataset(_npz(tmp_path, **arrays))
    assert "d.npz" in _one_line(e)


def test_bad_paths(tmp_path):
    with pytest.raises(KcompileError, match="no such file") as e:
        load_dataset(str(tmp_path / "missing.npz"))
    _one_line(e)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(KcompileError, match="not a readable .npz") as e:
        load_dataset(str(bad))
    _one_line(e)
    txt = tmp_path / "data.txt"
    txt.write_text("1,2,3")
    with pytest.raises(KcompileError, match="unsupported file type"):
        load_dataset(str(txt))


# ----------------------------------------------------------------------------- image folder

def _write_images(root, spec, mode="L", size=(6, 4)):
    """spec: {class_name: n_images}; pixel value encodes the class index."""
    for ci, (cls, n) in enumerate(sorted(spec.items())):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            colour = 40 * ci + i if mode == "L" else (40 * ci, i, 255)
            Image.new(mode, size, colour).save(root / cls / f"{i}.png")


def test_image_folder_grayscale(tmp_path):
    _write_images(tmp_path, {"zebra": 5, "ant": 5})
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    train, test = load_dataset(str(tmp_path), seed=0)
    x = torch.cat([train.tensors[0], test.tensors[0]])
    y = torch.cat([train.tensors[1], test.tensors[1]])
    assert len(train) == 8 and len(test) == 2
    assert x.shape == (10, 1, 4, 6)  # (N, C, H, W) from 6x4 images
    # classes sorted: 'ant' -> 0 (written first, pixel 0..4), 'zebra' -> 1 (pixel 40..44)
    assert torch.all((x[y == 0] * 255).round() <= 4) and torch.all((x[y == 1] * 255).round() >= 40)


def test_image_folder_rgb(tmp_path):
    _write_images(tmp_path, {"a": 3, "b": 3}, mode="RGB")
    train, _ = load_dataset(str(tmp_path))
    assert train.tensors[0].shape[1:] == (3, 4, 6)
    assert torch.allclose(train.tensors[0][:, 2], torch.ones(1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(KcompileError, match="no class sub-directories"):
        load_dataset(str(tmp_path))
    _write_images(tmp_path / "mixed", {"a": 2})
    Image.new("L", (5, 5)).save(tmp_path / "mixed" / "a" / "odd.png")
    with pytest.raises(KcompileError, match="odd.png is 5x5, expected 6x4") as e:
        load_dataset(str(tmp_path / "mixed"))
    _one_line(e)
    _write_images(tmp_path / "empty", {"a": 2})
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(KcompileError, match="class directory 'b' has no"):
        load_dataset(str(tmp_path / "empty"))
    _write_images(tmp_path / "corrupt", {"a": 2})
    (tmp_path / "corrupt" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(KcompileError, match="cannot read image .*broken.png") as e:
        load_dataset(str(tmp_path / "corrupt"))
    _one_line(e)


# ----------------------------------------------------------------------------- evaluate

class _Oracle(nn.Module):
    """Predicts the class whose channel is hot: x (N, K, 1, 1) -> (N, K)."""

    def forward(self, x):
        self.grad_enabled = torch.is_grad_enabled()
        self.was_training = self.training
        return x.flatten(1)


def test_evaluate_exact_accuracy_and_mode_restored():
    y = torch.arange(8) % 4
    x = nn.functional.one_hot(y, 4).float()[:, :, None, None]
    labels = y.clone()
    labels[:2] = (labels[:2] + 1) % 4  # two wrong labels -> 75 %
    model = _Oracle().train()
    assert evaluate(model, TensorDataset(x, labels), batch_size=3) == pytest.approx(75.0)
    assert model.grad_enabled is False and model.was_training is False
    assert model.training  # restored
    assert evaluate(model.eval(), TensorDataset(x, y)) == pytest.approx(100.0)
    assert not model.training


def test_evaluate_empty_dataset():
    with pytest.raises(KcompileError, match="empty"):
        evaluate(_Oracle(), TensorDataset(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long)))


def test_evaluate_model_failure_is_one_line_error():
    ds = TensorDataset(torch.zeros(5, 3, 1, 1), torch.zeros(5, dtype=torch.long))
    with pytest.raises(KcompileError, match=r"evaluation failed on a batch of shape \(5, 3, 1, 1\): RuntimeError") as e:
        evaluate(nn.Linear(7, 2), ds)
    _one_line(e)
    with pytest.raises(KcompileError, match="needs \\(batch, classes\\) logits"):
        evaluate(nn.Identity(), ds)
