"""timm, the library most researchers build models with: its models are brought by name
(`model.arch: timm.<name>`), their BN layers are timm's BatchNormAct2d (the activation inside the
BN), and discovery, narrowing and a LoFT round go through the same code as the zoo's."""
import pytest
import torch
from timm.layers import BatchNormAct2d

from common.config import load_config
from common.groups import discover
from common.models import build_model
from common.narrowing import masked, narrow, narrowing_problem
from conftest import REPO


def timm_arch(name: str) -> dict:
    return {"name": f"timm.{name}", "num_classes": 10, "width": 1.0, "kwargs": {}, "input_shape": [3, 32, 32],
            "groups": {"preset": "all", "include": [], "exclude": []}}


@pytest.mark.parametrize("name, groups", [("efficientnet_b0", 35), ("mobilenetv3_large_100", 24)])
def test_a_timm_model_with_bn_act_layers_is_discovered_and_narrowed_as_masked(name, groups):
    torch.manual_seed(0)
    model = build_model(timm_arch(name)).double().eval()
    bn_acts = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert bn_acts
    with torch.no_grad():   # BN statistics that matter: random, not the init's 0 / 1
        for m in bn_acts:
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    found = discover(model, example=torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert len(found.groups) == groups
    assert [narrowing_problem(model, g) for g in found.groups] == [None] * groups
    gen = torch.Generator().manual_seed(1)
    keep = {g.name: torch.randperm(g.width, generator=gen)[:max(1, g.width // 2)] for g in found.groups}
    small = narrow(model, found.groups, keep)
    narrowed_acts = [m for m in small.modules() if isinstance(m, BatchNormAct2d)]
    assert [type(m.act) for m in narrowed_acts] == [type(m.act) for m in bn_acts]   # the activation kept
    assert sum(p.numel() for p in small.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(small(x), masked(model, found.groups, keep)(x), rtol=0, atol=1e-9)


def test_the_timm_config_loads_and_builds_its_model():
    cfg = load_config(REPO / "yaml/timm_effnet_b0_c10.yaml")
    assert cfg.model.arch == "timm.efficientnet_b0" and cfg.importable == frozenset()   # a library: no import check
    from common.models import arch_of
    model = build_model(arch_of(cfg.model, cfg.data))
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())


def test_an_unknown_timm_name_is_one_line():
    from common.errors import UserError
    with pytest.raises(UserError, match="timm has no model 'nope_net'"):
        build_model(timm_arch("nope_net"))
