"""Stage 02: the filter distance against hand-computed values and a naive loop, then 01 → 02 on real CIFAR-10."""
import csv
import json
import math
import shutil

import pytest
import torch
import yaml

from common.distance import (channel_masks, filter_distance, kept_count, mask_distances, network_distance,
                             pairwise_distances, rankings, reversed_value)
from common.emergence import early_bird_epoch, emergence_epoch
from common.errors import UserError
from conftest import TINY, _merge, run_cli, stage

LN2 = math.log(2)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------ the metric
def naive_F(a, b, k=None):
    """SPEC 4 written as plainly as possible: Python lists and loops."""
    n = len(a)
    rank_a = sorted(range(n), key=lambda f: (-a[f], f))
    rank_b = sorted(range(n), key=lambda f: (-b[f], f))
    pos_b = {f: p + 1 for p, f in enumerate(rank_b)}
    total = 0.0
    for i in range(1, (k or n) + 1):
        sigma = pos_b[rank_a[i - 1]]
        if k is not None and sigma > k:
            sigma = k + 1
        total += abs(math.log(i) - math.log(sigma)) / i
    return total


def test_identical_rankings_are_at_distance_zero():
    a = t([3.0, 1.0, 2.0, 5.0])
    b = a * 7 + 1  # other norms, same ranking
    assert filter_distance(a, b) == 0.0
    assert filter_distance(a, b, normalise=True) == 0.0
    assert filter_distance(a, b, k=2, normalise=True) == 0.0


def test_swapping_the_top_two_costs_one_and_a_half_ln2():
    a = t([5, 4, 3, 2, 1])
    b = t([4, 5, 3, 2, 1])  # filters 0 and 1 change places
    # i=1: sigma=2 → |ln1-ln2| = ln2; i=2: sigma=1 → (1/2)|ln2-ln1|; the rest sit still
    assert filter_distance(a, b) == pytest.approx(1.5 * LN2, abs=1e-12)
    assert filter_distance(a, b, k=2) == pytest.approx(1.5 * LN2, abs=1e-12)  # both stay in the top 2


@pytest.mark.parametrize("n", [2, 5, 64])
def test_reversed_ranking_is_the_normaliser(n):
    a = torch.arange(n, 0, -1, dtype=torch.float64)
    b = a.flip(0)
    expected = sum(abs(math.log(i) - math.log(n + 1 - i)) / i for i in range(1, n + 1))
    assert filter_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert reversed_value(n) == pytest.approx(expected, rel=1e-12)
    assert filter_distance(a, b, normalise=True) == pytest.approx(1.0, rel=1e-12)
    k = kept_count(n, 0.5)
    assert filter_distance(a, b, k=k, normalise=True) == pytest.approx(1.0, rel=1e-12)


def test_top_k_counts_a_filter_that_left_the_top_k_at_k_plus_one():
    a = t([4, 3, 2, 1])  # ranking f0 f1 f2 f3
    b = t([4, 1, 3, 2])  # ranking f0 f2 f3 f1: f1 left the top 2
    k = kept_count(4, 0.5)
    assert k == 2
    # top-2: i=1 f0 sigma=1 → 0; i=2 f1 is 4th in b > k → sigma = k+1 = 3 → (1/2)|ln2 - ln3|
    topk = 0.5 * math.log(3 / 2)
    assert filter_distance(a, b, k=2) == pytest.approx(topk, abs=1e-12)
    # the reversed ranking under top-2: sigma(1) = 4 → 3 (missing), sigma(2) = 3 → 3 (missing)
    ref = math.log(3) + 0.5 * math.log(3 / 2)
    assert reversed_value(4, 2) == pytest.approx(ref, abs=1e-12)
    assert filter_distance(a, b, k=2, normalise=True) == pytest.approx(topk / ref, abs=1e-12)
    # the full metric sees f1 at 4, f2 at 2, f3 at 3
    full = 0.5 * abs(math.log(2) - math.log(4)) + abs(math.log(3) - math.log(2)) / 3 + abs(math.log(4) - math.log(3)) / 4
    assert filter_distance(a, b) == pytest.approx(full, abs=1e-12)


def test_ties_are_broken_by_filter_index():
    order, pos = rankings(t([1, 1, 2, 1]))
    assert order.tolist() == [2, 0, 1, 3] and pos.tolist() == [2, 3, 1, 4]
    a, b = t([1, 1, 1, 1]), t([1, 1, 2, 1])  # a: f0 f1 f2 f3; b: f2 f0 f1 f3
    expected = LN2 + 0.5 * math.log(3 / 2) + math.log(3) / 3
    assert filter_distance(a, b) == pytest.approx(expected, abs=1e-12)


def test_a_common_relabelling_of_the_filters_changes_nothing():
    g = torch.Generator().manual_seed(0)
    for n in (7, 33, 128):
        a, b = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        perm = torch.randperm(n, generator=g)
        for k in (None, kept_count(n, 0.3), kept_count(n, 0.8)):
            assert filter_distance(a[perm], b[perm], k=k) == pytest.approx(filter_distance(a, b, k=k), abs=1e-12)


def test_vectorised_matrix_equals_the_naive_loop():
    g = torch.Generator().manual_seed(1)
    for n, ratio in ((1, 0.5), (6, 0.5), (17, 0.3), (40, 0.8)):
        norms = torch.randint(0, 5, (4, n), generator=g).double()  # small integers: many ties
        k = kept_count(n, ratio)
        d = pairwise_distances(norms, k, chunk=3)
        for i in range(4):
            for j in range(4):
                a, b = norms[i].tolist(), norms[j].tolist()
                assert d["distance"][i, j] == pytest.approx(naive_F(a, b), abs=1e-12)
                assert d["distance_topk_raw"][i, j] == pytest.approx(naive_F(a, b, k), abs=1e-12)
                ref_k = naive_F(list(range(n, 0, -1)), list(range(1, n + 1)), k)
                expected = naive_F(a, b, k) / ref_k if ref_k > 0 else 0.0
                assert d["distance_topk"][i, j] == pytest.approx(expected, abs=1e-12)


def test_kept_count_matches_a_structured_prune():
    assert kept_count(10, 0.7) == 3 and kept_count(10, 0.5) == 5 and kept_count(33, 0.5) == 17
    assert kept_count(4, 0.8) == 1 and kept_count(1, 0.99) == 1


def test_network_distance_is_the_layer_mean_of_normalised_top_k():
    g = torch.Generator().manual_seed(2)
    a = {"x": torch.rand(8, generator=g), "y": torch.rand(20, generator=g)}
    b = {"x": torch.rand(8, generator=g), "y": torch.rand(20, generator=g)}
    expected = (filter_distance(a["x"], b["x"], k=4, normalise=True) + filter_distance(a["y"], b["y"], k=10, normalise=True)) / 2
    assert network_distance(a, b, 0.5) == pytest.approx(expected, abs=1e-12)
    assert network_distance(a, a, 0.5) == 0.0


# ------------------------------------------------------------------ emergence
def test_emergence_epoch_needs_window_consecutive_small_steps():
    d = [0.5, 0.04, 0.03, 0.2, 0.01, 0.02, 0.03, 0.3]
    assert emergence_epoch(d, eps=0.05, window=3) == 4  # d(4,5), d(5,6), d(6,7) < eps
    assert emergence_epoch(d, eps=0.05, window=2) == 1
    assert emergence_epoch(d, eps=0.05, window=4) is None
    assert emergence_epoch(d, eps=0.6, window=8) == 0
    assert emergence_epoch([], eps=0.1, window=1) is None
    assert emergence_epoch([0.05], eps=0.05, window=1) is None  # strictly below eps


def test_early_bird_global_mask_hamming_distance_and_rule():
    gammas = t([[3, -4, 1, 1, 0.5, 2],    # |gamma| top 3 (ratio 0.5): ch1, ch0, ch5
                [3, -4, 1, 1, 0.5, 2],
                [1, 1, 1, 1, 1, 1]])      # all tied → the first three channels
    masks = channel_masks(gammas, 0.5)
    assert masks[0].tolist() == [True, True, False, False, False, True]
    assert masks[2].tolist() == [True, True, True, False, False, False]
    md = mask_distances(masks)
    assert md[0, 1] == 0 and md[0, 2] == pytest.approx(2 / 6) and torch.equal(md, md.T)
    # epochs 0..6: the first with 4 trained predecessors is 5; its distance 0.1 to epoch 1 is <= eps
    dist = torch.zeros(7, 7, dtype=torch.float64)
    dist[5, 1] = dist[1, 5] = 0.1
    assert early_bird_epoch(dist, list(range(7))) == 5
    dist[5, 2] = dist[2, 5] = 0.11
    assert early_bird_epoch(dist, list(range(7))) == 6        # 5 sees 0.11 to epoch 2; 6 sees 0 to 2..5
    assert early_bird_epoch(dist[:6, :6], list(range(6))) is None


def test_early_bird_queue_starts_at_epoch_1_not_at_the_init():
    # identical masks at every checkpoint: You et al. fill their 5-mask queue with the masks after
    # epochs 1..5, so the earliest early bird is epoch 5; the init (epoch 0) is no queue entry
    same = torch.zeros(8, 8, dtype=torch.float64)
    assert early_bird_epoch(same, list(range(8))) == 5
    assert early_bird_epoch(same[:5, :5], list(range(5))) is None      # epochs 1..4: the queue is not full
    assert early_bird_epoch(same[1:, 1:], list(range(1, 8))) == 4      # no epoch_000 file: index 4 is epoch 5


# --------------------------------------------------------- 01 → 02, real data
distance = stage("02_filter_distance")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A tiny LoFT run (3 epochs, the conftest TINY model on real CIFAR-10), shared by the tests below."""
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(_merge(TINY, {"pretrain": {"epochs": 3}})))
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(root / "loft")])
    return cfg, root


def test_01_then_02_writes_every_pair_and_readable_figures(quick_run, capsys):
    import matplotlib.image as mpimg
    cfg, root = quick_run
    distance.main(["--config", str(cfg), "--run-dir", str(root / "loft")])
    out = root / "loft/distance"
    rows = list(csv.DictReader(open(out / "filter_distance.csv", newline="")))
    assert list(rows[0]) == ["layer", "epoch_a", "epoch_b", "distance", "distance_norm", "distance_topk"]
    layers = ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1", "network_mean", "network_weighted"]
    pairs = {(r["layer"], int(r["epoch_a"]), int(r["epoch_b"])) for r in rows}
    assert pairs == {(l, a, b) for l in layers for a in range(4) for b in range(4)} and len(rows) == len(pairs)
    for r in rows:
        if r["epoch_a"] == r["epoch_b"]:
            assert float(r["distance"]) == 0.0
    to_final = {int(r["epoch_b"]): float(r["distance_topk"]) for r in rows
                if r["layer"] == "network_mean" and r["epoch_a"] == "3"}
    assert to_final[3] == 0.0 and to_final[0] > 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distance_to_final"]["3"] == 0.0 and summary["epochs"] == [0, 1, 2, 3]
    assert summary["layers"]["layer2.1.conv1"]["k"] == kept_count(summary["layers"]["layer2.1.conv1"]["filters"], 0.5)
    eb = list(csv.DictReader(open(out / "early_bird.csv", newline="")))
    assert len(eb) == 16 and all(0 <= float(r["mask_distance"]) <= 1 for r in eb)
    for name in ("distance_to_final.png", "early_bird.png", "heatmap_layer2.1.conv1.png", "heatmap_network_mean.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
    assert (out / "config.yaml").is_file()
    printed = capsys.readouterr().out
    assert "filter emergence epoch" in printed and "early bird epoch" in printed


def test_compare_draws_several_runs_on_one_axis(quick_run):
    cfg, root = quick_run
    other = root / "copy"
    shutil.copytree(root / "loft/pretrain", other / "pretrain")
    (other / "pretrain/epoch_003.pt").unlink()  # a shorter run: curves of different lengths
    distance.main(["--config", str(cfg), "--run-dir", str(root / "loft"), "--compare", str(other)])
    import matplotlib.image as mpimg
    assert mpimg.imread(root / "loft/distance/compare.png").ndim == 3


def test_missing_pretraining_is_one_line_quoting_the_command(tiny_config, tmp_path):
    cfg = tiny_config()
    with pytest.raises(UserError, match=r"run: \S*python 01_pretrain_loft\.py --config "):
        distance.main(["--config", str(cfg), "--run-dir", str(tmp_path / "none")])
    r = run_cli(["02_filter_distance.py", "--config", str(cfg), "--run-dir", str(tmp_path / "none")])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "python 01_pretrain_loft.py --config" in lines[0], r.stderr


def test_a_single_checkpoint_is_refused(quick_run, tiny_config, tmp_path):
    _, root = quick_run
    (tmp_path / "one/pretrain").mkdir(parents=True)
    shutil.copy(root / "loft/pretrain/epoch_000.pt", tmp_path / "one/pretrain")
    with pytest.raises(UserError, match="at least 2 epoch checkpoints"):
        distance.main(["--config", str(tiny_config()), "--run-dir", str(tmp_path / "one")])
