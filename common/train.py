"""The one training step every stage uses, its lr schedule, evaluation and BN recalibration.

`SGDStep` is the single place where a model is trained: LoFT and Local SGD workers, dense
(one process, micro-batches by gradient accumulation), one-process GPipe and 04's tickets all
call it. It holds the lr schedule, the loss (`criterion`), the gradient hook, clipping, bf16
autocast and channels_last. It never synchronises with the host: the loss comes back as a
device tensor; callers sum those and check finiteness once per round or log interval
(`check_finite`), so a GPU runs a whole round's K steps without waiting for the CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import Stream, eval_batches
from common.errors import UserError
from common.schedule import Schedule


class NonFiniteLoss(UserError):
    pass


def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss of every method and stage."""
    return F.cross_entropy(logits, labels)


def lr_at(step: int, schedule: Schedule) -> float:
    """Learning rate for the trainer's global step `step` (the formulas: common/schedule.py)."""
    return schedule.lr(step)


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with its multi-tensor (foreach) update: a few operators a step instead of three per
    parameter. On the CPU the foreach operators run the per-tensor ones, so the result is the same
    bit for bit; on CUDA foreach is PyTorch's default already."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


class SGDStep:
    """One SGD update of `model` on a batch given as chunks (gradient accumulation over them).

    `tcfg` is a training section (cfg.pretrain or cfg.finetune): lr, momentum, weight_decay,
    grad_clip, bf16, channels_last; `schedule` its lr schedule (common.schedule). `grad_hook(model)` edits the summed gradients
    before the update (masks, locked weights); it then owns weight decay, so the optimizer gets
    none. bf16 autocast applies on CUDA only (on the CPU it is ignored). `loss_fn` is `criterion`
    except for fused workers (common.fused), whose loss sums the workers' losses. `compile`:
    the forward (and so its backward) runs through `torch.compile` (pretrain.compile)."""

    def __init__(self, model: nn.Module, tcfg, device, schedule: Schedule, grad_hook=None, loss_fn=None,
                 compile: bool = False):
        self.tc, self.schedule, self.grad_hook = tcfg, schedule, grad_hook
        self.loss_fn = loss_fn or criterion  # looked up here, not at import: an edited criterion takes effect
        device = torch.device(device)
        self.channels_last = tcfg.channels_last
        self.model = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.autocast = tcfg.bf16 and device.type == "cuda"
        self.opt = make_sgd(self.model, tcfg.lr, tcfg.momentum, 0.0 if grad_hook else tcfg.weight_decay)
        self.forward_model = torch.compile(self.model) if compile else self.model  # the same parameters either way

    def lr(self, t: int) -> float:
        return lr_at(t, self.schedule)

    def forward_loss(self, module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.loss_fn(module(x), y)

    def __call__(self, t: int, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Update for global step t; returns the batch's mean loss (a detached device scalar)."""
        for g in self.opt.param_groups:
            g["lr"] = self.lr(t)
        self.opt.zero_grad(set_to_none=True)
        total, n = None, len(chunks)
        for x, y in chunks:
            loss = self.forward_loss(self.forward_model, x, y)
            (loss / n if n > 1 else loss).backward()  # (x / 1 is x exactly: two operators saved)
            total = loss.detach() if total is None else total + loss.detach()
        if self.grad_hook:
            self.grad_hook(self.model)
        if self.tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.opt.step()
        return total / n if n > 1 else total

    def attach_momentum(self, buffers: list[torch.Tensor]):
        """Make `buffers` (one per parameter, in `named_parameters` order) the optimizer's momentum
        buffers. SGD then updates them in place, so their owner (LoFT's workers: flat buffers,
        common.pretrain) resets, loads and reads them all with one operator per dtype."""
        for (_, p), buf in zip(self.model.named_parameters(), buffers):
            self.opt.state[p]["momentum_buffer"] = buf


def flat_buffers(like: list[torch.Tensor]) -> tuple[dict[torch.dtype, torch.Tensor], list[torch.Tensor]]:
    """New flat buffers, one per dtype, and in them one piece per tensor of `like` (in its order),
    shaped and strided like it (a channels_last weight keeps its layout): a round or a reset then
    touches all of them with one operator per dtype instead of one per tensor."""
    sizes: dict[torch.dtype, int] = {}
    for t in like:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    flats = {dtype: torch.empty(n, dtype=dtype, device=like[0].device) for dtype, n in sizes.items()}
    offsets, pieces = dict.fromkeys(sizes, 0), []
    for t in like:
        flat, offset = flats[t.dtype], offsets[t.dtype]
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        pieces.append(flat.as_strided(t.shape, t.stride(), offset) if dense else flat[offset:offset + t.numel()].view(t.shape))
        offsets[t.dtype] += t.numel()
    return flats, pieces


def check_finite(losses: torch.Tensor, where: str, comm=None):
    """One host sync: stop with one line if any loss in `losses` is not finite. With `comm`, the
    verdict is agreed by all ranks (a bookkeeping all-reduce), so every rank stops together."""
    bad = (~torch.isfinite(losses.detach().float())).sum().to(torch.float64).reshape(1)
    if comm is not None:
        bad = comm.sum_metric(bad)
    if bad.item():
        raise NonFiniteLoss(f"non-finite loss at {where}; the last good checkpoint is kept")


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
    """(bool per image of `data`, in its order: top-1 right; mean loss). Kept on the device until
    the end: one host sync per evaluation."""
    device = torch.device(device)
    model.to(device).eval()
    correct, loss, n = [], torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in eval_batches(data, batch_size, device):
        out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct.append(out.argmax(1) == y)
        n += len(y)
    return (torch.cat(correct).cpu() if correct else torch.zeros(0, dtype=torch.bool)), loss.item() / max(1, n)
