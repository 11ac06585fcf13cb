"""The round exchange (common.loft.RoundExchange) against the per-tensor reference
(tests/reference_round.py) bit for bit, for weights and carried momentum, with few operators per
round; and opt-in torch.compile of the workers."""
import sys

import pytest
import torch
import yaml

from conftest import DATA, REPO, TINY
from common.config import load_config
from common.data import load_cifar
from common.dist import Comm, DistEnv
from common.loft import draw_partition, mean_of_workers
from reference_round import aggregate, extract, partition_to
from common.models import build_model
from common.pretrain import METHODS

sys.path.insert(0, str(REPO / "tests"))   # byom_model
sys.path.insert(0, str(REPO / "bench"))   # ops
from ops import OpCounter  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module")
def cifar():
    return load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(256))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, and equal in the sign of every zero."""
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def loft_of(tmp_path, cifar, model, device="cpu", **pretrain):
    """The configured method (loft or localsgd) on the tiny config with `model` and `pretrain` keys."""
    from common.models import arch_of
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "model": model, "pretrain": {**TINY["pretrain"], **pretrain}}))
    cfg = load_config(path)
    arch = arch_of(cfg.model, cfg.data)
    torch.manual_seed(0)
    env = DistEnv(device=torch.device(device))
    return METHODS[cfg.pretrain.method](cfg, arch, build_model(arch, cfg.importable).state_dict(), cifar.to(device), env, Comm(env))


TINY_MODEL = TINY["model"]
R50 = {"arch": "torchvision.resnet50", "kwargs": {"width_per_group": 8}}
EFFNET = {"arch": "timm.efficientnet_b0", "group_preset": "all"}   # timm's BatchNormAct2d, SE gates
RESNEXT = {"arch": "byom_model:tiny_resnext", "group_preset": "all"}   # grouped convs (4 conv groups)


@pytest.mark.parametrize("model,pretrain", [
    (TINY_MODEL, {"workers": 2}),
    (TINY_MODEL, {"workers": 4, "channels_last": True}),
    (TINY_MODEL, {"workers": 4, "fused_workers": True}),
    (TINY_MODEL, {"workers": 2, "method": "localsgd"}),
    (R50, {"workers": 4}),                      # block-diagonal: conv2 cut along both dims
    (EFFNET, {"workers": 2}),
    (TINY_MODEL, {"workers": 2, "carry_momentum": True}),
    (RESNEXT, {"workers": 2}),                  # a grouped conv's input cut per conv group, with its rows
    (RESNEXT, {"workers": 3, "carry_momentum": True}),   # 4 channels per conv group: sets of 2, 1, 1 each
    (RESNEXT, {"workers": 2, "fused_workers": True}),
], ids=["in-turn", "channels-last", "fused", "localsgd", "resnet50-block-diagonal", "timm-efficientnet",
        "carried-momentum", "resnext-grouped", "resnext-3-workers", "resnext-fused"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_flat_exchange_loads_and_aggregates_as_extract_and_aggregate(tmp_path, cifar, model, pretrain, device):
    """RoundExchange against the per-tensor reference (extract, aggregate), bit for bit: the
    workers' slices after `load`, and the new global state and bytes after `aggregate` of workers
    holding arbitrary values (off-diagonal blocks untouched, shared floats averaged in worker order);
    carried momentum goes through the same exchange and is checked the same way."""
    loft = loft_of(tmp_path, cifar, model, device, **pretrain)
    part = draw_partition(loft.blocks, loft.S, 0, 3)
    moved = partition_to(part, device)
    sides = [(loft.exchange, loft.flat, loft.layout, loft.workers.module_states, loft.workers.flats)]
    if pretrain.get("carry_momentum"):
        gen = torch.Generator().manual_seed(2)
        loft.momentum_flat = {d: torch.randn(f.shape, generator=gen).to(f) for d, f in loft.momentum_flat.items()}
        sides.append((loft.momentum_exchange, loft.momentum_flat, loft.momentum_layout,
                      loft.workers.momentum_states, loft.workers.momentum_flats))
    for exchange, flat, layout, results, local_flats in sides:
        state = layout.views(flat)
        exchange.begin_round(part)
        exchange.load(flat)
        for w, tensors in results.items():
            expected = extract(state, loft.plan, moved, w)
            assert [k for k, v in tensors.items() if not same_bits(v, expected[k])] == [], w
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for local in local_flats.values():  # arbitrary trained values
                local.copy_(torch.randn(local.shape, generator=gen) if local.is_floating_point()
                            else torch.randint(0, 100, local.shape, generator=gen))  # (made on the CPU, copied over)
        ref_comm, comm = Comm(DistEnv(device=torch.device(device))), Comm(DistEnv(device=torch.device(device)))
        expected = aggregate(state, loft.plan, moved, results, ref_comm, loft.S)
        new = layout.views(exchange.aggregate(flat, comm, mean_of_workers))
        assert [k for k in expected if not same_bits(new[k], expected[k])] == []
        assert comm.bytes_sent == ref_comm.bytes_sent > 0


def test_a_round_dispatches_tens_of_operators_besides_its_steps(tmp_path, cifar):
    """Loading and aggregation as a few large operators: a 4-worker round's own cost (all but its
    training steps) stays near 70 operators, where the per-tensor code dispatched ~1,400."""
    loft = loft_of(tmp_path, cifar, TINY_MODEL, workers=4, local_iters=1)
    loft.run_round(0)
    train, inside = loft.workers.train, {}

    def counted(steps):
        with OpCounter() as c:
            out = train(steps)
        inside["train"] = c.total
        return out

    loft.workers.train = counted
    with OpCounter() as whole:
        loft.run_round(1)
    assert whole.total - inside["train"] < 120, whole.ops.most_common(20)


def test_pretrain_compile_trains_the_workers_through_torch_compile(tmp_path, cifar):
    """pretrain.compile: the workers' forward runs compiled (a small brought model: compiling on a
    CPU takes seconds per graph), and a round gives the uncompiled round's weights up to kernel
    rounding."""
    model = {"arch": "byom_model:small_cnn", "kwargs": {"width": 8}, "group_preset": "all"}
    states = {}
    for compiled in (False, True):
        loft = loft_of(tmp_path, cifar, model, workers=2, local_iters=2, compile=compiled)
        loss = loft.run_round(0)
        assert torch.isfinite(loss)
        forward = loft.workers.sgds[0].forward_model
        assert isinstance(forward, torch._dynamo.eval_frame.OptimizedModule) == compiled
        states[compiled] = loft.state
    for k, v in states[False].items():
        torch.testing.assert_close(states[True][k], v, rtol=1e-4, atol=1e-4, msg=k)
