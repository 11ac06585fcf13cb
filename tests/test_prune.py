"""Stage 03: structured L1 filter pruning and unstructured magnitude masks (SPEC 5, 7)."""
import copy
import math
import shutil
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.checkpoint import PretrainEpoch, save
from common.config import load_config
from common.costs import flops_per_sample
from common.data import load_cifar, normalize
from common.errors import UserError
from common.models import build_model, count_params
from common.selection import prunable_blocks
from common.prune import magnitude_mask, maskable_weights, prune_filters, prune_magnitude
from conftest import DATA, REPO, brought_model_config, randomised, run_cli, stage

prune = stage("03_prune")
TINY_ARCH = {"name": "preresnet18", "num_classes": 10, "width": 0.125}




def expected_keep(channels, ratio):
    """ceil((1-p)·C) in exact arithmetic, at least 1."""
    return max(1, math.ceil(Fraction(100 - round(100 * ratio), 100) * channels))


def expected_round(n, ratio):
    """round((1-p)·n), half up, in exact arithmetic."""
    return math.floor(Fraction(100 - round(100 * ratio), 100) * n + Fraction(1, 2))


def numpy_top(scores, k):
    """Indices of the k largest scores, ties to the lower index (independent ranking)."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


@pytest.fixture(scope="module")
def images():
    test = load_cifar(DATA, "cifar10", train=False, download=False)
    return normalize(test.images[:16])


# ---------------------------------------------------------------- structured
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_kept_filters_are_the_top_l1_ones_and_other_blocks_are_unchanged(ratio):
    arch = {**TINY_ARCH, "width": 0.25}
    model = randomised(arch)
    state = model.state_dict()
    pruned = prune_filters(model, arch, ratio)
    new = pruned.model.state_dict()
    blocks = prunable_blocks(model)
    assert [b.name for b in blocks] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    sliced = set()
    for b in blocks:
        w = state[f"{b.name}.conv1.weight"].numpy().astype(np.float64)
        top = np.sort(numpy_top(np.abs(w).sum(axis=(1, 2, 3)), expected_keep(b.mid, ratio)))
        assert pruned.kept[b.name].dtype == torch.int64
        assert pruned.kept[b.name].tolist() == top.tolist()
        assert pruned.arch["mids"][b.name] == len(top)
        for key, (dim, _) in b.group.entries(state).items():
            assert torch.equal(new[key], state[key].index_select(dim, torch.from_numpy(top))), key
            sliced.add(key)
    for key in state.keys() - sliced:                     # stem, first blocks, shortcuts, head: bit-for-bit
        assert torch.equal(new[key], state[key]), key
    assert new.keys() == state.keys()


def test_l1_ties_go_to_the_lower_index_and_at_least_one_filter_stays():
    model = randomised(TINY_ARCH)
    with torch.no_grad():
        conv = model.layer2[1].conv1
        conv.weight[:] = conv.weight[3]                   # 16 equal filters: the first k must win
    pruned = prune_filters(model, TINY_ARCH, 0.5)
    assert pruned.kept["layer2.1"].tolist() == list(range(8))
    tiny = prune_filters(build_model({**TINY_ARCH, "width": 0.02}), {**TINY_ARCH, "width": 0.02}, 0.99)
    assert all(len(k) == 1 for k in tiny.kept.values())


@pytest.mark.parametrize("name", ["preresnet18", "resnet34"])
def test_pruned_model_computes_the_masked_full_model_on_cifar10(name, images):
    arch = {"name": name, "num_classes": 10, "width": 0.25}
    model = randomised(arch)
    pruned = prune_filters(model, arch, 0.5)
    masked = copy.deepcopy(model)                         # full model, pruned mid channels masked out
    with torch.no_grad():
        for b in prunable_blocks(masked):
            drop = torch.ones(b.mid, dtype=torch.bool)
            drop[pruned.kept[b.name]] = False
            masked.get_submodule(b.name).conv2.weight[:, drop] = 0
        out_pruned, out_masked, out_full = pruned.model.eval()(images), masked.eval()(images), model(images)
    assert (out_pruned - out_masked).abs().max().item() <= 1e-5
    assert (out_full - out_masked).abs().max().item() > 1e-3   # the mask does change the function
    assert count_params(pruned.model) < count_params(model)


def test_flops_convention_is_two_per_multiply_add():
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=False)
    assert flops_per_sample(conv, (5, 6, 6)) == 2 * 9 * 5 * 7 * 6 * 6
    assert flops_per_sample(nn.BatchNorm2d(5), (5, 6, 6)) == 0     # BN, ReLU, add, pool: not counted


def test_preresnet18_at_half_shrinks_by_the_hand_computed_params_and_flops():
    arch = {"name": "preresnet18", "num_classes": 10, "width": 1.0}
    torch.manual_seed(0)
    model = build_model(arch)
    pruned = prune_filters(model, arch, 0.5)
    # Prunable blocks (blocks [1:] of each stage): C mid channels, Cin = Cout = C, output H x H.
    blocks = [(64, 32), (128, 16), (256, 8), (512, 4)]
    params_lost = sum((c - math.ceil(c / 2)) * (9 * c + 2 + 9 * c) for c, _ in blocks)   # conv1 rows, BN w+b, conv2 cols
    flops_lost = sum(2 * 9 * c * (c - math.ceil(c / 2)) * h * h * 2 for c, h in blocks)  # conv1 outputs + conv2 inputs
    assert params_lost == 3_134_400
    assert count_params(model) - count_params(pruned.model) == params_lost
    # Dense FLOPs by hand: stem, then per stage (first block: conv1 with stride, conv2, 1x1 shortcut), head.
    dense, cin, h = 2 * 27 * 64 * 32 * 32, 64, 32
    for i, c in enumerate([64, 128, 256, 512]):
        h = h if i == 0 else h // 2
        dense += 2 * 9 * cin * c * h * h + 2 * 9 * c * c * h * h + (2 * cin * c * h * h if cin != c else 0)
        dense += 2 * (2 * 9 * c * c * h * h)                                      # block [1]: two 3x3 convs
        cin = c
    dense += 2 * 512 * 10
    assert flops_per_sample(model) == dense
    assert flops_per_sample(model) - flops_per_sample(pruned.model) == flops_lost


# -------------------------------------------------------------- unstructured
def test_global_magnitude_keeps_round_RN_with_ties_to_the_lower_flat_index():
    w = {"a": torch.tensor([1.0, 2.0, 2.0, 3.0, 0.5, -2.0]), "b": torch.tensor([[2.0, -2.0], [1.0, 3.0]])}
    mask = magnitude_mask(w, 0.5, "global")          # keep 5 of 10: both 3s, then the 2s at flat 1, 2, 5
    assert mask["a"].tolist() == [False, True, True, True, False, True]
    assert mask["b"].tolist() == [[False, False], [False, True]]
    assert int(magnitude_mask({"c": torch.arange(9.0)}, 0.5)["c"].sum()) == 5   # 4.5 rounds half up


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_mask_matches_an_independent_ranking(ratio, scope):
    g = torch.Generator().manual_seed(1)
    shapes = {"c1.weight": (8, 3, 3, 3), "c2.weight": (16, 8, 3, 3), "fc.weight": (10, 16)}
    w = {k: torch.randint(-4, 5, s, generator=g).float() for k, s in shapes.items()}   # many ties
    mask = magnitude_mask(w, ratio, scope)
    groups = [list(w)] if scope == "global" else [[k] for k in w]
    for group in groups:
        scores = np.concatenate([w[k].abs().reshape(-1).numpy() for k in group]).astype(np.float64)
        k_keep = expected_round(len(scores), ratio)
        expect = np.zeros(len(scores), dtype=bool)
        expect[numpy_top(scores, k_keep)] = True
        got = np.concatenate([mask[k].reshape(-1).numpy() for k in group])
        assert got.sum() == k_keep and (got == expect).all()


def test_iterative_mask_is_a_subset_and_ranks_only_the_survivors():
    model = randomised(TINY_ARCH)
    first = prune_magnitude(model, TINY_ARCH, 0.2, "global")
    tuned = first.model.state_dict()
    with torch.no_grad():                             # as after fine-tuning: survivors move, and pruned
        for k, m in first.mask.items():               # weights that were locked (RISE) may be large
            tuned[k] += 0.01 * torch.randn_like(tuned[k])
            tuned[k][~m] = 100.0
    model.load_state_dict(tuned)
    second = prune_magnitude(model, TINY_ARCH, 0.2, "global", first.mask)
    n1 = sum(int(m.sum()) for m in first.mask.values())
    n2 = sum(int(m.sum()) for m in second.mask.values())
    total = sum(m.numel() for m in first.mask.values())
    assert n1 == expected_round(total, 0.2) and n2 == expected_round(n1, 0.2)
    assert abs(n2 / total - 0.64) < 1e-3
    for k in first.mask:
        assert not (second.mask[k] & ~first.mask[k]).any(), k
        assert (second.model.state_dict()[k][~second.mask[k]] == 0).all()
    assert maskable_weights(model)[0] == "conv1.weight" and maskable_weights(model)[-1] == "head.fc.weight"


# ------------------------------------------------------------------- stage 03
def fake_pretrain(run, arch=TINY_ARCH, epochs=(0, 2), train_flops=None):
    """Pretraining checkpoints as 01 writes them (random weights)."""
    model = randomised(arch)
    for e in epochs:
        save(PretrainEpoch(model=model.state_dict(), arch=arch, epoch=e, train_flops=train_flops or 0),
             run / "pretrain" / f"epoch_{e:03d}.pt")
    return model


def load(path):
    return torch.load(path, weights_only=True)


def test_l1_ticket_loads_safely_and_rebuilds_without_its_source(tiny_config, tmp_path, capsys):
    cfg, run = tiny_config(), tmp_path / "run"
    source = fake_pretrain(run, train_flops=123)
    prune.main(["--config", str(cfg), "--run-dir", str(run)])
    out = run / "prune_l1_p50"
    assert "layer4.1" in capsys.readouterr().out and (out / "config.yaml").is_file()
    source_flops = flops_per_sample(source)
    shutil.rmtree(run / "pretrain")                   # the ticket alone rebuilds the model
    t = load(out / "ticket.pt")
    model = build_model(t["arch"])
    model.load_state_dict(t["model"])
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert t["kind"] == "ticket" and t["prune_kind"] == "l1" and t["ratio"] == 0.5
    assert t["epoch"] == t["source_epoch"] == 2
    assert t["source"] == "pretrain/epoch_002.pt" and t["pretrain_dir"] == "pretrain"  # as stored: relative to run/
    assert t["train_flops"] == 123 and t["config"]["prune"]["kind"] == "l1"
    assert t["source_kind"] == "pretrain_epoch"
    assert t["arch"]["mids"] == {"layer1.1": 4, "layer2.1": 8, "layer3.1": 16, "layer4.1": 32}
    assert all(v.dtype == torch.int64 for v in t["kept"].values())
    assert t["params_before"] == count_params(source) > t["params_after"] == count_params(model)
    assert t["flops_before"] == source_flops > t["flops_after"] == flops_per_sample(model)

    with pytest.raises(UserError, match="--force"):
        prune.main(["--config", str(cfg), "--run-dir", str(run)])
    # structured pruning of a pruned ticket narrows it further; kept indices stay in pretrain channels
    prune.main(["--config", str(cfg), "--run-dir", str(run), "--from", str(out / "ticket.pt"), "--tag", "l1_it2"])
    t2 = load(run / "prune_l1_it2/ticket.pt")
    assert t2["arch"]["mids"] == {"layer1.1": 2, "layer2.1": 4, "layer3.1": 8, "layer4.1": 16}
    assert t2["pretrain_dir"] == t["pretrain_dir"] and t2["train_flops"] == 123 and t2["source_kind"] == "ticket"
    for name, idx in t2["kept"].items():
        assert set(idx.tolist()) <= set(t["kept"][name].tolist()) and idx.tolist() == sorted(idx.tolist())
    w1 = t["model"]["layer3.1.conv1.weight"]
    pos = [t["kept"]["layer3.1"].tolist().index(i) for i in t2["kept"]["layer3.1"].tolist()]
    assert torch.equal(t2["model"]["layer3.1.conv1.weight"], w1[pos])


def test_magnitude_ticket_then_an_iterative_round(tiny_config, tmp_path):
    cfg, run = tiny_config(prune={"kind": "magnitude", "ratio": 0.2}), tmp_path / "run"
    fake_pretrain(run, epochs=(0,))
    prune.main(["--config", str(cfg), "--run-dir", str(run)])
    t = load(run / "prune_mag_r80/ticket.pt")
    total = sum(m.numel() for m in t["mask"].values())
    kept = sum(int(m.sum()) for m in t["mask"].values())
    assert kept == expected_round(total, 0.2) and all(m.dtype == torch.bool for m in t["mask"].values())
    assert all((t["model"][k][~m] == 0).all() for k, m in t["mask"].items())
    assert t["params_after"] == t["params_before"] - (total - kept)
    assert t["flops_after"] == t["flops_before"] > t["flops_after_sparse"] and t["train_flops"] == 0
    prune.main(["--config", str(cfg), "--run-dir", str(run), "--from", str(run / "prune_mag_r80/ticket.pt"),
                "--tag", "mag_r64_it2"])
    t2 = load(run / "prune_mag_r64_it2/ticket.pt")
    assert sum(int(m.sum()) for m in t2["mask"].values()) == expected_round(kept, 0.2)
    assert all(not (t2["mask"][k] & ~t["mask"][k]).any() for k in t["mask"])
    assert t2["pretrain_dir"] == t["pretrain_dir"] == "pretrain"
    assert t2["params_before"] == t["params_after"] and t2["flops_after_sparse"] < t["flops_after_sparse"]


def test_missing_source_quotes_the_command_that_makes_it(tiny_config, tmp_path):
    cfg = tiny_config()
    with pytest.raises(UserError, match=r"python 01_pretrain_loft\.py --config .*tiny\.yaml"):
        prune.main(["--config", str(cfg), "--run-dir", str(tmp_path / "empty")])
    fake_pretrain(tmp_path / "other", arch={**TINY_ARCH, "width": 0.25}, epochs=(0,))
    with pytest.raises(UserError, match="model.width=0.125"):
        prune.main(["--config", str(cfg), "--run-dir", str(tmp_path / "other")])
    with pytest.raises(UserError, match="--tag"):
        prune.main(["--config", str(cfg), "--run-dir", str(tmp_path / "other"), "--tag", "../x"])


def test_a_brought_model_made_with_other_kwargs_is_refused(tmp_path):
    """The source must be the config's model: for a brought one its kwargs say which (width 4 is
    not width 8, though name and model.width agree)."""
    sys.path.insert(0, str(REPO / "tests"))   # byom_model: the user's module
    cfg = brought_model_config(tmp_path, "cnn", {"arch": "byom_model:small_cnn", "kwargs": {"width": 8},
                                                 "group_preset": "all"})
    run = tmp_path / "run"
    narrow = {"name": "byom_model:small_cnn", "num_classes": 10, "width": 1.0, "kwargs": {"width": 4},
              "input_shape": [3, 32, 32], "groups": {"preset": "all", "include": [], "exclude": []}}
    model = build_model(narrow, load_config(cfg).importable)   # the config names the model: it may be built
    save(PretrainEpoch(model=model.state_dict(), arch=narrow, epoch=1), run / "pretrain/epoch_001.pt")
    with pytest.raises(UserError, match=r"holds a byom_model:small_cnn \{'width': 4\} of width 1.0, but the config "
                                        r"says .*model.kwargs=\{'width': 8\}"):
        prune.main(["--config", str(cfg), "--run-dir", str(run)])


@pytest.mark.parametrize("ratio, message", [("1.0", "prune.ratio: 1.0 must be < 1.0"),
                                            ("-0.1", "prune.ratio: -0.1 must be >= 0.0")])
def test_ratio_outside_0_1_is_one_line_exit_2(tiny_config, tmp_path, ratio, message):
    r = run_cli(["03_prune.py", "--config", str(tiny_config()), "--run-dir", str(tmp_path / "r"),
                 "--set", f"prune.ratio={ratio}"])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_end_to_end_after_real_pretraining(tiny_config, tmp_path):
    cfg, run = tiny_config(pretrain={"epochs": 1}), tmp_path / "run"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run)])
    prune.main(["--config", str(cfg), "--run-dir", str(run), "--set", "prune.ratio=0.3"])
    t = load(run / "prune_l1_p30/ticket.pt")
    src = load(run / "pretrain/epoch_001.pt")
    assert t["epoch"] == 1 and t["source"].endswith("epoch_001.pt")
    for name, idx in t["kept"].items():
        w = src["model"][f"{name}.conv1.weight"].numpy().astype(np.float64)
        top = np.sort(numpy_top(np.abs(w).sum(axis=(1, 2, 3)), expected_keep(len(w), 0.3)))
        assert idx.tolist() == top.tolist()
    model = build_model(t["arch"])
    model.load_state_dict(t["model"])
    assert t["params_after"] == count_params(model) < t["params_before"]


def test_a_registered_toy_criterion_prunes_end_to_end_and_02_and_the_emergence_stop_rank_by_it(
        tiny_config, tmp_path, monkeypatch):
    """One function + one registration: a criterion keeping the filters of *smallest* L1 norm (so
    that it ranks unlike L1), then 02, 03 and 04 as usual. The ticket keeps exactly those filters
    (numpy), and 02's ranking and the emergence stop's rank by it too: their top-k is 03's kept set."""
    import common.importance as imp
    monkeypatch.setattr(imp, "FILTER_CRITERIA", dict(imp.FILTER_CRITERIA))
    import common.prune as P
    monkeypatch.setattr(P, "FILTER_CRITERIA", imp.FILTER_CRITERIA)

    @imp.filter_criterion("small_l1")
    def small_l1(state, group):
        return -state[f"{group.producers[0][0]}.weight"].double().abs().flatten(1).sum(1)

    cfg = tiny_config(pretrain={"epochs": 1}, finetune={"epochs": 1, "batch_size": 32, "lr": 0.05})
    run, sets = tmp_path / "r", ["--set", "prune.kind=small_l1", "--set", "prune.ratio=0.5"]
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run)])
    stage("02_filter_distance").main(["--config", str(cfg), "--run-dir", str(run), *sets])
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run), *sets])
    ticket = torch.load(run / "prune_small_l1_p50/ticket.pt", weights_only=True)
    state = torch.load(run / "pretrain/epoch_001.pt", weights_only=True)["model"]
    for block, kept in ticket["kept"].items():
        w = state[f"{block}.conv1.weight"].numpy().astype(np.float64).reshape(len(kept) * 2, -1)
        assert sorted(kept.tolist()) == sorted(numpy_top(-np.abs(w).sum(1), len(kept)).tolist()), block
        assert sorted(kept.tolist()) != sorted(numpy_top(np.abs(w).sum(1), len(kept)).tolist()), block

    from common.distance_series import load_series
    from common.emergence import EmergenceWatch
    from common.importance import top_filters
    from common.selection import prunable_blocks
    series = load_series(run / "pretrain", "01", "small_l1")
    watch = EmergenceWatch(prunable_blocks(build_model(ticket["arch"] | {"mids": {}}), ticket["arch"]), 0.5, 0.05, 3,
                           kind="small_l1")
    watch.start(state)
    for block, kept in ticket["kept"].items():
        layer = f"{block}.conv1"
        assert top_filters(series.norms[layer][-1], len(kept)).tolist() == kept.tolist()   # 02: the final epoch
        assert top_filters(watch.prev[layer], len(kept)).tolist() == kept.tolist()         # 01's emergence stop
    stage("04_finetune").main(["--config", str(cfg), "--run-dir", str(run), *sets,
                               "--ticket", str(run / "prune_small_l1_p50/ticket.pt")])
    assert (run / "finetune_small_l1_p50_finetune/result.json").exists()
