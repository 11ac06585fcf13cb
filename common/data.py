"""CIFAR-10 as uint8 tensors, batch-wise augmentation, and deterministic per-worker streams.

Every batch is a pure function of (seed, stream id, step): the permutation of a pass and the
augmentation of a batch come from generators seeded by those numbers. So one process running
S workers in turn, S ranks running one each, and a run resumed at any round all draw exactly
the same images.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

CIFAR10_DIR = "cifar-10-batches-py"
# Published per-channel statistics of the CIFAR-10 training set (0..255 scale).
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)
NUM_CLASSES = {"cifar10": 10}


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x 3 x 32 x 32
    labels: torch.Tensor  # int64, N

    def __len__(self):
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx])


def _download(root: Path):
    try:
        import torchvision
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # no network, disk full, ...: the user must point at a copy
        raise UserError(f"data.root={root}: no {CIFAR10_DIR}/ there and the download failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"point data.root at a folder holding {CIFAR10_DIR}/ "
                        f"(e.g. --set data.root=../shared/data)") from None


def cifar10_dir(root: str | Path, download: bool = True) -> Path:
    root = Path(root)
    folder = root / CIFAR10_DIR
    if not folder.is_dir():
        if not download:
            raise UserError(f"data.root={root}: no {CIFAR10_DIR}/ folder there")
        _download(root)
    return folder


def _read_batch(path: Path) -> tuple[np.ndarray, list]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the dataset's own pickle format (trusted data files)
        return d[b"data"], d[b"labels"]
    except (OSError, pickle.UnpicklingError, KeyError, EOFError) as e:
        raise UserError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__})") from None


def load_cifar10(root: str | Path, train: bool, download: bool = True) -> ImageSet:
    folder = cifar10_dir(root, download)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_read_batch(folder / n) for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])
    return ImageSet(torch.from_numpy(data), torch.from_numpy(labels))


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The first n/C indices of every class (remainder to the lowest classes): deterministic."""
    classes = int(labels.max()) + 1
    per, extra = divmod(n, classes)
    picks = []
    for c in range(classes):
        idx = torch.nonzero(labels == c).flatten()
        want = per + (1 if c < extra else 0)
        if want > len(idx):
            raise UserError(f"subset of {n} asks {want} images of class {c}, only {len(idx)} exist")
        picks.append(idx[:want])
    return torch.sort(torch.cat(picks)).values


def load_dataset(cfg_data, train: bool) -> ImageSet:
    if cfg_data.dataset != "cifar10":
        raise UserError(f"data.dataset={cfg_data.dataset!r} is not supported")
    ds = load_cifar10(cfg_data.root, train)
    n = cfg_data.train_subset if train else cfg_data.test_subset
    if n:
        if n > len(ds):
            raise UserError(f"data.{'train' if train else 'test'}_subset={n} exceeds the {len(ds)} images")
        ds = ds.subset(balanced_subset(ds.labels, n))
    return ds


# ------------------------------------------------------------------ transforms
def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with `pad`-pixel zero padding + horizontal flip, on a uint8 batch."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    crops = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def _gen(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class Stream:
    """An endless, shuffled, augmented stream of batches over a dataset, addressed by step.

    Pass p uses permutation randperm(seed, stream, p); a pass has len // batch steps (the last
    partial batch is dropped). `batch(t)` is the t-th batch of the stream, reproducible anywhere.
    """

    def __init__(self, data: ImageSet, batch_size: int, seed: int, stream_id: int, train_aug: bool = True):
        if batch_size > len(data):
            raise UserError(f"batch size {batch_size} exceeds the {len(data)} training images")
        self.data, self.batch_size, self.seed, self.stream_id = data, batch_size, seed, stream_id
        self.train_aug = train_aug
        self.steps_per_pass = len(data) // batch_size
        self._perm_pass, self._perm = -1, None

    def indices(self, t: int) -> torch.Tensor:
        p, i = divmod(t, self.steps_per_pass)
        if p != self._perm_pass:
            self._perm = torch.randperm(len(self.data), generator=_gen(self.seed, self.stream_id, p))
            self._perm_pass = p
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(t)
        images = self.data.images[idx]
        if self.train_aug:
            images = augment(images, _gen(self.seed, self.stream_id, t, 1))
        return normalize(images), self.data.labels[idx]


def eval_batches(data: ImageSet, batch_size: int):
    for i in range(0, len(data), batch_size):
        yield normalize(data.images[i:i + batch_size]), data.labels[i:i + batch_size]
