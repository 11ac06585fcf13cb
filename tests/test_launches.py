"""The step and the round with few launches (issue 24, item 6), each the same arithmetic as the
per-tensor code it replaces: zeroed (not re-created) momentum, foreach SGD, the masked update as
foreach operators, flat buffers for a round's loading and aggregation, and opt-in torch.compile."""
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import DATA, REPO, TINY
from common.config import load_config
from common.data import load_cifar
from common.dist import Comm, DistEnv
from common.finetune import LockedUpdate
from common.loft import draw_partition, mean_of_workers
from reference_round import aggregate, extract, partition_to
from common.models import build_model
from common.pretrain import METHODS, fresh_momentum, momentum_into_flat_buffers
from common.train import SGDStep, make_sgd

sys.path.insert(0, str(REPO / "tests"))   # byom_model
sys.path.insert(0, str(REPO / "bench"))   # ops
from ops import OpCounter  # noqa: E402

TINY_ARCH = {"name": "preresnet18", "num_classes": 10, "width": 0.125}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module")
def cifar():
    return load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(256))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, and equal in the sign of every zero."""
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_momentum_zeroed_in_place_steps_as_no_buffer_bit_for_bit_in_float64(weight_decay):
    """fresh_momentum keeps the buffers and fills them with -0.0; with dampening 0 the next steps
    then equal those from no buffer (a cleared state), bit for bit and zero signs included, for
    gradients and weights holding ±0.0. A +0.0 fill would turn a -0.0 gradient into +0.0."""
    torch.manual_seed(0)
    tcfg = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=weight_decay, grad_clip=0.0, bf16=False,
                           channels_last=False)
    w0 = torch.randn(6, 5, dtype=torch.float64)
    w0[0, :3] = torch.tensor([0.0, -0.0, -0.0], dtype=torch.float64)
    grads = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    for g in grads:
        g[0, :3] = torch.tensor([-0.0, -0.0, 0.0], dtype=torch.float64)
        g[1, :2] = torch.tensor([-0.0, 0.0], dtype=torch.float64)
    runs = {}
    for how in ("cleared", "zeroed"):
        model = torch.nn.Linear(5, 6, bias=False).double()
        sgd = SGDStep(model, tcfg, "cpu", schedule=None)
        flats, _ = momentum_into_flat_buffers([sgd])
        for _ in range(2):  # two rounds: the second reuses the first one's buffers
            with torch.no_grad():
                model.weight.copy_(w0)
            if how == "cleared":
                sgd.opt.state.clear()
            else:
                fresh_momentum(flats)
            for g in grads:
                model.weight.grad = g.clone()
                sgd.opt.step()
        runs[how] = model.weight.detach().clone(), sgd.opt.state[model.weight]["momentum_buffer"].clone()
    assert same_bits(runs["zeroed"][0], runs["cleared"][0])
    assert same_bits(runs["zeroed"][1], runs["cleared"][1])
    plus_zero = torch.zeros(2, dtype=torch.float64) * 0.9 + torch.tensor([-0.0, -0.0], dtype=torch.float64)
    assert not torch.signbit(plus_zero).any()  # why -0.0: +0.0 + -0.0 is +0.0


def test_foreach_sgd_equals_the_per_parameter_loop_bit_for_bit(cifar):
    """make_sgd's foreach update against torch.optim.SGD's per-parameter loop, several steps with
    momentum and weight decay, on the CPU."""
    x, y = normalised(cifar, 32)
    models = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY_ARCH).train()
        opt = make_sgd(model, 0.05, 0.9, 5e-4) if foreach else \
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        models.append(model.state_dict())
    assert [k for k in models[0] if not same_bits(models[0][k], models[1][k])] == []


def normalised(data, n):
    from common.data import normalize
    return normalize(data.images[:n], data.mean, data.std), data.labels[:n]


def test_locked_update_as_foreach_operators_equals_the_per_parameter_loop(cifar):
    """LockedUpdate's two foreach operators give every gradient (grad + wd·w)·mask, as the loop did."""
    x, y = normalised(cifar, 32)
    torch.manual_seed(0)
    model = build_model(TINY_ARCH).train()
    F.cross_entropy(model(x), y).backward()
    named = dict(model.named_parameters())
    mask = {k: torch.rand_like(p) < 0.3 for k, p in named.items() if p.dim() > 1}
    expected = {}
    for k, p in named.items():  # the loop LockedUpdate ran before
        expected[k] = p.grad.clone().add_(p, alpha=5e-4)
        if k in mask:
            expected[k].mul_(mask[k].to(p.dtype))
    LockedUpdate(mask, 5e-4)(model)
    assert [k for k, p in named.items() if not same_bits(p.grad, expected[k])] == []


def loft_of(tmp_path, cifar, model, device="cpu", **pretrain):
    """The configured method (loft or localsgd) on the tiny config with `model` and `pretrain` keys."""
    from common.data import input_shape
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
