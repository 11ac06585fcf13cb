"""LoFT beyond CNNs (issue 21): a torchvision VisionTransformer whose MLP hidden neurons
(fc1 → GELU → fc2) are the channel groups, partitioned by LoFT and pruned by fc1's row L1 norms;
attention, LayerNorms, embeddings and the head shared. The same stages, unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import brought_model_config, deepspeed_launcher, run_cli, stage
from common.dist import Comm, DistEnv
from common.groups import discovered
from common.narrowing import SlicePlan, masked, select_channels
from common.loft import draw_partition, worker_arch
from reference_round import aggregate, extract
from common.models import build_model, narrowed_arch
from common.selection import block_refs, partitioned_blocks, prunable_blocks

KW = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
VIT = {"name": "torchvision.VisionTransformer", "num_classes": 10, "width": 1.0, "kwargs": KW,
       "input_shape": [3, 32, 32], "groups": {"preset": "all", "include": [], "exclude": []}}
MLP = [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = build_model(VIT).eval()
    with torch.no_grad():   # torchvision zero-initialises the MLP biases and the head: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.startswith("heads"):
                p.normal_(0, 0.1)
    return model


def test_the_groups_are_exactly_the_mlp_hidden_layers(vit):
    found = discovered(vit)
    assert [(g.name, g.width, g.producers, g.consumers, g.members) for g in found.groups] == [
        (fc1, 64, ((fc1, 0),), ((fc1[:-1] + "3", 1, 1),), ()) for fc1 in MLP]
    assert not any("attention" in g.name or "ln" in g.name for g in found.groups)
    reasons = dict(found.rejected)
    assert set(reasons) == {"conv_proj", "heads.head"}
    assert "attention" in reasons["conv_proj"] and "norm over channels" in reasons["conv_proj"]
    assert [b.name for b in partitioned_blocks(vit, arch=VIT)] == MLP == [b.name for b in prunable_blocks(vit, VIT)]


def test_a_narrowed_vit_equals_the_masked_one(vit):
    gen = torch.Generator().manual_seed(3)
    refs = block_refs(vit)
    keep = {b.name: torch.randperm(b.mid, generator=gen)[: b.mid // 2].sort().values for b in refs}
    small = build_model(narrowed_arch(VIT, {k: len(v) for k, v in keep.items()}))
    state = vit.state_dict()
    small.load_state_dict(select_channels(state, SlicePlan.of(refs, state), keep))
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), masked(vit, [b.group for b in refs], keep).eval()(x),
                                   rtol=1e-5, atol=1e-5)
    assert small.encoder.layers.encoder_layer_0.mlp[0].out_features == 32


def test_a_loft_round_places_the_neurons_and_averages_attention(vit):
    S, state = 2, vit.state_dict()
    blocks = partitioned_blocks(vit, arch=VIT)
    plan = SlicePlan.of(blocks, state)
    assert set(plan.entries) == {f"{fc1}.{leaf}" for fc1 in MLP for leaf in ("weight", "bias")} | {
        f"{fc1[:-1]}3.weight" for fc1 in MLP}
    part = draw_partition(blocks, S, 0, 1)
    gen = torch.Generator().manual_seed(2)
    results = {w: {k: v + torch.randn(v.shape, generator=gen) for k, v in extract(state, plan, part, w).items()}
               for w in range(S)}
    comm = Comm(DistEnv())
    new = aggregate(state, plan, part, results, comm, S)
    for w in range(S):
        for fc1 in MLP:
            idx = part[fc1][w]
            assert torch.equal(new[f"{fc1}.weight"][idx], results[w][f"{fc1}.weight"])
            assert torch.equal(new[f"{fc1[:-1]}3.weight"][:, idx], results[w][f"{fc1[:-1]}3.weight"])
    qkv = "encoder.layers.encoder_layer_1.self_attention.in_proj_weight"
    assert torch.equal(new[qkv], (results[0][qkv] + results[1][qkv]) / 2)
    sent = sum(v.numel() * v.element_size() for w in range(S)
               for v in build_model(worker_arch(VIT, part, w)).state_dict().values())
    assert comm.bytes_sent == sent


def vit_config(tmp_path, **pretrain):
    return brought_model_config(tmp_path, "vit", {"arch": "torchvision.VisionTransformer", "kwargs": KW,
                                                  "group_preset": "all"},
                                **{"epochs": 2, "lr": 0.05, "bn_recal_batches": 0, **pretrain})


def test_vit_loft_one_process_equals_two_gloo_ranks_and_bytes_are_the_analytic_count(tmp_path):
    cfg = vit_config(tmp_path, epochs=1)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(two)], deepspeed_launcher(2))
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    a, b = (torch.load(d / "pretrain/epoch_001.pt", weights_only=True)["model"] for d in (one, two))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c1, c2 = (json.loads((d / "pretrain/comm.json").read_text()) for d in (one, two))
    rounds = 256 // 32 // 4
    arch = {**VIT, "groups": {"preset": "all", "include": [], "exclude": []}}
    blocks = partitioned_blocks(build_model(arch), arch=arch)
    part = draw_partition(blocks, 2, 0, 0)
    subs = [build_model(worker_arch(arch, part, w)) for w in range(2)]
    payload = sum(v.numel() * v.element_size() for s in subs for v in s.state_dict().values())
    assert c1["measured_payload_bytes"] == c2["measured_payload_bytes"] == rounds * payload
    assert c1["analytic_ps_bytes"]["loft"] == rounds * 2 * sum(p.numel() for s in subs for p in s.parameters()) * 4


def test_vit_01_to_04_end_to_end_with_rise(tmp_path):
    cfg, run = vit_config(tmp_path), tmp_path / "run"
    base = ["--config", str(cfg), "--run-dir", str(run)]
    for name in ("01_pretrain_loft", "02_filter_distance", "03_prune"):
        stage(name).main(base)
    summary = json.loads((run / "distance/summary.json").read_text())
    assert list(summary["layers"]) == MLP and summary["early_bird_epoch"] is None
    src = torch.load(run / "pretrain/epoch_002.pt", weights_only=True)
    ticket = torch.load(run / "prune_l1_p50/ticket.pt", weights_only=True)
    for fc1 in MLP:   # the kept neurons: fc1's rows of largest L1 norm
        norms = src["model"][f"{fc1}.weight"].double().abs().sum(1).numpy()
        assert ticket["kept"][fc1].tolist() == np.sort(np.argsort(-norms, kind="stable")[:32]).tolist()
    small = build_model(ticket["arch"])
    small.load_state_dict(ticket["model"])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in build_model(src["arch"]).parameters())
    stage("04_finetune").main([*base, "--ticket", str(run / "prune_l1_p50/ticket.pt")])
    stage("03_prune").main([*base, "--set", "prune.kind=magnitude", "--set", "prune.ratio=0.8"])
    stage("04_finetune").main([*base, "--ticket", str(run / "prune_mag_r20/ticket.pt"), "--set", "finetune.mode=rise",
                               "--set", "finetune.rewind_epoch=1", "--set", "finetune.schedule_from=fresh"])
    for out in ("finetune_l1_p50_finetune", "finetune_mag_r20_rise_k1"):
        assert 0 <= json.loads((run / out / "result.json").read_text())["final_test_acc"] <= 100


def test_training_complexity_counts_token_positions_for_linear_layers(vit):
    """A masked weight's saved gradient is 2 FLOPs per output position: 17 tokens (16 patches of
    8x8 and the class token) for the MLPs and attention's out_proj, 1 for the head."""
    from common.costs import output_positions
    pos = output_positions(vit)
    assert pos[f"{MLP[0]}.weight"] == pos["encoder.layers.encoder_layer_1.self_attention.out_proj.weight"] == 17
    assert pos["heads.head.weight"] == 1 and pos["conv_proj.weight"] == 16


def test_fused_workers_on_a_vit_are_refused_in_one_line(tmp_path):
    cfg = vit_config(tmp_path, fused_workers=True)
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: pretrain.fused_workers: no fused form of VisionTransformer (it holds parameters of its own: "
        "class_token); set pretrain.fused_workers=false")


@pytest.mark.parametrize("method", ["dense", "localsgd"])
def test_vit_dense_and_local_sgd_pretrain(tmp_path, method):
    cfg = vit_config(tmp_path, method=method, epochs=1)
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    comm = json.loads((tmp_path / "run/pretrain/comm.json").read_text())
    full = sum(v.numel() * v.element_size() for v in build_model(VIT).state_dict().values())
    # Local SGD: every round, both workers hand their whole state over; dense in one process: nothing
    assert comm["measured_payload_bytes"] == (256 // 32 // 4 * 2 * full if method == "localsgd" else 0)
