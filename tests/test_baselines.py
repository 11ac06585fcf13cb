"""Baselines in 01 (dense, Local SGD, GPipe) and the paper's Table 1 communication figures."""
import csv
import json

import pytest
import torch

from conftest import CPU_RANKS, deepspeed_launcher, run_cli
from common.config import load_config
from common.costs import analytic_bytes, cut_activation_numels
from common.models import build_model
from common.selection import partitioned_blocks


def epoch_weights(run, e=1):
    return torch.load(run / f"pretrain/epoch_{e:03d}.pt", weights_only=True)


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def one_and_two_ranks(tiny_config, tmp_path, **pretrain):
    cfg = tiny_config(pretrain={"epochs": 1, **pretrain}, dist=CPU_RANKS)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(two)], deepspeed_launcher(2))
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    return one, two


def test_dense_data_parallel_equals_one_process_with_the_same_micro_batches(tiny_config, tmp_path):
    # Two DeepSpeed ranks each take half of every global batch (BN sees the half): one process
    # accumulating over the same two halves is the same computation.
    one, two = one_and_two_ranks(tiny_config, tmp_path, method="dense", micro_batches=2)
    assert max_diff(epoch_weights(one)["model"], epoch_weights(two)["model"]) <= 1e-5
    comm = json.loads((two / "pretrain/comm.json").read_text())
    params = sum(p.numel() for p in build_model(epoch_weights(two)["arch"]).parameters())
    assert comm["measured_payload_bytes"] == 2 * (640 // 32) * params * 4  # a gradient all-reduce per step per rank


def test_localsgd_one_process_equals_two_ranks(tiny_config, tmp_path):
    one, two = one_and_two_ranks(tiny_config, tmp_path, method="localsgd")
    assert max_diff(epoch_weights(one)["model"], epoch_weights(two)["model"]) <= 1e-5
    c1, c2 = (json.loads((d / "pretrain/comm.json").read_text()) for d in (one, two))
    state = build_model(epoch_weights(one)["arch"]).state_dict()
    full = sum(v.numel() * v.element_size() for v in state.values())
    assert c1["measured_payload_bytes"] == c2["measured_payload_bytes"] == (640 // 32 // 5) * 2 * full


def test_gpipe_pipeline_engine_trains_and_counts_the_cut_traffic(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"method": "gpipe", "epochs": 2, "lr": 0.05}, dist=CPU_RANKS)
    run = tmp_path / "pipe"
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(run)], deepspeed_launcher(2))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = list(csv.DictReader(open(run / "pretrain/metrics.csv")))
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"]) < 2.4  # learns on real CIFAR-10
    ck = epoch_weights(run, 2)
    model = build_model(ck["arch"])
    model.load_state_dict(ck["model"])  # both stages' layers are in the plain model's checkpoint
    assert max_diff(ck["model"], epoch_weights(run, 0)["model"]) > 0
    cut = cut_activation_numels(model, 2)  # one cut: activations forward, gradients back, fp32
    steps = 2 * (640 // 32)
    comm = json.loads((run / "pretrain/comm.json").read_text())
    assert comm["measured_payload_bytes"] == steps * 32 * sum(cut) * 4 * 2


def test_gpipe_in_one_process_counts_the_same_traffic_as_the_pipeline_would(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"method": "gpipe", "epochs": 1})
    run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "g")]).check_returncode()
    comm = json.loads((tmp_path / "g/pretrain/comm.json").read_text())
    model = build_model({"name": "preresnet18", "num_classes": 10, "width": 0.125})
    assert comm["measured_payload_bytes"] == (640 // 32) * 32 * sum(cut_activation_numels(model, 2)) * 4 * 2


PAPER_TABLE1 = {  # LoFT Table 1, CIFAR-10, 20 epochs, G = 1e9 bytes
    "preresnet18": {("gpipe_fwd", 2): 131.88, ("gpipe_fwd", 4): 659.42, ("localsgd", 2): 55.40,
                    ("localsgd", 4): 110.80, ("loft", 2): 40.02, ("loft", 4): 64.57},
    "preresnet34": {("gpipe_fwd", 2): 131.88, ("gpipe_fwd", 4): 461.60, ("localsgd", 2): 105.93,
                    ("loft", 2): 65.36, ("loft", 4): 90.17},
}


@pytest.mark.parametrize("arch", sorted(PAPER_TABLE1))
def test_analytic_bytes_reproduce_the_papers_table1(arch):
    cfg = load_config(f"yaml/{arch}_c10.yaml")
    model = build_model({"name": arch, "num_classes": 10, "width": 1.0})
    blocks = partitioned_blocks(model)
    for (method, S), paper in PAPER_TABLE1[arch].items():
        got = analytic_bytes(model, blocks, S, cfg.pretrain.epochs, 50_000, cfg.pretrain.batch_size,
                             cfg.pretrain.local_iters)[method] / 1e9
        assert abs(got - paper) / paper < 0.015, (method, S, got, paper)


def test_dry_run_table_prints_every_method():
    r = run_cli(["01_pretrain_loft.py", "--config", "yaml/preresnet18_c10.yaml", "--dry-run", "--table"])
    assert r.returncode == 0, r.stderr
    for row in ("| GPipe-2 | 131.07G", "| LoFT-4 | 65.16G | 1.00x |", "| Local SGD-4 | 111.54G | 1.71x |"):
        assert row in r.stdout


def test_bf16_wire_halves_loft_traffic_and_still_trains(tiny_config, tmp_path):
    import importlib
    pretrain = importlib.import_module("01_pretrain_loft")
    for wire in ("fp32", "bf16"):
        cfg = tiny_config(name=wire, pretrain={"epochs": 1}, comm={"wire_dtype": wire})
        pretrain.main(["--config", str(cfg), "--run-dir", str(tmp_path / wire)])
    b32, b16 = (json.loads((tmp_path / w / "pretrain/comm.json").read_text())["measured_payload_bytes"]
                for w in ("fp32", "bf16"))
    n_int = sum(1 for k in build_model({"name": "preresnet18", "num_classes": 10, "width": 0.125}).state_dict()
                if k.endswith("num_batches_tracked"))
    rounds, S = 640 // 32 // 5, 2
    assert b16 == (b32 - rounds * S * n_int * 8) / 2 + rounds * S * n_int * 8  # floats halve, int64 counters stay
    a, b = epoch_weights(tmp_path / "fp32")["model"], epoch_weights(tmp_path / "bf16")["model"]
    assert 0 < max_diff(a, b) < 0.5
