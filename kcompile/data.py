"""Datasets for fine-tuning and evaluation, as (train, test) TensorDatasets.

Every dataset yields ``(x, y)`` with x float32 (N, C, H, W) and y int64 (N,).

``load_dataset(spec)`` understands

* ``digits`` -- scikit-learn's 8x8 handwritten digits (1797 images, 10
  classes).  Pixels (0..16) are scaled to [0, 1], then normalised with the
  scalar mean and std of the *training* pixels (``DIGITS_MEAN``/``DIGITS_STD``
  are recomputed on load).  Shape (N, 1, 8, 8).  The split is fixed, whatever
  ``seed`` says: ``train_test_split(test_size=0.2, stratify=y,
  random_state=0)`` -> 1437 train / 360 test images.
* ``PATH.npz`` -- arrays ``x`` (N, C, H, W) or (N, H, W) and ``y`` (N,)
  integer labels; optional ``x_test``/``y_test``, otherwise a split of 20 %
  for testing seeded with ``seed`` (stratified when every class has at least
  two samples).  uint8 images are scaled to [0, 1]; other dtypes are used as
  they are (float32).  No normalisation.
* ``DIR`` -- an image-folder tree ``DIR/<class>/*.png|jpg|jpeg`` (classes are
  the sorted sub-directory names, labels 0..K-1).  Images are read with
  Pillow, as grayscale (C=1) if all are grayscale else RGB (C=3), scaled to
  [0, 1]; all must have the same size.  Split as for ``.npz``.

``evaluate(model, dataset)`` returns top-1 accuracy in percent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import KcompileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.2


def load_dataset(spec: str, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Load ``spec`` (``digits``, a ``.npz`` file or an image folder) as (train, test)."""
    if spec == "digits":
        return _digits()
    path = Path(spec)
    if not path.exists():
        raise KcompileError(
            f"dataset '{spec}': no such file or directory "
            "(expected 'digits', a .npz file or an image-folder directory)"
        )
    if path.is_dir():
        x, y = _image_folder(path)
        return _split(x, y, seed, spec)
    if path.suffix.lower() == ".npz":
        return _npz(path, seed)
    raise KcompileError(
        f"dataset '{spec}': unsupported file type '{path.suffix}' (expected a .npz file or an image folder)"
    )


def _digits() -> tuple[TensorDataset, TensorDataset]:
    """sklearn digits: fixed stratified 80/20 split, normalised with training stats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=0)
    mean, std = float(xtr.mean()), float(xtr.std())
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return _tds(xtr, ytr), _tds(xte, yte)


def _tds(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def _as_images(x: np.ndarray, name: str, spec: str) -> np.ndarray:
    """Check/convert an array to float32 (N, C, H, W)."""
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise KcompileError(f"dataset '{spec}': array '{name}' has non-numeric dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise KcompileError(
            f"dataset '{spec}': array '{name}' has shape {x.shape}; expected (N, C, H, W) or (N, H, W)"
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise KcompileError(f"dataset '{spec}': array '{name}' contains NaN or infinite values")
    return x


def _as_labels(y: np.ndarray, n: int, name: str, spec: str) -> np.ndarray:
    """Check labels: integer (N,), non-negative, as many as images."""
    if y.ndim != 1 or len(y) != n:
        raise KcompileError(f"dataset '{spec}': '{name}' has shape {y.shape}; expected ({n},) to match the images")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise KcompileError(f"dataset '{spec}': labels '{name}' must be integers, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise KcompileError(f"dataset '{spec}': labels '{name}' must be >= 0, found {int(y.min())}")
    return y.astype(np.int64)


def _npz(path: Path, seed: int) -> tuple[TensorDataset, TensorDataset]:
    spec = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise KcompileError(f"dataset '{spec}': not a readable .npz file ({_first_line(e)})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise KcompileError(f"dataset '{spec}': missing array '{key}' (has: {', '.join(arrays) or 'none'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise KcompileError(f"dataset '{spec}': 'x_test' and 'y_test' must be given together")
    x = _as_images(arrays["x"], "x", spec)
    y = _as_labels(arrays["y"], len(x), "y", spec)
    if "x_test" not in arrays:
        return _split(x, y, seed, spec)
    xt = _as_images(arrays["x_test"], "x_test", spec)
    yt = _as_labels(arrays["y_test"], len(xt), "y_test", spec)
    if xt.shape[1:] != x.shape[1:]:
        raise KcompileError(f"dataset '{spec}': x_test images {xt.shape[1:]} differ from x images {x.shape[1:]}")
    if len(x) == 0 or len(xt) == 0:
        raise KcompileError(f"dataset '{spec}': empty training or test set")
    return _tds(x, y), _tds(xt, yt)


def _image_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read root/<class>/*.png|jpg into float32 (N, C, H, W) in [0, 1] and labels."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise KcompileError(f"dataset '{root}': no class sub-directories (expected {root}/<class>/*.png)")
    files: list[tuple[Path, int]] = []
    for label, c in enumerate(classes):
        imgs = sorted(p for p in (root / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise KcompileError(f"dataset '{root}': class directory '{c}' has no .png/.jpg images")
        files += [(p, label) for p in imgs]
    pil = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                pil.append(im.copy())
        except Exception as e:
            raise KcompileError(f"dataset '{root}': cannot read image {p} ({_first_line(e)})") from None
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in pil)
    size = pil[0].size
    arrs = []
    for (p, _), im in zip(files, pil):
        if im.size != size:
            raise KcompileError(
                f"dataset '{root}': image {p} is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} like the others"
            )
        a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
        arrs.append(a[None] if gray else a.transpose(2, 0, 1))
    return np.stack(arrs), np.array([label for _, label in files], dtype=np.int64)


def _split(x: np.ndarray, y: np.ndarray, seed: int, spec: str) -> tuple[TensorDataset, TensorDataset]:
    """Seeded 80/20 split, stratified when every class has >= 2 samples."""
    from sklearn.model_selection import train_test_split

    if len(x) < 2:
        raise KcompileError(f"dataset '{spec}': need at least 2 samples to split into train and test, got {len(x)}")
    counts = np.bincount(y)
    n_test = max(1, int(round(TEST_FRACTION * len(x))))
    strat = y if (counts[counts > 0].min() >= 2 and n_test >= (counts > 0).sum()) else None
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=n_test, stratify=strat, random_state=seed)
    return _tds(xtr, ytr), _tds(xte, yte)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` in percent (0..100).

    Runs in eval mode under ``torch.no_grad()``; the model's previous
    train/eval mode is restored afterwards.  The model must map (B, C, H, W)
    to (B, num_classes) logits; a model that fails on a batch (e.g. a .pt2
    exported for a fixed batch size) raises a one-line KcompileError.
    """
    if len(dataset) == 0:
        raise KcompileError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                try:
                    out = model(x)
                except Exception as e:  # e.g. a .pt2 exported for another batch size
                    raise KcompileError(f"evaluation failed on a batch of shape {tuple(x.shape)}: "
                                        f"{type(e).__name__}: {_first_line(e)}") from None
                if out.dim() != 2 or out.shape[0] != len(y):
                    raise KcompileError(f"evaluation needs (batch, classes) logits, the model gave shape {tuple(out.shape)}")
                correct += int((out.argmax(1) == y).sum())
    finally:
        if was_training:
            model.train()
    return 100.0 * correct / len(dataset)
