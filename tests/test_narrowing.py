"""common.narrowing: the one narrowing path. A BN subclass is narrowed as it is (type, settings,
activation kept) and gives the masked model's outputs; a module narrowing cannot cut leaves its
group out of the selection, named in 01 --dry-run's table, and the run goes on without it."""
import json

import pytest
import torch
import torch.nn as nn

from byom_model import BatchNormAct, bn_subclass_cnn
from common.errors import UserError
from common.groups import discover
from common.models import build_model
from common.narrowing import masked, narrow, narrowing_problem
from common.selection import prunable_blocks
from conftest import brought_model_config, stage


def random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def test_a_bn_subclass_with_its_own_activation_is_narrowed_as_it_is_and_equals_masked():
    torch.manual_seed(0)
    model = random_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8, act=nn.Hardswish),
                                    nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)))
    found = discover(model)
    group = found.by_name()["0"]
    assert group.members == ("1",) and narrowing_problem(model, group) is None
    keep = {"0": torch.tensor([1, 4, 6])}
    small = narrow(model, found.groups, keep)
    bn = small[1]
    assert type(bn) is BatchNormAct and isinstance(bn.act, nn.Hardswish) and bn.num_features == 3
    assert (bn.eps, bn.momentum, bn.affine) == (model[1].eps, model[1].momentum, model[1].affine)
    assert torch.equal(bn.running_mean, model[1].running_mean[keep["0"]])
    assert small[0].out_channels == 3 and small[2].in_channels == 3 and model[1].num_features == 8  # a copy
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    small, reference = small.double(), masked(model, found.groups, keep).double()
    torch.testing.assert_close(small(x), reference(x), rtol=0, atol=1e-12)


def test_build_model_narrows_a_brought_bn_subclass_through_the_same_path():
    arch = {"name": "byom_model:bn_subclass_cnn", "num_classes": 10, "width": 1.0, "kwargs": {},
            "input_shape": [3, 32, 32], "groups": {"preset": "all", "include": [], "exclude": []}, "mids": {"0": 5}}
    small = build_model(arch, frozenset({arch["name"]}))
    assert type(small[1]) is BatchNormAct and small[1].num_features == 5 and small[3].in_channels == 5


def test_a_module_narrowing_cannot_cut_leaves_its_group_out_and_says_why():
    model = bn_subclass_cnn()
    found = discover(model)
    problem = narrowing_problem(model, found.by_name()["3"])
    assert problem == "BatchNormScaled cannot be narrowed (holds extra_scale)"
    with pytest.raises(UserError, match="group 3: BatchNormScaled cannot be narrowed"):
        narrow(model, found.groups, {"3": torch.tensor([0, 1])})
    arch = {"name": "byom_model:bn_subclass_cnn", "num_classes": 10, "width": 1.0,
            "groups": {"preset": "all", "include": [], "exclude": []}}
    assert [b.name for b in prunable_blocks(model, arch)] == ["0", "6"]


def test_01_dry_run_names_the_module_and_the_run_goes_on_without_its_group(tmp_path, capsys):
    cfg = brought_model_config(tmp_path, "bn", {"arch": "byom_model:bn_subclass_cnn", "group_preset": "all"},
                               local_iters=2)
    stage("01_pretrain_loft").main(["--config", str(cfg), "--dry-run"])
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in err.splitlines()[1:4]}
    assert rows["3"].endswith("no: BatchNormScaled cannot be narrowed (holds extra_scale)")
    assert rows["0"].endswith("partition + prune") and rows["6"].endswith("partition + prune")
    run = tmp_path / "run"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run)])
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run)])
    ticket = torch.load(run / "prune_l1_p50/ticket.pt", weights_only=True)
    assert ticket["arch"]["mids"] == {"0": 4, "6": 8}
    assert ticket["model"]["4.extra_scale"].shape == (16,)
    assert json.loads(out)["params_partitioned"] > 0
