"""Data pipeline and config validation against independent expectations."""
import pytest
import torch

from common.config import load_config, parse_set
from common.data import Stream, apply_augment, draw_augment, balanced_subset, load_cifar, normalize
from common.errors import UserError
from conftest import DATA


def test_real_cifar10_loads_as_uint8_with_published_statistics():
    train = load_cifar(DATA, "cifar10", train=True)
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert train.labels[0] == 6  # the well-known frog
    mean = train.images[:10000].float().mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([125.3, 122.95, 113.87]), atol=1.5)


def test_balanced_subset_is_deterministic_and_balanced():
    labels = load_cifar(DATA, "cifar10", train=False).labels
    idx = balanced_subset(labels, 205)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts == [21] * 5 + [20] * 5
    assert torch.equal(idx, balanced_subset(labels, 205))


def test_augment_is_a_shifted_crop_or_its_mirror():
    imgs = load_cifar(DATA, "cifar10", train=False).images[:64]
    out = apply_augment(imgs, *draw_augment(len(imgs), torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(imgs, (4, 4, 4, 4))
    for i in range(64):  # every output is one of the 81 crops of the padded image, maybe flipped
        wins = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # 3 x 9 x 9 x 32 x 32
        cands = wins.permute(1, 2, 0, 3, 4).reshape(81, 3, 32, 32)
        hit = (cands == out[i]).all((1, 2, 3)).any() or (cands.flip(3) == out[i]).all((1, 2, 3)).any()
        assert hit
    assert not torch.equal(out, imgs)


def test_stream_batches_are_a_function_of_seed_stream_and_step():
    data = load_cifar(DATA, "cifar10", train=False).subset(torch.arange(300))
    a, b = Stream(data, 50, 1, 0), Stream(data, 50, 1, 0)
    x7, y7 = a.batch(7)
    b.batch(2)
    assert torch.equal(b.batch(7)[0], x7)
    seen = torch.cat([a.indices(t) for t in range(6)])  # one pass: a permutation of the data
    assert sorted(seen.tolist()) == list(range(300))
    assert not torch.equal(Stream(data, 50, 1, 1).batch(7)[0], x7)
    assert torch.allclose(normalize(data.images[:1]).mean(), normalize(data.images[:1]).mean())


def test_config_overrides_and_errors(tmp_path):
    assert parse_set(["a.b=3", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 3, "c": [1, 2]}, "d": "x"}
    cfg = load_config("yaml/quick_c10.yaml", ["pretrain.workers=4", "model.width=0.5"])
    assert cfg.pretrain.workers == 4 and cfg.model.width == 0.5 and cfg.name == "quick_c10"
    assert isinstance(load_config("yaml/quick_c10.yaml", ["model.width=1"]).model.width, float)
    for bad in (["pretrain.momentum=1.0"], ["pretrain.carry_momentum=yes please"], ["seed=-1"],
                ["pretrain.workers=1"], ["pretrain.epochs=0"], ["nokey"]):
        with pytest.raises(UserError):
            load_config("yaml/quick_c10.yaml", bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(tmp_path / "list.yaml")
