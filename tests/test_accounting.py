"""Fair accounting on real CIFAR-10: training complexity (RISE Fig. 4's x-axis) against hand counts,
the rewound ticket's learning rate, lossless test accuracy, comm.json after an early stop."""
import json
import math

import pytest
import torch
import torch.nn as nn

from common.costs import epoch_end_round, train_flops_per_sample
from common.data import load_cifar
from common.models import build_model
from common.prune import maskable_weights
from common.config import load_config
from common.evaluation import lossless_positions
from common.train import correct_per_sample
from conftest import DATA, pruned_lineage, run_finetune, stage

FT = {"finetune": {"epochs": 1, "batch_size": 32, "lr": 0.05, "schedule": "cosine"},
      "data": {"lossless_test": 180}}


def test_masked_training_flops_of_a_tiny_network_match_a_hand_count():
    # conv 3->4, 3x3, pad 1 on 8x8 (no bias), then a linear 256->10. Per sample, FLOPs = 2 x MACs:
    #   forward:  conv 4*8*8 outputs x 27 MACs = 6,912 MACs; linear 2,560 MACs   -> 18,944 FLOPs
    #   backward: conv weight grad 2 x 64 positions per weight (no input grad: the image needs none);
    #             linear input grad 5,120; linear weight grad 2 per weight
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    mask = {"0.weight": torch.rand(4, 3, 3, 3) < 0.3, "3.weight": torch.rand(10, 256) < 0.1}
    kept_conv, kept_fc = int(mask["0.weight"].sum()), int(mask["3.weight"].sum())
    assert 0 < kept_conv < 108 and 0 < kept_fc < 2560
    assert train_flops_per_sample(net, (3, 8, 8)) == 18_944 + 108 * 128 + 5_120 + 2 * 2_560
    assert train_flops_per_sample(net, (3, 8, 8), mask) == 18_944 + kept_conv * 128 + 5_120 + 2 * kept_fc


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """01 (LoFT, 2 epochs, lossless_test 180) → 03 magnitude keep-20 % and L1 50 % tickets."""
    return pruned_lineage(tmp_path_factory.mktemp("acct"), FT)


def finetune(cfg, run, ticket, *sets):
    run_finetune(cfg, run, ticket, *sets)


def read(path):
    return json.loads(path.read_text())


def pretrain_flops(run, epoch):
    return torch.load(run / f"pretrain/epoch_{epoch:03d}.pt", weights_only=True)["train_flops"]


def test_rise_complexity_is_pretraining_to_k_plus_a_backward_over_the_winners_only(lineage):
    cfg, run = lineage
    finetune(cfg, run, "prune_mag_r20", "finetune.mode=rise", "finetune.rewind_epoch=1")
    result = read(run / "finetune_mag_r20_rise_k1/result.json")
    ticket = torch.load(run / "prune_mag_r20/ticket.pt", weights_only=True)
    model = build_model(ticket["arch"])
    # hand count of what the non-winners save per sample: 2 FLOPs per output position per pruned
    # weight; output side of a weight: the stem at 32x32, stage s at 32 / 2^(s-1), the classifier 1
    def side(name):
        if name.startswith("layer"):
            return 32 // 2 ** (int(name[5]) - 1)
        return 1 if name.startswith("head") else 32
    saved = sum(2 * side(k) ** 2 * int((~m).sum()) for k, m in ticket["mask"].items())
    assert set(ticket["mask"]) == set(maskable_weights(model)) and saved > 0
    dense = train_flops_per_sample(model)                       # FlopCounterMode forward + backward
    steps = 640 // 32
    assert result["train_flops_parts"]["finetune"] == steps * 32 * (dense - saved)
    assert result["train_flops_parts"]["before_this_stage"] == pretrain_flops(run, 1)       # P(k), k = 1
    assert result["train_flops"] == pretrain_flops(run, 1) + steps * 32 * (dense - saved)
    assert result["mask_search_flops"] == pretrain_flops(run, 2) - pretrain_flops(run, 1)   # hindsight, beside


def test_a_later_rewind_epoch_costs_more_and_the_loft_lineage_counts_the_same_way(lineage):
    cfg, run = lineage
    finetune(cfg, run, "prune_l1_p50", "finetune.mode=rewind", "finetune.rewind_epoch=0",
             "finetune.schedule_from=fresh")
    early = read(run / "finetune_l1_p50_rewind_k0/result.json")
    finetune(cfg, run, "prune_l1_p50", "finetune.mode=rewind", "finetune.rewind_epoch=1")
    late = read(run / "finetune_l1_p50_rewind_k1/result.json")
    assert early["train_flops_parts"]["finetune"] == late["train_flops_parts"]["finetune"]  # same ticket, 1 epoch
    assert early["train_flops"] == early["train_flops_parts"]["finetune"]                   # P(0) = 0
    assert late["train_flops"] == pretrain_flops(run, 1) + late["train_flops_parts"]["finetune"]
    assert late["train_flops"] > early["train_flops"]
    assert early["mask_search_flops"] == pretrain_flops(run, 2)


def test_a_rewound_ticket_continues_the_pretraining_schedule_from_epoch_k(lineage, monkeypatch):
    from common.train import SGDStep
    cfg, run = lineage
    seen = []
    real = SGDStep.lr
    monkeypatch.setattr(SGDStep, "lr", lambda self, t: seen.append((t, real(self, t))) or real(self, t))
    finetune(cfg, run, "prune_mag_r20", "finetune.mode=rise", "finetune.rewind_epoch=1", "finetune.epochs=0")
    # pretraining: lr 0.05, cosine over 2 epochs x 20 steps; the ticket (batch 32 too) runs its
    # remaining epoch: its step t is pretraining step 20 + t; finetune.lr/schedule are not used
    assert [t for t, _ in seen] == list(range(20))
    for t, lr in seen:
        assert lr == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (20 + t) / 40)), rel=1e-12)
    rows = (run / "finetune_mag_r20_rise_k1/metrics.csv").read_text().splitlines()
    assert len(rows) == 2                                       # E - k = 1 epoch


def test_lossless_accuracy_is_the_part_of_the_subset_with_original_index_below_n(lineage):
    """Which images count, by hand; then both accuracies as counts over the run's own per-image
    decisions (re-evaluated where the run evaluated, in the same batch), so a CUDA run is checked
    by the same equalities as a CPU one, never by float logits across devices."""
    cfg, run = lineage
    full = load_cifar(DATA, "cifar10", train=False)
    # the class-balanced test subset of 200 takes the first 20 images of each class; count by hand
    # which of them have an original index < 180 (some classes fill their 20 before index 180)
    seen, picked = [0] * 10, []
    for i, y in enumerate(full.labels.tolist()):
        if seen[y] < 20:
            seen[y] += 1
            picked.append(i)
    positions = [n for n, i in enumerate(picked) if i < 180]
    assert 0 < len(positions) < 180 and len(picked) == 200
    test_set = full.subset(torch.tensor(picked))
    assert lossless_positions(load_config(cfg).data, test_set).tolist() == positions
    model = build_model({"name": "preresnet18", "num_classes": 10, "width": 0.125})
    ck = torch.load(run / "pretrain/epoch_002.pt", weights_only=True)
    model.load_state_dict(ck["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"   # where the tiny config's run evaluated
    correct, _ = correct_per_sample(model, test_set, 200, device)
    right_all, right_lossless = int(correct.sum()), int(correct[positions].sum())
    assert ck["test_acc"] == 100.0 * right_all / 200
    assert ck["test_acc_lossless"] == 100.0 * right_lossless / len(positions)
    header, *rows = (run / "pretrain/metrics.csv").read_text().splitlines()
    cols = header.split(",")
    assert float(rows[-1].split(",")[cols.index("test_acc_lossless")]) == round(100.0 * right_lossless / len(positions), 3)
    finetune(cfg, run, "prune_l1_p50")
    result = read(run / "finetune_l1_p50_finetune/result.json")
    assert 0 <= result["final_test_acc_lossless"] <= 100 and "best_test_acc_lossless" in result


def test_comm_json_counts_the_epochs_that_ran_after_an_early_stop(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"epochs": 3, "stop_on_emergence": True},
                      distance={"emergence_eps": 5.0, "emergence_window": 1})
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    comm = read(tmp_path / "r/pretrain/comm.json")
    assert comm["epochs_run"] == 1 and comm["epochs_configured"] == 3
    rounds = epoch_end_round(1, 640 // 32, 5)                    # 4 rounds in the one epoch that ran
    assert comm["analytic_ps_bytes"]["rounds"] == rounds
    model = build_model({"name": "preresnet18", "num_classes": 10, "width": 0.125})
    from common.costs import split_params
    from common.selection import partitioned_blocks
    shared, part = split_params(model, partitioned_blocks(model))
    assert comm["analytic_ps_bytes"]["loft"] == rounds * 2 * (2 * shared + part) * 4


@pytest.mark.parametrize("workers, expected", [(2, 0.796), (4, 0.690)])
def test_sharded_loft_spends_a_fraction_of_dense_training_flops_not_the_same(workers, expected):
    # PreResNet-18, CIFAR-10, batch 128, one epoch, K = 1 (whole rounds): with pretrain.data=shard
    # each sample goes through one subnetwork, not the full model. The audit's figures: 0.796 / 0.690
    # (S = 4 also drops the last 2 of 390 steps: 12,500 // 128 = 97 steps per worker).
    from common.costs import train_flops_ratio_to_dense
    from common.selection import partitioned_blocks
    arch = {"name": "preresnet18", "num_classes": 10, "width": 1.0}
    blocks = partitioned_blocks(build_model(arch))
    shard = train_flops_ratio_to_dense(arch, blocks, "loft", workers, 1, 50_000, 128, 1, shard=True)
    assert shard == pytest.approx(expected, abs=5e-4)
    full = train_flops_ratio_to_dense(arch, blocks, "loft", workers, 1, 50_000, 128, 1)
    shard_steps = 50_000 // workers // 128                       # a worker's steps per epoch with shard
    assert full == pytest.approx(shard * workers * 390 / (workers * shard_steps))  # full: S x the samples, all 390 steps


def test_comm_json_ratio_to_dense_is_the_runs_counted_training_flops_over_dense(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"epochs": 1, "data": "shard"})
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    comm = read(tmp_path / "r/pretrain/comm.json")
    assert comm["pretrain_data"].startswith("shard: equal samples")
    counted = pretrain_flops(tmp_path / "r", 1)                   # what the LoFT trainer counted
    dense = (640 // 32) * 32 * train_flops_per_sample(build_model({"name": "preresnet18", "num_classes": 10,
                                                                    "width": 0.125}))
    assert comm["train_flops_ratio_to_dense"] == round(counted / dense, 4) and 0.5 < counted / dense < 1
