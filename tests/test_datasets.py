"""CIFAR-100 and ImageNet loaders (SPEC 7 data rules), on small trees the tests write from real
CIFAR-10 images: a cifar-100-python release of relabelled images, an ImageFolder tree of upscaled
JPEG/PNG files."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common.config import DataCfg
from common.data import (CIFAR10_MEAN, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES,
                         FolderSet, ImageSet, Stream, eval_batches, input_shape, load_cifar,
                         load_dataset, normalize, resized_crop_params)
from common.errors import UserError
from common.models import build_model
from common.train import correct_per_sample, recalibrate_bn
from conftest import DATA




@pytest.fixture(scope="module")
def cifar10_test():
    return load_cifar(DATA, "cifar10", train=False, download=False)


def np_normalize(images: torch.Tensor, mean, std) -> np.ndarray:
    x = images.numpy().astype(np.float64)
    return (x - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]


# -------------------------------------------------------------------- CIFAR-100
def write_cifar100(root, source: ImageSet, n_train=200, n_test=100):
    """A cifar-100-python release made of real CIFAR-10 images relabelled: fine label = index % 100."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = (torch.arange(len(source.labels)) % 100).tolist()
    for name, sl in (("train", slice(0, n_train)), ("test", slice(n_train, n_train + n_test))):
        images = source.images[sl].numpy().reshape(-1, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * len(images), b"batch_label": name.encode(),
                         b"fine_labels": fine[sl], b"coarse_labels": [c // 5 for c in fine[sl]],
                         b"data": images}, f)
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [str(i).encode() for i in range(100)]}))
    return fine


def test_cifar100_uses_fine_labels_and_its_own_statistics(tmp_path, cifar10_test):
    fine = write_cifar100(tmp_path, cifar10_test)
    cfg = DataCfg(dataset="cifar100", root=str(tmp_path))
    train, test = load_dataset(cfg, train=True), load_dataset(cfg, train=False)
    assert train.images.dtype == torch.uint8 and train.images.shape == (200, 3, 32, 32) and len(test) == 100
    assert torch.equal(train.images, cifar10_test.images[:200])
    assert torch.equal(test.images, cifar10_test.images[200:300])
    assert train.labels.tolist() == fine[:200] and int(train.labels.max()) == 99
    assert (train.mean, train.std) == (CIFAR100_MEAN, CIFAR100_STD)
    x, y = next(eval_batches(test, 64))
    np.testing.assert_allclose(x.numpy(), np_normalize(test.images[:64], CIFAR100_MEAN, CIFAR100_STD), atol=1e-5)
    assert torch.equal(y, test.labels[:64])
    s = Stream(train, 50, 3, 0, train_aug=False)
    x, y = s.batch(1)
    np.testing.assert_allclose(x.numpy(), np_normalize(train.images[s.indices(1)], CIFAR100_MEAN, CIFAR100_STD),
                               atol=1e-5)
    assert Stream(train, 50, 3, 0).batch(1)[0].shape == (50, 3, 32, 32)      # augmented path
    sub = load_dataset(DataCfg(dataset="cifar100", root=str(tmp_path), train_subset=100), train=True)
    assert (sub.mean, sub.std) == (CIFAR100_MEAN, CIFAR100_STD) and sorted(sub.labels.tolist()) == list(range(100))
    # CIFAR-10 and existing callers of normalize() keep CIFAR-10's statistics
    assert load_cifar(DATA, "cifar10", train=False).mean == CIFAR10_MEAN
    assert torch.equal(normalize(test.images[:2]), normalize(test.images[:2], CIFAR10_MEAN, cifar10_test.std))
    assert NUM_CLASSES["cifar100"] == 100 and input_shape("cifar100") == (3, 32, 32)


def test_cifar100_missing_download_and_its_failure(tmp_path, cifar10_test, monkeypatch):
    with pytest.raises(UserError, match="no cifar-100-python/ folder"):
        load_cifar(tmp_path, "cifar100", train=True, download=False)
    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise RuntimeError("Error downloading cifar-100-python.tar.gz")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(UserError, match=r"no cifar-100-python/ there and the download failed \(RuntimeError"):
        load_dataset(DataCfg(dataset="cifar100", root=str(tmp_path)), train=True)
    assert len(calls) == 1 and calls[0][1:] == (True, True)
    assert Path(calls[0][0]).parent == tmp_path and Path(calls[0][0]).name.startswith(".cifar-100-python.")
    assert list(tmp_path.iterdir()) == []  # the temporary download folder is gone

    class Online:  # what torchvision does when it can download: the release appears under the root it is given
        def __init__(self, root, train, download):
            write_cifar100(Path(root), cifar10_test)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Online)
    assert len(load_dataset(DataCfg(dataset="cifar100", root=str(tmp_path)), train=False)) == 100
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python"]


# ------------------------------------------------------------ CIFAR-10 download and completeness
def link_release(folder, skip=()):
    """folder/ holding links to the real CIFAR-10 files, except those named in `skip`."""
    folder.mkdir(parents=True)
    for f in sorted((DATA / "cifar-10-batches-py").iterdir()):
        if f.name not in skip:
            (folder / f.name).symlink_to(f)


def test_a_cifar10_folder_missing_one_file_is_one_line_naming_it(tmp_path):
    link_release(tmp_path / "cifar-10-batches-py", skip=("data_batch_3",))
    for train in (True, False):  # the test split alone would not read data_batch_3: refused all the same
        with pytest.raises(UserError, match=r"cifar-10-batches-py: incomplete, no data_batch_3 ") as e:
            load_dataset(DataCfg(root=str(tmp_path)), train=train)
        assert "\n" not in str(e.value)


def test_an_interrupted_download_leaves_no_folder_that_is_read_as_data(tmp_path, monkeypatch, cifar10_test):
    class Interrupted:  # torchvision's CIFAR10(root, download=True) stopped half-way through extracting
        def __init__(self, root, train, download):
            link_release(Path(root) / "cifar-10-batches-py", skip=("data_batch_4", "data_batch_5", "test_batch"))
            raise KeyboardInterrupt

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_cifar(tmp_path, "cifar10", train=False)
    assert list(tmp_path.iterdir()) == []  # neither the release's name nor the temporary folder
    with pytest.raises(UserError, match="no cifar-10-batches-py/ folder"):
        load_cifar(tmp_path, "cifar10", train=False, download=False)

    # a kill -9 mid-download leaves its hidden temporary folder behind: never read, the next run downloads
    link_release(tmp_path / ".cifar-10-batches-py.killed.tmp/cifar-10-batches-py", skip=("test_batch",))

    class Complete:
        def __init__(self, root, train, download):
            link_release(Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Complete)
    test = load_cifar(tmp_path, "cifar10", train=False)
    assert torch.equal(test.images, cifar10_test.images) and torch.equal(test.labels, cifar10_test.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cifar-10-batches-py.killed.tmp", "cifar-10-batches-py"]

    class Incomplete:  # a download that ends without error but lacks a file is refused, not moved into place
        def __init__(self, root, train, download):
            link_release(Path(root) / "cifar-10-batches-py", skip=("batches.meta",))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Incomplete)
    with pytest.raises(UserError, match="the downloaded cifar-10-batches-py/ lacks batches.meta"):
        load_cifar(tmp_path / "other", "cifar10", train=False)
    assert not (tmp_path / "other").exists()   # nothing left that could be read as data, not even the folder


# --------------------------------------------------------------------- ImageNet
CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]


def write_tree(base, source: ImageSet, per_train=6, per_val=2, flat_val=False):
    """base/{train,val}/<wnid>/*: real CIFAR-10 images of class c upscaled to 80x64, JPEG and PNG."""
    for c, wnid in enumerate(CLASSES):
        idx = torch.nonzero(source.labels == c).flatten()[:per_train + per_val].tolist()
        for k, i in enumerate(idx):
            split = "train" if k < per_train else "val"
            folder = base / split / ("" if split == "val" and flat_val else wnid)
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(source.images[i].permute(1, 2, 0).numpy()).resize((80, 64), Image.BICUBIC)
            ext = "png" if k % 3 == 2 else "JPEG"
            img.save(folder / f"{wnid}_{i}.{ext}")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory, cifar10_test):
    root = tmp_path_factory.mktemp("data")
    write_tree(root / "imagenet", cifar10_test)
    return root


def imagenet(root, train, workers=0, **kw):
    return load_dataset(DataCfg(dataset="imagenet", root=str(root), loader_workers=workers, **kw), train)


def test_imagenet_tree_loads_as_imagefolder(imagenet_root):
    train, val = imagenet(imagenet_root, True), imagenet(imagenet_root, False)
    assert isinstance(train, FolderSet) and len(train) == 24 and len(val) == 8
    assert train.classes == CLASSES and val.classes == CLASSES
    reference = torchvision.datasets.ImageFolder(str(imagenet_root / "imagenet" / "train"))
    assert train.paths == [p for p, _ in reference.samples] and train.labels.tolist() == reference.targets
    assert sum(p.endswith(".png") for p in train.paths) == 8                      # PNG and JPEG alike
    assert NUM_CLASSES["imagenet"] == 1000 and input_shape("imagenet") == (3, 224, 224)
    sub = imagenet(imagenet_root, True, train_subset=8)
    assert len(sub) == 8 and torch.bincount(sub.labels).tolist() == [2] * 4 and sub.mean == IMAGENET_MEAN


def test_imagenet_eval_pipeline_is_resize256_centercrop224(imagenet_root):
    val = imagenet(imagenet_root, False)
    xs, ys = zip(*eval_batches(val, 3))
    assert [len(y) for y in ys] == [3, 3, 2]
    x = torch.cat(xs)
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    expect = torch.stack([ref(Image.open(p).convert("RGB")) for p in val.paths])
    np.testing.assert_allclose(x.numpy(), np_normalize(expect, IMAGENET_MEAN, IMAGENET_STD), atol=1e-4)
    assert torch.equal(torch.cat(ys), val.labels)


def test_imagenet_stream_is_a_function_of_seed_stream_and_step(imagenet_root):
    train = imagenet(imagenet_root, True)
    a = Stream(train, 8, 1, 0)
    assert a.steps_per_pass == 3
    seq = [a.batch(t) for t in range(4)]                                        # prefetching loader
    x2, y2 = Stream(train, 8, 1, 0).batch(2)                                    # a fresh stream, jumping
    assert x2.shape == (8, 3, 224, 224) and x2.dtype == torch.float32
    assert torch.equal(x2, seq[2][0]) and torch.equal(y2, seq[2][1])
    assert torch.equal(a.batch(1)[0], seq[1][0])                                # going back restarts there
    assert torch.equal(seq[2][1], train.labels[a.indices(2)])
    assert sorted(torch.cat([a.indices(t) for t in range(3)]).tolist()) == list(range(24))  # a pass
    assert not torch.equal(Stream(train, 8, 1, 1).batch(2)[0], x2)              # another worker's stream
    multi = Stream(imagenet(imagenet_root, True, workers=2), 8, 1, 0)           # loader processes
    assert torch.equal(multi.batch(2)[0], x2) and torch.equal(multi.batch(3)[0], seq[3][0])


def test_imagenet_train_images_are_random_resized_crops(imagenet_root):
    train = imagenet(imagenet_root, True)
    s = Stream(train, 4, 0, 0)
    x, _ = s.batch(0)
    for k, (i, seed) in enumerate(s.folder_items(0)):                            # the plumbing: seed → image
        gen = torch.Generator().manual_seed(seed)
        img = Image.open(train.paths[i]).convert("RGB")
        top, left, h, w = resized_crop_params(img.width, img.height, gen)
        crop = TF.resized_crop(img, top, left, h, w, [224, 224])
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = TF.hflip(crop)
        expect = np_normalize(TF.pil_to_tensor(crop)[None], IMAGENET_MEAN, IMAGENET_STD)[0]
        np.testing.assert_allclose(x[k].numpy(), expect, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):                                                         # torchvision's RRC rule
        top, left, h, w = resized_crop_params(80, 64, gen)
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 80
        assert 0.08 * 80 * 64 * 0.9 <= h * w <= 80 * 64 and 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15


def test_imagenet_trains_evaluates_and_recalibrates(imagenet_root):
    train, val = imagenet(imagenet_root, True), imagenet(imagenet_root, False)
    torch.manual_seed(0)
    model = build_model({"name": "resnet18_in", "num_classes": NUM_CLASSES["imagenet"], "width": 0.125})
    recalibrate_bn(model, Stream(train, 8, 0, 9), 2, "cpu")
    assert float(model.bn1.running_var.mean()) != 1.0
    correct, loss = correct_per_sample(model, val, 4, "cpu")
    acc = 100.0 * correct.float().mean().item()
    assert 0.0 <= acc <= 100.0 and np.isfinite(loss)


def test_imagenet_is_never_downloaded_and_the_tree_is_checked(tmp_path, cifar10_test):
    with pytest.raises(UserError, match="cannot be downloaded.*imagenet/train/<wnid>"):
        imagenet(tmp_path, True)
    write_tree(tmp_path / "flat", cifar10_test, per_train=1, flat_val=True)    # the raw ILSVRC val/ layout
    with pytest.raises(UserError, match="sort it into one folder per class"):
        imagenet(tmp_path / "flat", False)
    assert len(imagenet(tmp_path / "flat", True)) == 4                          # ROOT/{train,val} also accepted
    write_tree(tmp_path / "bad" / "imagenet", cifar10_test, per_train=2)
    (tmp_path / "bad/imagenet/train" / CLASSES[0] / "broken.JPEG").write_bytes(b"not a jpeg")
    for workers in (0, 1):
        s = Stream(imagenet(tmp_path / "bad", True, workers=workers), 9, 0, 0, train_aug=False)
        with pytest.raises(UserError, match=r"broken\.JPEG: not a readable image") as e:
            s.batch(0)
        assert "\n" not in str(e.value)


def test_image_size_resizes_every_batch_on_the_device_and_is_recorded_in_the_arch(tmp_path):
    """data.image_size: the training stream and the evaluation batches give the model inputs of that
    side (bilinear resize of the normalised 32 px batch); the input shape goes into the arch."""
    import torch.nn.functional as F
    from common.config import load_config
    from common.data import eval_batches, input_shape, load_dataset, normalize
    from common.models import arch_of
    cfg = load_config(None, [f"data.root={DATA}", "data.test_subset=100", "data.image_size=48"])
    test = load_dataset(cfg.data, train=False)
    x, y = next(eval_batches(test, 10))
    assert x.shape == (10, 3, 48, 48) and torch.equal(y, test.labels[:10])
    expected = F.interpolate(normalize(test.images[:10], test.mean, test.std), size=(48, 48), mode="bilinear",
                             align_corners=False)
    assert torch.equal(x, expected)
    assert Stream(test, 20, 0, 0).batch(0)[0].shape == (20, 3, 48, 48)
    assert input_shape(cfg.data) == (3, 48, 48) and arch_of(cfg.model, cfg.data)["input_shape"] == [3, 48, 48]
    assert "input_shape" not in arch_of(cfg.model, load_config(None).data)   # the zoo's files unchanged
