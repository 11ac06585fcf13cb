"""Fused workers (`pretrain.fused_workers`): the S subnetworks a device trains, as one module.

The S subnetworks of a round have the same shapes (when S divides every partitioned width) and
never interact inside a round, so they can run as one network whose every layer holds the S
copies side by side: a convolution becomes a grouped convolution (groups × S), a BN layer one BN
over S × C channels (so each worker keeps its own statistics), the classifier a block-diagonal
linear map. Worker s's batch enters in channel group s. One forward, one backward and one SGD
update then do the work of S sequential steps; the loss is the sum of the S workers' mean
losses, so each worker's gradient is exactly its own. SGD's update is elementwise, so the fused
update equals the S separate ones (up to float summation order inside the grouped kernels).

Worker s's tensors are views into the fused ones (`worker_views`): the round's slices are copied
into them in place and aggregation reads them, so partition and aggregation are unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.models import PadShortcut


class GroupedLinear(nn.Module):
    """S independent linear maps on S feature groups: [B, S·in] → [B, S·out]."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bgi,goi->bgo", x.view(len(x), self.groups, self.in_features), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(len(x), self.groups * self.out_features)


def _fused_layer(m: nn.Module, S: int) -> nn.Module | None:
    """The S-fold layer replacing `m`, or None where `m` needs no change (no parameters of its own)."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(S * m.in_channels, S * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         groups=S * m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(S * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, nn.Linear):
        return GroupedLinear(S, m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, PadShortcut):  # pads the channel dimension at its ends: would mix the groups
        raise UserError("pretrain.fused_workers: this model's option-A shortcuts pad channels, which a fused "
                        "module cannot keep apart; set pretrain.fused_workers=false")
    if any(True for _ in m.parameters(recurse=False)):
        raise UserError(f"pretrain.fused_workers: no fused form of {type(m).__name__} (it holds parameters "
                        f"of its own: {', '.join(n for n, _ in m.named_parameters(recurse=False))}); set "
                        "pretrain.fused_workers=false")
    return None


def fuse(module: nn.Module, S: int) -> nn.Module:
    """A new module computing S copies of `module`'s architecture side by side (fresh tensors)."""
    fused = copy.deepcopy(module)
    for name, m in list(fused.named_modules()):
        new = _fused_layer(m, S)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(fused.get_submodule(parent) if parent else fused, attr, new)
    return fused


def worker_views(fused_state: dict, worker_shapes: dict, S: int) -> list[dict]:
    """Per worker, its tensors as views into the fused state (same keys and shapes as one
    subnetwork's state dict). A scalar (num_batches_tracked) is one counter shared by all."""
    views = [{} for _ in range(S)]
    for k, t in fused_state.items():
        for s in range(S):
            views[s][k] = t if t.dim() == 0 else t.unflatten(0, (S, -1))[s].view(worker_shapes[k])
    return views


def fused_criterion(S: int):
    """Sum over the S workers of each one's mean cross-entropy: logits [B, S·C], labels [B, S]."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per = F.cross_entropy(logits.view(len(logits), S, -1).transpose(1, 2), labels, reduction="none")
        return per.mean(0).sum()
    return loss
