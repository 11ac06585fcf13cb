"""Datasets and deterministic per-worker streams of batches.

CIFAR-10 and CIFAR-100 are held as uint8 tensors and augmented batch-wise (random crop with
4-pixel padding + flip), each normalised with its own published per-channel statistics
(`ImageSet.mean/std`). ImageNet is an ImageFolder tree decoded on demand by a multi-worker
torch DataLoader with the standard 224 pipeline (train: RandomResizedCrop(224) + flip; eval:
Resize(256) + CenterCrop(224)); `Stream` and `eval_batches` serve both kinds through the same
interface.

Every batch is a pure function of (seed, stream id, step): the permutation of a pass and the
augmentation of a batch (for ImageNet: of every image, from a per-image seed drawn from the
step's generator, whichever loader process decodes it) come from generators seeded by those
numbers. So one process running S workers in turn, S ranks running one each, and a run
resumed at any round all draw exactly the same images.

Where the data live (`data.root`): ROOT/cifar-10-batches-py/, ROOT/cifar-100-python/ (both
downloaded through torchvision when absent), ROOT/imagenet/{train,val}/<class>/*.JPEG or
ROOT/{train,val}/<class>/* (never downloaded; val/ sorted into class folders). A download goes to
a hidden temporary folder and is renamed into place once complete, and a CIFAR folder missing
any file of the release is refused, so an interrupted download or copy is never read as data.
Under the launcher one rank per node prepares the data while the others wait (`prepare_data`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.dist import agreed
from common.errors import UserError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
IMAGENET_DIR = "imagenet"
# Published per-channel statistics of the training sets (0..255 scale).
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)
CIFAR100_MEAN = (129.304, 124.070, 112.434)
CIFAR100_STD = (68.170, 65.392, 70.418)
IMAGENET_MEAN = (123.675, 116.280, 103.530)   # torchvision's (0.485, 0.456, 0.406) x 255
IMAGENET_STD = (58.395, 57.120, 57.375)       # (0.229, 0.224, 0.225) x 255
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
TRAIN_SIZE = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}   # full training sets
IMAGENET_CROP, IMAGENET_RESIZE = 224, 256
SHARD_STREAM = 6_000_001  # generator namespace of the pass permutation that pretrain.data=shard splits


def input_shape(data) -> tuple[int, int, int]:
    """C x H x W of one model input (for FLOPs, activation sizes, dry runs), for a data config
    (data.image_size, else the dataset's own side) or a dataset's name."""
    dataset, image_size = (data, 0) if isinstance(data, str) else (data.dataset, data.image_size)
    side = image_size or (IMAGENET_CROP if dataset == "imagenet" else 32)
    return (3, side, side)


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x 3 x 32 x 32
    labels: torch.Tensor  # int64, N
    mean: tuple = CIFAR10_MEAN  # per-channel statistics `normalize` uses for this set
    std: tuple = CIFAR10_STD
    image_size: int = 0         # the model input's side, if not the images' own (data.image_size)

    def __len__(self):
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        idx = idx.to(self.labels.device)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def to(self, device) -> "ImageSet":
        """The set on `device` (moved once: batches are then cut and augmented there)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))


# ----------------------------------------------------------------------- CIFAR
_CIFAR = {  # dataset → (folder, torchvision class name, train files, test files, label key, mean, std)
    "cifar10": (CIFAR10_DIR, "CIFAR10", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_DIR, "CIFAR100", ["train"], ["test"], b"fine_labels", CIFAR100_MEAN, CIFAR100_STD),
}


def shown_root(root: Path) -> str:
    """data.root as given and, when relative, the absolute path it meant from here."""
    return f"{root}" if root.is_absolute() else f"{root} (= {root.absolute()})"


# The release's other file, besides the train and test batches: a folder without it is incomplete.
_CIFAR_META = {"cifar10": "batches.meta", "cifar100": "meta"}


def release_files(dataset: str) -> list[str]:
    """Every file of a CIFAR python release (what a complete folder holds)."""
    _, _, train_files, test_files = _CIFAR[dataset][:4]
    return [*train_files, *test_files, _CIFAR_META[dataset]]


def _missing(folder: Path, dataset: str) -> list[str]:
    return [name for name in release_files(dataset) if not (folder / name).is_file()]


def _download(root: Path, dataset: str = "cifar10"):
    """Fetch the release through torchvision into a hidden temporary folder in `root`, then rename
    it into place: never a half-extracted folder under the name that is read as data."""
    name, tv_class = _CIFAR[dataset][:2]
    made = [p for p in (root, *root.parents) if not p.exists()]   # the folders this download creates
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    except OSError as e:
        _remove_empty(made)
        raise UserError(f"data.root={shown_root(root)}: no {name}/ there and no folder can be made there to "
                        f"download it ({e.strerror or type(e).__name__})") from None
    done = False
    try:
        try:
            import torchvision
            getattr(torchvision.datasets, tv_class)(str(tmp), train=True, download=True)
        except Exception as e:  # no network, disk full, ...: the user must point at a copy
            raise UserError(f"data.root={shown_root(root)}: no {name}/ there and the download failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point data.root "
                            f"at a folder holding {name}/ (an absolute path works from any folder)") from None
        missing = _missing(tmp / name, dataset)
        if missing:
            raise UserError(f"data.root={shown_root(root)}: the downloaded {name}/ lacks {', '.join(missing)}")
        try:
            os.rename(tmp / name, root / name)
        except OSError:
            if not (root / name).is_dir():  # else another node sharing this folder renamed its copy first
                raise
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # also after an interrupt; only a kill leaves it (hidden, unread)
        if not done:
            _remove_empty(made)   # a failed download leaves no empty data/ behind


def _remove_empty(folders: list[Path]):
    """Remove `folders` (deepest first) where they are empty: what a failed download created."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # not empty (another process wrote there) or already gone
            return


def cifar_dir(root: str | Path, dataset: str, download: bool = True) -> Path:
    """ROOT/<release folder>, downloaded when absent (if `download`); a folder missing any file of
    the release is one line naming what is missing."""
    root = Path(root)
    name = _CIFAR[dataset][0]
    folder = root / name
    if not folder.is_dir():
        if not download:
            raise UserError(f"data.root={shown_root(root)}: no {name}/ folder there")
        _download(root, dataset)
    missing = _missing(folder, dataset)
    if missing:
        raise UserError(f"{folder}: incomplete, no {', '.join(missing)} (an interrupted copy?); replace it with a "
                        f"complete {name}/, or delete it to download it again")
    return folder


def prepare_data(cfg_data, env):
    """Have the configured dataset ready before any rank reads it: local rank 0 of each node
    downloads or checks it while the node's other ranks wait; a failure ends every rank with one
    line (common.dist.agreed). Plain `python`: just the check (or download)."""
    with agreed(env, f"preparing data.root={cfg_data.root}"):
        if env.local_rank == 0:
            if cfg_data.dataset in _CIFAR:
                cifar_dir(cfg_data.root, cfg_data.dataset)
            elif cfg_data.dataset == "imagenet":
                imagenet_dir(cfg_data.root)


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR release pickles dicts of numpy arrays, lists and bytes: nothing else may load."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes = b"labels") -> tuple[np.ndarray, list]:
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        data, labels = np.asarray(d[b"data"]), np.asarray(d[label_key])
    except Exception as e:  # truncated, overwritten, foreign: whatever pickle makes of it
        raise UserError(f"{path}: not a readable CIFAR batch ({type(e).__name__})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise UserError(f"{path}: not a CIFAR batch (expected N x 3072 uint8 images and N labels, "
                        f"got {data.dtype} {data.shape} and {labels.shape[0] if labels.ndim else 0} labels)")
    return data, labels


def load_cifar(root: str | Path, dataset: str, train: bool, download: bool = True) -> ImageSet:
    """CIFAR-10 or CIFAR-100 (its 100 fine labels) from the python-pickle release."""
    _, _, train_files, test_files, label_key, mean, std = _CIFAR[dataset]
    folder = cifar_dir(root, dataset, download)
    parts = [_read_batch(folder / n, label_key) for n in (train_files if train else test_files)]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])
    return ImageSet(torch.from_numpy(data), torch.from_numpy(labels), mean, std)


# -------------------------------------------------------------------- ImageNet
@dataclass
class FolderSet:
    """One split of an ImageFolder tree (ImageNet): file paths and labels, images decoded on demand."""
    paths: list           # image files
    labels: torch.Tensor  # int64, N (class folders in sorted order, as torchvision's ImageFolder)
    classes: list         # class folder names
    loader_workers: int = 4              # DataLoader processes decoding images (0 = this process)
    crop: int = IMAGENET_CROP            # side of the model input
    resize: int = IMAGENET_RESIZE        # eval: shorter side resized to this, then centre crop
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    image_size: int = 0                  # the model input's side, if not `crop` (data.image_size)

    def __len__(self):
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "FolderSet":
        return dataclasses.replace(self, paths=[self.paths[i] for i in idx.tolist()], labels=self.labels[idx])


def imagenet_dir(root: str | Path) -> Path:
    """ROOT/imagenet or ROOT itself, whichever holds train/ and val/. ImageNet is never downloaded."""
    root = Path(root)
    for cand in (root / IMAGENET_DIR, root):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    raise UserError(f"data.root={shown_root(root)}: no ImageNet there. It cannot be downloaded automatically: get "
                    f"ILSVRC2012 from image-net.org and lay it out as {root / IMAGENET_DIR}/train/<wnid>/*.JPEG "
                    f"and {root / IMAGENET_DIR}/val/<wnid>/*.JPEG (val sorted into class folders), or point "
                    "data.root at a folder holding train/ and val/")


def load_imagenet(root: str | Path, train: bool, loader_workers: int = 4) -> FolderSet:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    def class_folders(folder):
        try:
            return find_classes(folder)
        except FileNotFoundError:
            return [], {}

    base = imagenet_dir(root)
    split = base / ("train" if train else "val")
    classes, class_to_idx = class_folders(base / "train")
    if not classes:
        raise UserError(f"{base / 'train'}: no class folders; expected train/<wnid>/*.JPEG")
    if not train and class_folders(split)[0] != classes:
        raise UserError(f"{split}: its class folders differ from {base / 'train'}'s (the ILSVRC2012 val/ "
                        "comes flat: sort it into one folder per class, as train/)")
    try:
        samples = make_dataset(split, class_to_idx, IMG_EXTENSIONS, allow_empty=not train)
    except FileNotFoundError as e:  # a training class without images
        raise UserError(f"{split}: {str(e).splitlines()[0]}") from None
    if len(classes) > NUM_CLASSES["imagenet"]:
        raise UserError(f"{base / 'train'}: {len(classes)} class folders, more than ImageNet's 1000")
    if not samples:
        raise UserError(f"{split}: no images (extensions {', '.join(IMG_EXTENSIONS)})")
    return FolderSet([p for p, _ in samples], torch.tensor([c for _, c in samples], dtype=torch.int64),
                     classes, loader_workers)


def resized_crop_params(width: int, height: int, gen: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (top, left, h, w), drawing from `gen`."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the admissible aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode(path: str, crop: int, resize: int, gen: torch.Generator | None) -> torch.Tensor:
    """One image as uint8 3 x crop x crop: train pipeline if `gen` is given, else eval pipeline."""
    from PIL import Image, UnidentifiedImageError
    import torchvision.transforms.functional as TF
    try:
        with Image.open(path) as f:
            img = f.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
    if gen is None:
        img = TF.center_crop(TF.resize(img, resize), crop)
    else:
        top, left, h, w = resized_crop_params(img.width, img.height, gen)
        img = TF.resized_crop(img, top, left, h, w, [crop, crop])
        if torch.rand(1, generator=gen).item() < 0.5:
            img = TF.hflip(img)
    return TF.pil_to_tensor(img)


class _Decoded(torch.utils.data.Dataset):
    """Items: index (eval pipeline) or (index, per-image seed) (train pipeline)."""

    def __init__(self, data: FolderSet):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return decode(self.data.paths[i], self.data.crop, self.data.resize, gen), self.data.labels[i]


class _StepBatches:
    """The batch sampler of a Stream over a FolderSet: the items of steps t0, t0+1, ... (endless)."""

    def __init__(self, stream: "Stream", t0: int):
        # A weak reference: no cycle stream → loader → sampler → stream, so a dropped stream stops
        # its loader processes at once (a cycle left them to the garbage collector: seconds of joins).
        self.stream, self.t0 = weakref.proxy(stream), t0

    def __iter__(self):
        t = self.t0
        while True:
            yield self.stream.folder_items(t)
            t += 1


class _Loader:
    """A DataLoader iterator over a FolderSet. On an error it lets go of the iterator at once (its
    processes stop now, not when a traceback is collected) and an error raised inside a loader
    process becomes one UserError line."""

    def __init__(self, data: FolderSet, **kw):
        self.it = iter(torch.utils.data.DataLoader(_Decoded(data), num_workers=data.loader_workers, **kw))

    def next(self):
        try:
            return next(self.it)
        except UserError as e:
            message = str(e).strip().splitlines()[-1].removeprefix("common.errors.UserError: ")
        except BaseException:
            self.it = None
            raise
        self.it = None
        raise UserError(message)  # outside the except block: no traceback chained to the iterator


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


def on_device(data: ImageSet | FolderSet, env) -> ImageSet | FolderSet:
    """A CIFAR set moved once to the rank's device (batches are then cut and augmented there);
    an ImageNet folder stays on disk (its loader copies each batch over)."""
    return data.to(env.device) if isinstance(data, ImageSet) else data


def load_dataset(cfg_data, train: bool) -> ImageSet | FolderSet:
    """The configured split (class-balanced subset if asked): an ImageSet (CIFAR) or FolderSet (ImageNet)."""
    if cfg_data.dataset in _CIFAR:
        ds = load_cifar(cfg_data.root, cfg_data.dataset, train)
    elif cfg_data.dataset == "imagenet":
        ds = load_imagenet(cfg_data.root, train, getattr(cfg_data, "loader_workers", 4))
    else:
        raise UserError(f"data.dataset={cfg_data.dataset!r} is not supported")
    n = cfg_data.train_subset if train else cfg_data.test_subset
    if n:
        if n > len(ds):
            raise UserError(f"data.{'train' if train else 'test'}_subset={n} exceeds the {len(ds)} images")
        ds = ds.subset(balanced_subset(ds.labels, n))
    return dataclasses.replace(ds, image_size=getattr(cfg_data, "image_size", 0))


def model_input(images: torch.Tensor, data: ImageSet | FolderSet) -> torch.Tensor:
    """A uint8 batch as the model reads it: normalised, and resized (bilinear, on the batch's device)
    to `data.image_size` where that is set and differs from the images' side."""
    x = normalize(images, data.mean, data.std)
    side = data.image_size
    if side and tuple(x.shape[-2:]) != (side, side):
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x


# ------------------------------------------------------------------ transforms
def normalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 N x 3 x H x W → float, per-channel (x - mean) / std (0..255 statistics; CIFAR-10's by default).
    Runs where `images` are; a subtraction and a true division, so CPU and CUDA agree bit for bit."""
    mean, std = _channel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as 1 x 3 x 1 x 1 tensors on `device`, copied there once (not every batch)."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (mean, std))


def draw_augment(n: int, gen: torch.Generator, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of crop-with-padding + flip for n images: (row offsets, column offsets, flips),
    drawn on the CPU from `gen` in this order, so a batch is the same wherever it is applied."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return dy, dx, flip


def apply_augment(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  pad: int = 4) -> torch.Tensor:
    """Crop each zero-padded image at (dy, dx) and flip it where `flip`: pure indexing (exact on any
    device), one gather for the whole batch; the draws must be on the images' device. A flipped
    crop reads its columns right to left, so the flip is part of the gather's column index."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    image, channel, row, col, col_flipped = _crop_grid(n, c, h, w, images.device)
    rows = dy.view(n, 1, 1, 1) + row
    cols = dx.view(n, 1, 1, 1) + torch.where(flip.view(n, 1, 1, 1), col_flipped, col)
    return padded[image, channel, rows, cols]


@functools.lru_cache(maxsize=16)
def _crop_grid(n: int, c: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The index tensors of a batch's crop (image, channel, row, column, column read backwards),
    shaped to broadcast over n x c x h x w; made once per batch shape, not every step."""
    def along(dim: int, values: torch.Tensor) -> torch.Tensor:
        return values.view([-1 if d == dim else 1 for d in range(4)]).to(device)
    return (along(0, torch.arange(n)), along(1, torch.arange(c)), along(2, torch.arange(h)),
            along(3, torch.arange(w)), along(3, torch.arange(w - 1, -1, -1)))


def _gen(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class Stream:
    """An endless, shuffled, augmented stream of batches over a dataset, addressed by step.

    Pass p uses permutation randperm(seed, stream, p); a pass has len // batch steps (the last
    partial batch is dropped). `batch(t)` is the t-th batch of the stream, reproducible anywhere.
    Over an ImageSet the batch is cut, augmented and normalised where the images are (the
    training device): the permutation and every step's crop offsets and flips of a pass are
    drawn on the CPU when the pass starts and copied over once, so no step waits on the host.
    Over a FolderSet (ImageNet) the images are decoded by a DataLoader that prefetches steps
    t+1, t+2, ... while step t trains (pinned memory, non-blocking copies to `device`); asking
    for another step than the next restarts it there.
    """

    def __init__(self, data: ImageSet | FolderSet, batch_size: int, seed: int, stream_id: int,
                 train_aug: bool = True, device=None, shard: tuple[int, int] | None = None):
        self.shard = shard  # (s, S): walk part s of S of one permutation all S shards share
        per_pass = len(data) // shard[1] if shard else len(data)
        if batch_size > per_pass:
            raise UserError(f"batch size {batch_size} exceeds the {per_pass} training images of a pass"
                            + (f" (1/{shard[1]} of {len(data)}: pretrain.data=shard)" if shard else ""))
        self.data, self.batch_size, self.seed, self.stream_id = data, batch_size, seed, stream_id
        self.train_aug = train_aug
        self.device = torch.device(device) if device is not None else (
            data.images.device if isinstance(data, ImageSet) else torch.device("cpu"))
        self.steps_per_pass = per_pass // batch_size
        self._pass, self._perm, self._draws = -1, None, None  # the current pass's plan (on self.device)
        self._loader, self._next_t = None, None  # FolderSet: the DataLoader iterator and its next step

    def _plan(self, p: int):
        """Permutation and augmentation draws of pass p, on the device (made once per pass)."""
        if p == self._pass:
            return
        if self.shard:  # one permutation of pass p for all shards (disjoint, covering), cut in S parts
            s, count = self.shard
            perm = torch.randperm(len(self.data), generator=_gen(self.seed, SHARD_STREAM, p))
            perm = torch.tensor_split(perm, count)[s]
        else:
            perm = torch.randperm(len(self.data), generator=_gen(self.seed, self.stream_id, p))
        self._perm_cpu, self._perm = perm, perm.to(self.device)
        self._draws = None
        if self.train_aug and isinstance(self.data, ImageSet):
            first = p * self.steps_per_pass
            per_step = [draw_augment(self.batch_size, _gen(self.seed, self.stream_id, t, 1))
                        for t in range(first, first + self.steps_per_pass)]
            self._draws = [torch.stack(d).to(self.device) for d in zip(*per_step)]  # 3 x steps x batch
        self._pass = p

    def indices(self, t: int) -> torch.Tensor:
        """Indices (on the CPU) of step t's images."""
        p, i = divmod(t, self.steps_per_pass)
        self._plan(p)
        return self._perm_cpu[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step t's (normalised images, labels), on the device."""
        if isinstance(self.data, FolderSet):
            return self._folder_batch(t)
        p, i = divmod(t, self.steps_per_pass)
        self._plan(p)
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.data.images.index_select(0, idx)
        if self.train_aug:
            dy, dx, flip = (d[i] for d in self._draws)
            images = apply_augment(images, dy, dx, flip)
        return model_input(images, self.data), self.data.labels.index_select(0, idx)

    def folder_items(self, t: int) -> list:
        """Step t's DataLoader items: image indices, with per-image augmentation seeds if augmenting."""
        idx = self.indices(t).tolist()
        if not self.train_aug:
            return idx
        seeds = torch.randint(0, 2**62, (len(idx),), generator=_gen(self.seed, self.stream_id, t, 1)).tolist()
        return list(zip(idx, seeds))

    def _folder_batch(self, t: int):
        if self._loader is None or self._loader.it is None or t != self._next_t:
            self._loader = None  # shut the old loader processes down before starting new ones
            self._loader = _Loader(self.data, batch_sampler=_StepBatches(self, t),
                                   pin_memory=self.device.type == "cuda")
        images, labels = self._loader.next()
        self._next_t = t + 1
        images = images.to(self.device, non_blocking=True)
        return model_input(images, self.data), labels.to(self.device, non_blocking=True)


def eval_batches(data: ImageSet | FolderSet, batch_size: int, device=None):
    """The whole set in order, in batches of `batch_size`, normalised, on `device` (default: where
    an ImageSet is; ImageNet: eval pipeline, decoded by loader processes)."""
    if isinstance(data, FolderSet):
        device = torch.device(device or "cpu")
        loader = _Loader(data, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
        for _ in range(math.ceil(len(data) / batch_size)):
            images, labels = loader.next()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            yield model_input(images, data), labels
        return
    device = torch.device(device) if device is not None else data.images.device
    for i in range(0, len(data), batch_size):
        images, labels = data.images[i:i + batch_size].to(device), data.labels[i:i + batch_size].to(device)
        yield model_input(images, data), labels
