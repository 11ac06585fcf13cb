"""Training primitives shared by every stage: lr schedule, SGD steps, evaluation, BN recalibration."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import Stream, eval_batches
from common.errors import UserError
from common.schedule import Schedule


class NonFiniteLoss(UserError):
    pass


def lr_at(step: int, schedule: Schedule) -> float:
    """Learning rate for the trainer's global step `step` (the formulas: common/schedule.py)."""
    return schedule.lr(step)


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             lr: float, grad_clip: float = 0.0, where: str = "") -> float:
    """One forward/backward/update; returns the loss. Stops on a non-finite loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = F.cross_entropy(model(x), y)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at {where}; the last good checkpoint is kept")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def train_steps(model: nn.Module, stream: Stream, steps: range, schedule: Schedule, tcfg, device,
                momentum_state: dict | None = None, where: str = "") -> tuple[float, dict | None]:
    """SGD on `stream`'s batches `steps` with a fresh optimizer (or given momentum buffers).

    Returns the mean loss and, if momentum buffers were given, the updated ones (by param name)."""
    model.to(device).train()
    opt = make_sgd(model, tcfg.lr, tcfg.momentum, tcfg.weight_decay)
    named = dict(model.named_parameters())
    if momentum_state is not None:
        for k, p in named.items():
            opt.state[p]["momentum_buffer"] = momentum_state[k].to(device).clone()
    losses = []
    for t in steps:
        x, y = stream.batch(t)
        losses.append(sgd_step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                               lr_at(t, schedule), tcfg.grad_clip,
                               where=f"{where} step {t}"))
    new_momentum = None
    if momentum_state is not None:
        new_momentum = {k: opt.state[p]["momentum_buffer"].detach().cpu() if p in opt.state
                        else momentum_state[k] for k, p in named.items()}
    return sum(losses) / max(1, len(losses)), new_momentum


@torch.no_grad()
def recalibrate_bn(model: nn.Module, stream: Stream, num_batches: int, device) -> nn.Module:
    """Re-estimate every BN's running mean/var as the plain average over `num_batches` batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_batches == 0:
        return model
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches
    model.to(device).train()
    for t in range(num_batches):
        x, _ = stream.batch(t)
        model(x.to(device))
    for bn, m in zip(bns, saved):
        bn.momentum = m
    return model


@torch.no_grad()
def correct_per_sample(model: nn.Module, data, batch_size: int, device) -> tuple[torch.Tensor, float]:
    """(bool per image of `data`, in its order: top-1 right; mean loss) on an ImageSet."""
    model.to(device).eval()
    correct, loss, n = [], 0.0, 0
    for x, y in eval_batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct.append((out.argmax(1) == y).cpu())
        n += len(y)
    return (torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)), loss / max(1, n)


def evaluate(model: nn.Module, data, batch_size: int, device) -> tuple[float, float]:
    """(top-1 accuracy in %, mean loss) on an ImageSet."""
    correct, loss = correct_per_sample(model, data, batch_size, device)
    return 100.0 * int(correct.sum()) / max(1, len(correct)), loss
