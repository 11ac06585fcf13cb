"""The one SGD step (common/train.py): the same arithmetic as the per-parameter code it replaced
(zeroed momentum, foreach SGD, the masked update as foreach operators)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.data import load_cifar
from common.finetune import LockedUpdate
from common.models import build_model
from common.pretrain import fresh_momentum, momentum_into_flat_buffers
from common.train import SGDStep, make_sgd
from conftest import DATA


@pytest.fixture(scope="module")
def cifar():
    return load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(256))


TINY_ARCH = {"name": "preresnet18", "num_classes": 10, "width": 0.125}

def normalised(data, n):
    from common.data import normalize
    return normalize(data.images[:n], data.mean, data.std), data.labels[:n]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
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
