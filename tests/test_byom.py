"""Bring your own model: the stages over the channel groups tracing finds, on torchvision's
ResNet-50 (two groups a Bottleneck, one tensor on both) and on a model from package.module:callable.

The expectations are independent of the code under test: a worker's slice is read back with
plain indexing, the shared tensors against a mean taken here, the bytes against the worker
subnetworks' own state dicts, the kept filters against L1 norms computed with numpy."""
from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest
import torch

from conftest import DATA, REPO, brought_model_config, deepspeed_launcher, randomised, run_cli, stage
from common.config import load_config
from common.dist import Comm, DistEnv
from common.errors import UserError
from common.narrowing import SlicePlan, masked, select_channels
from common.loft import draw_partition, worker_arch
from reference_round import aggregate, extract
from common.models import build_model, narrowed_arch
from common.selection import block_refs, group_selection, partitioned_blocks, prunable_blocks

sys.path.insert(0, str(REPO / "tests"))   # byom_model: the user's module
R50 = {"name": "torchvision.resnet50", "num_classes": 10, "width": 1.0, "kwargs": {"width_per_group": 8},
       "input_shape": [3, 32, 32]}
CNN = {"name": "byom_model:small_cnn", "num_classes": 10, "width": 1.0, "kwargs": {}, "input_shape": [3, 32, 32],
       "groups": {"preset": "all", "include": [], "exclude": []}}
PAPER_BLOCKS = [f"layer{s}.{j}" for s, n in ((2, 4), (3, 6), (4, 3)) for j in range(1, n)]


@pytest.fixture(scope="module")
def r50():
    return randomised(R50)


def test_resnet50_groups_the_paper_preset_and_the_overlap_rule(r50):
    refs = block_refs(r50)
    assert len(refs) == 33                                # stem + 2 per Bottleneck (16 blocks)
    chosen = [b.name for b in partitioned_blocks(r50, arch=R50)]
    assert chosen == [f"{blk}.{conv}" for blk in PAPER_BLOCKS for conv in ("conv1", "conv2")]
    assert [b.name for b in prunable_blocks(r50, R50)] == [
        f"layer{s}.{j}.{conv}" for s, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(1, n)
        for conv in ("conv1", "conv2")]
    # conv2's weight lies on both groups of its block: outputs on its own, inputs on conv1's
    plan = SlicePlan.of(partitioned_blocks(r50, arch=R50), r50.state_dict())
    assert plan.entries["layer2.1.conv2.weight"] == (("layer2.1.conv1", 1, 1), ("layer2.1.conv2", 0, 1))
    # non_adjacent keeps the first group of each block and says why the second is left whole
    refs, sel = group_selection(r50, R50, overlap="non_adjacent")
    assert list(sel.partitioned) == [f"{blk}.conv1" for blk in PAPER_BLOCKS]
    assert sel.why_not["layer2.1.conv2"] == "shares layer2.1.conv2.weight with layer2.1.conv1 (pretrain.overlap=non_adjacent)"
    # include / exclude patterns, on names
    arch = {**R50, "groups": {"preset": "paper", "include": ["layer3.*"], "exclude": ["*.conv2"]}}
    assert [b.name for b in partitioned_blocks(r50, arch=arch)] == [f"layer3.{j}.conv1" for j in range(1, 6)]
    nothing = {**R50, "groups": {"preset": "paper", "include": ["nope*"], "exclude": []}}
    with pytest.raises(UserError, match="not partitionable .* include/exclude patterns"):
        prunable_blocks(r50, nothing)


def test_resnet50_rebuilt_narrow_from_its_arch_equals_the_masked_full_model(r50):
    """Every one of the 33 groups (stem and both dims of every conv2 included) cut to a seeded
    random half: build_model(arch with mids) + the sliced state = the full model masked (1e-5)."""
    refs = block_refs(r50)
    gen = torch.Generator().manual_seed(5)
    keep = {b.name: torch.randperm(b.mid, generator=gen)[: max(1, b.mid // 2)].sort().values for b in refs}
    small = build_model(narrowed_arch(R50, {k: len(v) for k, v in keep.items()}))
    state = r50.state_dict()
    small.load_state_dict(select_channels(state, SlicePlan.of(refs, state), keep))
    reference = masked(r50, [b.group for b in refs], {b.group.name: keep[b.name] for b in refs})
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in r50.parameters())
    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_loft_round_on_resnet50_with_four_workers(r50):
    """S = 4, block-diagonal: each worker's slices land at its indices, the shared tensors are the
    workers' mean, what no worker held (conv2's off-diagonal blocks) is bit-equal to before, and
    the bytes sent are the four subnetworks' state dicts."""
    S, state = 4, r50.state_dict()
    blocks = partitioned_blocks(r50, arch=R50)
    plan = SlicePlan.of(blocks, state)
    part = draw_partition(blocks, S, 0, 3)
    gen = torch.Generator().manual_seed(1)
    results = {}
    for w in range(S):
        sub = extract(state, plan, part, w)
        results[w] = {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 4 * (w + 1)
                      for k, v in sub.items()}
    comm = Comm(DistEnv())
    new = aggregate(state, plan, part, results, comm, S)
    held = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in state.items() if k in plan.entries}
    for w in range(S):
        for k in plan.entries:
            index = [slice(None)] * state[k].dim()
            for group, dim, _ in plan.entries[k]:
                index[dim] = part[group][w]
            grid = torch.meshgrid(*[torch.arange(n)[i] for n, i in zip(state[k].shape, index)], indexing="ij")
            assert torch.equal(new[k][grid], results[w][k]), k
            held[k][grid] = True
    for k, mask in held.items():
        assert torch.equal(new[k][~mask], state[k][~mask]), k
    assert not held["layer2.1.conv2.weight"].all() and held["layer2.1.conv1.weight"].all()
    for k in (k for k in state if k not in plan.entries):
        stack = torch.stack([results[w][k] for w in range(S)])
        expected = stack.sum(0) / S if stack.is_floating_point() else torch.div(stack.sum(0), S, rounding_mode="floor")
        assert torch.equal(new[k], expected), k
    sent = sum(v.numel() * v.element_size() for w in range(S)
               for v in build_model(worker_arch(R50, part, w)).state_dict().values())
    assert comm.bytes_sent == sent


def r50_config(tmp_path, **pretrain):
    return brought_model_config(tmp_path, "r50", {"arch": "torchvision.resnet50", "kwargs": {"width_per_group": 8}},
                                workers=4, **pretrain)


def test_resnet50_loft_one_process_equals_two_gloo_ranks(tmp_path):
    cfg = r50_config(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(two)], deepspeed_launcher(2))
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    a, b = (torch.load(d / "pretrain/epoch_001.pt", weights_only=True) for d in (one, two))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    c1, c2 = (json.loads((d / "pretrain/comm.json").read_text()) for d in (one, two))
    assert c1["measured_payload_bytes"] == c2["measured_payload_bytes"]
    # analytic (parameters, push + pull, fp32) = rounds x 2 x the four subnetworks' parameters
    model = build_model(a["arch"])
    blocks = partitioned_blocks(model, arch=a["arch"])
    part = draw_partition(blocks, 4, 0, 0)
    params = sum(p.numel() for w in range(4) for p in build_model(worker_arch(a["arch"], part, w)).parameters())
    assert c1["analytic_ps_bytes"]["loft"] == (256 // 32 // 4) * 2 * params * 4


def test_resnet50_c10_yaml_end_to_end_on_a_small_subset(tmp_path):
    """The shipped config, 01 → 02 → 03 → 04 on real CIFAR-10 (a subset): 03's ticket keeps in
    every pruned group exactly the filters of largest L1 norm, and is physically smaller."""
    run = tmp_path / "run"
    sets = ["--set", f"data.root={DATA}", "--set", "data.train_subset=320", "--set", "data.test_subset=100",
            "--set", "pretrain.epochs=2", "--set", "pretrain.local_iters=5", "--set", "pretrain.batch_size=32",
            "--set", "pretrain.bn_recal_batches=1", "--set", "finetune.epochs=1", "--set", "finetune.batch_size=32",
            "--set", "dist.threads_per_rank=1"]
    base = ["--config", str(REPO / "yaml/resnet50_c10.yaml"), "--run-dir", str(run), *sets]
    for name in ("01_pretrain_loft", "02_filter_distance", "03_prune"):
        stage(name).main(base)
    src = torch.load(run / "pretrain/epoch_002.pt", weights_only=True)
    ticket = torch.load(run / "prune_l1_p50/ticket.pt", weights_only=True)
    full = build_model(src["arch"])
    pruned = prunable_blocks(full, src["arch"])
    assert set(ticket["kept"]) == {b.name for b in pruned} and len(pruned) == 24   # 12 blocks [1:] x 2 groups
    for b in pruned:
        w = src["model"][f"{b.producer}.weight"].double().numpy()
        norms = np.abs(w).reshape(len(w), -1).sum(1)
        top = np.sort(np.argsort(-norms, kind="stable")[: ticket["arch"]["mids"][b.name]])
        assert ticket["kept"][b.name].tolist() == top.tolist(), b.name
    small = build_model(ticket["arch"])
    small.load_state_dict(ticket["model"])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    assert (run / "distance/filter_distance.csv").read_text().count("layer4.2.conv2") > 0
    stage("04_finetune").main([*base, "--ticket", str(run / "prune_l1_p50/ticket.pt")])
    final = torch.load(run / "finetune_l1_p50_finetune/final.pt", weights_only=True)
    assert final["arch"] == ticket["arch"]


def test_a_callable_model_runs_pretrain_and_prune_and_is_imported_only_when_named(tmp_path):
    cfg = brought_model_config(tmp_path, "cnn", {"arch": "byom_model:small_cnn", "kwargs": {"width": 8},
                                                 "group_preset": "all"}, local_iters=2)
    run = tmp_path / "run"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run)])
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run)])
    ticket = torch.load(run / "prune_l1_p50/ticket.pt", weights_only=True)
    assert ticket["arch"]["mids"] == {"0": 4, "4": 8, "9": 16}    # the flatten-consumed group too
    assert ticket["model"]["9.weight"].shape == (16, 8 * 16)      # fc1 read 8 kept channels x 16 positions
    with pytest.raises(UserError, match="does not name it"):
        build_model(ticket["arch"])                               # no config named it for this call


def test_the_importable_set_belongs_to_one_config_and_does_not_leak_to_the_next(tmp_path):
    """Two configs loaded in one process (as bench/ runs stages): the second, naming a zoo model,
    may not import the module the first one named."""
    named = load_config(brought_model_config(tmp_path, "cnn", {"arch": "byom_model:small_cnn", "kwargs": {"width": 8},
                                                               "group_preset": "all"}, local_iters=2))
    other = load_config(None, ["model.arch=resnet20"])
    assert named.importable == {"byom_model:small_cnn"} and other.importable == frozenset()
    arch = {**CNN, "kwargs": {"width": 8}}
    assert build_model(arch, named.importable)
    with pytest.raises(UserError, match="does not name it"):
        build_model(arch, other.importable)


def test_a_checkpoint_of_another_group_structure_is_one_line(tmp_path):
    with pytest.raises(UserError, match="name no channel group of this model: layer9.9"):
        build_model({**R50, "mids": {"layer9.9": 3}})
    cfg = r50_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("torchvision.resnet50", "torchvision.nope"))
    r = run_cli(["01_pretrain_loft.py", "--config", str(bad), "--dry-run"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: model.arch=torchvision.nope: torchvision.models has no builder or class 'nope'"]


def test_a_module_called_twice_per_forward_is_no_group_and_says_so():
    from byom_model import SharedConvNet
    from common.groups import discover
    found = discover(SharedConvNet())
    assert not any("shared" in name for g in found.groups
                   for name in [g.name, *(p for p, _ in g.producers), *(c for c, _, _ in g.consumers)])
    assert any("shared module (shared: called 2 times per forward)" in reason for _, reason in found.rejected)


def test_a_literal_width_in_the_forward_is_one_line_naming_the_group(tmp_path):
    """A file-path model (path relative to the config file) whose forward flattens with a literal
    width: 01 stops in one line naming the group whose narrowing breaks it, not with a traceback."""
    cfg = brought_model_config(tmp_path, "literal", {"arch": "byom_model.py:LiteralViewNet", "group_preset": "all"})
    (tmp_path / "byom_model.py").write_text((REPO / "tests/byom_model.py").read_text())
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: model.arch=") and \
        "narrowing channel group conv2 breaks the model's forward" in r.stderr
    ok = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "run"),
                  "--set", "model.group_exclude=[conv2]"])
    assert ok.returncode == 0, ok.stderr[-2000:]



def test_a_model_built_for_larger_inputs_is_brought_as_it_is_with_image_size(tmp_path):
    """A ViT made for 64 px (patch 16) on CIFAR-10 resized to 64 px on the device: 01 and 03 run,
    and the checkpoint records the input shape the later stages rebuild it with."""
    vit = {"arch": "torchvision.VisionTransformer", "group_preset": "all",
           "kwargs": {"image_size": 64, "patch_size": 16, "num_layers": 1, "num_heads": 2, "hidden_dim": 32,
                      "mlp_dim": 64}}
    cfg = brought_model_config(tmp_path, "vit64", vit, local_iters=2, bn_recal_batches=0)
    run = tmp_path / "run"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run), "--set", "data.image_size=64"])
    ck = torch.load(run / "pretrain/epoch_001.pt", weights_only=True)
    assert ck["arch"]["input_shape"] == [3, 64, 64]
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run), "--set", "data.image_size=64"])
    assert torch.load(run / "prune_l1_p50/ticket.pt", weights_only=True)["arch"]["mids"]


def test_weights_trained_elsewhere_are_pruned_fine_tuned_and_ranked(tmp_path):
    """A plain state_dict of the config's model (torch.save(model.state_dict()), here torchvision's
    resnet18 for 10 classes): 03 --from prunes it, 04 fine-tunes the ticket, 02 --from ranks a list
    of them; another model's weights are one line naming the first key that does not fit."""
    import torchvision.models as tvm
    cfg = brought_model_config(tmp_path, "r18", {"arch": "torchvision.resnet18"})
    files = []
    for seed in range(3):
        torch.manual_seed(seed)
        files.append(tmp_path / f"weights_{seed}.pth")
        torch.save(tvm.resnet18(num_classes=10).state_dict(), files[-1])
    run, base = tmp_path / "run", ["--config", str(cfg), "--run-dir", str(tmp_path / "run")]
    stage("03_prune").main([*base, "--from", str(files[0])])
    ticket = torch.load(run / "prune_l1_p50/ticket.pt", weights_only=True)
    assert ticket["arch"]["mids"] and ticket["epoch"] == 0
    stage("04_finetune").main([*base, "--ticket", str(run / "prune_l1_p50/ticket.pt")])
    assert json.loads((run / "finetune_l1_p50_finetune/result.json").read_text())["final_test_acc"] >= 0
    stage("02_filter_distance").main([*base, "--from", *map(str, files)])
    assert {row["epoch_a"] for row in csv.DictReader(open(run / "distance/filter_distance.csv"))} >= {"0", "1", "2"}
    torch.save(tvm.resnet18(num_classes=100).state_dict(), tmp_path / "other.pth")
    r = run_cli(["03_prune.py", *base, "--from", str(tmp_path / "other.pth"), "--tag", "other"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'other.pth'}: fc.weight of shape (100, 512), this config's model (10, 512): "
        "weights of another model or number of classes")


BROKEN = '''import torch.nn as nn
{top}

def build(num_classes=10, width=8):
    {body}
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.Flatten(), nn.LazyLinear(num_classes))
'''


@pytest.mark.parametrize("top, body, kwargs, message", [
    ("raise ValueError('needs a GPU')", "", {}, r"importing .*broken.py raised ValueError: needs a GPU$"),
    ("", "raise RuntimeError('out of\\nideas')", {}, r"building the model raised RuntimeError: out of$"),
    ("", "width = width + 'px'", {"width": 4}, r"building the model raised TypeError: unsupported operand"),
    ("", "", {"depth": 3}, r"its signature refuses model.kwargs=\{'depth': 3, 'num_classes': 10\} \(got an unexpected"),
])
def test_a_brought_module_or_builder_that_raises_is_one_line_and_exit_2(tmp_path, capsys, top, body, kwargs,
                                                                        message):
    """Whatever the user's code raises: one line naming model.arch, exit code 2; model.kwargs is
    blamed only when the builder's signature refuses them, not for a TypeError inside it."""
    from common.cli import run_stage
    (tmp_path / "broken.py").write_text(BROKEN.format(top=top, body=body or "pass"))
    cfg = brought_model_config(tmp_path, "broken", {"arch": "broken.py:build", "kwargs": kwargs})
    with pytest.raises(SystemExit) as e:
        run_stage(stage("01_pretrain_loft").main, ["--config", str(cfg), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: model.arch={tmp_path}/broken.py:build")
    assert re.search(message, err[0]), err[0]
    assert ("model.kwargs" in err[0]) == ("refuses" in message)


def test_a_package_not_found_asks_for_pythonpath_and_a_missing_dependency_does_not(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    endings = {"no_such_pkg_xyz.nets:build":
               "No module named 'no_such_pkg_xyz') (is the folder holding no_such_pkg_xyz on PYTHONPATH?)",
               "needs_dep:build": "No module named 'no_such_dependency_xyz')"}   # a module it imports: no hint
    for name, ending in endings.items():
        with pytest.raises(UserError, match="cannot import it") as e:
            build_model({**CNN, "name": name}, frozenset({name}))
        assert str(e.value).endswith(ending), str(e.value)
