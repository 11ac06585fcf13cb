"""Narrowing a model to some of its channels: the one mechanism behind a LoFT worker's subnetwork,
a pruned ticket and a rebuilt checkpoint (`common.models.build_model`).

`narrow` cuts chosen channel groups (common.groups) in their producers, members and consumers with
Torch-Pruning's per-layer pruners, which slice tensors and update width attributes: every module
keeps its type and other settings (timm's BatchNormAct2d keeps its activation). A module holding a
tensor no pruner cuts cannot be narrowed (`narrowing_problem`); the selection leaves its group out.
`SlicePlan` and `select_channels` make the same cut on a state dict: what a LoFT round moves and what
04 rewinds a structured ticket to. `masked` is narrowing's reference (same outputs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from common.errors import UserError
from common.groups import CONV_TYPES, ChannelGroup

# The tensors each role's pruner cuts (or, for num_batches_tracked, leaves as the scalar it is).
LAYER_TENSORS = {"weight", "bias"}   # a producer's or a consumer's (whose bias, on its outputs, stays whole)
MEMBER_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def channel_columns(channels: torch.Tensor, repeat: int) -> torch.Tensor:
    """Indices along a dimension that holds each channel `repeat` times in a row (after a flatten)."""
    if repeat == 1:
        return channels
    return (channels[:, None] * repeat + torch.arange(repeat, device=channels.device)).reshape(-1)


# ----------------------------------------------------------------------------- modules
def narrowing_problem(model: nn.Module, group: ChannelGroup) -> str | None:
    """Why `narrow` cannot cut `group` in `model` ("BatchNormXyz cannot be narrowed (holds foo)"), or None."""
    modules = dict(model.named_modules())
    roles = [(p, LAYER_TENSORS) for p, _ in group.producers] + [(c, LAYER_TENSORS) for c, _, _ in group.consumers]
    roles += [(m, MEMBER_TENSORS) for m in group.members]
    for name, allowed in roles:
        own = [*modules[name].named_parameters(recurse=False), *modules[name].named_buffers(recurse=False)]
        extra = sorted({n for n, _ in own} - allowed)
        if extra:
            return f"{type(modules[name]).__name__} cannot be narrowed (holds {', '.join(extra)})"
    return None


def take(v: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """`v` cut along `dim` to `idx`. A grouped cut (idx [g, k]: k channels of each of g segments, as
    `SlicePlan.cuts` gives for a grouped conv's input dim) keeps, in the rows of conv group i (block i
    of g along dim 0), the columns of the channels idx[i]: channel c of segment i is column
    c − i·v.shape[dim]."""
    if idx.dim() == 1:
        return v.index_select(dim, idx)
    g, k = idx.shape
    columns = idx - torch.arange(g, device=idx.device)[:, None] * v.shape[dim]
    blocks = v.unflatten(0, (g, -1))                              # [g, rows/g, ...]
    shape = [g] + [k if d == dim + 1 else 1 for d in range(1, blocks.dim())]
    index = columns.view(shape).expand(*blocks.shape[:dim + 1], k, *blocks.shape[dim + 2:])
    return blocks.gather(dim + 1, index).flatten(0, 1)


def first_channels(group: ChannelGroup, n: int) -> torch.Tensor:
    """The first n channels of `group` as a keep set: the first n/segments of each segment (a
    narrowed model's channels are its source's kept ones in order, so these are what it holds)."""
    per, k = group.width // group.segments, n // group.segments
    if n % group.segments:
        raise UserError(f"group {group.name}: {n} channels are not {group.segments} equal conv groups")
    return (torch.arange(group.segments)[:, None] * per + torch.arange(k)).reshape(-1)


def _check_keep(groups: list[ChannelGroup], keep: dict) -> dict[str, torch.Tensor]:
    by_name = {g.name: g for g in groups}
    out = {}
    for name, idx in keep.items():
        if name not in by_name:
            raise UserError(f"no channel group named {name!r} (groups: {', '.join(by_name) or 'none'})")
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        width, segments = by_name[name].width, by_name[name].segments
        if idx.numel() == 0 or idx.unique().numel() != idx.numel() or idx.min() < 0 or idx.max() >= width:
            raise UserError(f"group {name}: kept channels must be distinct indices in [0, {width}), at least one")
        counts = torch.bincount(idx // (width // segments), minlength=segments)
        if segments > 1 and (counts != counts[0]).any():
            raise UserError(f"group {name}: a grouped conv reads its {width} channels as {segments} conv groups of "
                            f"{width // segments}; keep as many of each (kept {counts.min()} to {counts.max()})")
        out[name] = idx.sort().values
    return out


@torch.no_grad()
def narrow(model: nn.Module, groups: list[ChannelGroup], keep: dict[str, torch.Tensor],
           in_place: bool = False) -> nn.Module:
    """A copy of `model` (`model` itself if `in_place`) with every group named in `keep` (group
    name → kept channels) cut to those channels, in ascending order, in its producers, members and
    consumers. Groups are those traced on `model` as it is, so two groups on one module (a
    Bottleneck's 3x3 conv) cut both of its dims. A grouped consumer keeps, in each conv group's
    rows, the columns of that group's kept channels (as many in each: `groups` stays g)."""
    keep = _check_keep(groups, keep)
    model = model if in_place else copy.deepcopy(model)
    modules = dict(model.named_modules())
    for g in groups:
        if g.name not in keep:
            continue
        problem = narrowing_problem(model, g)
        if problem:
            raise UserError(f"group {g.name}: {problem}; leave it out with model.group_exclude")
        removed = sorted(set(range(g.width)) - set(keep[g.name].tolist()))
        if not removed:
            continue
        for name, _ in g.producers:
            m = modules[name]
            (tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels)(m, removed)
        conv_groups = dict(g.grouped)
        for name, _, repeat in g.consumers:
            m = modules[name]
            if name in conv_groups:   # Torch-Pruning's in-channel pruner keeps conv group 0's columns for all
                m.weight = nn.Parameter(take(m.weight.detach(), 1, keep[g.name].view(m.groups, -1)),
                                        m.weight.requires_grad)
                m.in_channels = len(keep[g.name])
                continue
            columns = channel_columns(torch.tensor(removed), repeat).tolist()
            (tp.prune_linear_in_channels if isinstance(m, nn.Linear) else tp.prune_conv_in_channels)(m, columns)
        for name in g.members:
            m = modules[name]
            if isinstance(m, CONV_TYPES):
                tp.prune_depthwise_conv_out_channels(m, removed)
            elif isinstance(m, nn.PReLU):
                tp.prune_prelu_out_channels(m, removed)
            else:
                tp.prune_batchnorm_out_channels(m, removed)
    return model


def masked(model: nn.Module, groups: list[ChannelGroup], keep: dict[str, torch.Tensor]) -> nn.Module:
    """The reference for `narrow`: a copy of `model` whose consumers see the removed channels as
    zeros (a forward pre-hook multiplies their input by a 0/1 mask on the channel dimension)."""
    keep = _check_keep(groups, keep)
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for g in groups:
        if g.name not in keep:
            continue
        mask = torch.zeros(g.width)
        mask[keep[g.name]] = 1.0
        for name, _, repeat in g.consumers:
            m = modules[name]
            m.register_forward_pre_hook(_mask_input(mask.repeat_interleave(repeat),
                                                    channel_dim=-1 if isinstance(m, nn.Linear) else 1))
    return ref


def _mask_input(columns: torch.Tensor, channel_dim: int):
    def hook(module, args):
        x = args[0]
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return (x * columns.to(x).view(shape), *args[1:])
    return hook


# ------------------------------------------------------------------------- state dicts
@dataclass(frozen=True)
class SlicePlan:
    """Which state entries live on keyed channel groups: key → ((group key, dim, repeat), ...).
    An entry on two groups (a Bottleneck's conv2: outputs on its own group, inputs on conv1's) is
    cut along both dims; `repeat` > 1 where a flatten gives each channel that many columns.
    `conv_groups`: key → g for a grouped conv's weight, whose dim-1 cut is per conv group
    (ChannelGroup.grouped; `take`)."""
    entries: dict[str, tuple[tuple[str, int, int], ...]]
    conv_groups: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def of(blocks, state: dict) -> "SlicePlan":
        """`blocks`: keyed groups (common.selection.BlockRef)."""
        entries: dict[str, tuple] = {}
        conv_groups = {}
        for b in blocks:
            for k, (dim, repeat) in b.group.entries(state).items():
                entries[k] = (*entries.get(k, ()), (b.name, dim, repeat))
            conv_groups.update(b.group.conv_groups())
        return SlicePlan(entries, {k: g for k, g in conv_groups.items() if k in entries})

    def cuts(self, key: str, channels: dict) -> list[tuple[int, torch.Tensor]]:
        """(dim, indices) that cut entry `key` to `channels` (group key → kept channels); a grouped
        conv's input cut: (1, the kept channels as [g, k], k of each conv group) (see `take`)."""
        g = self.conv_groups.get(key, 1)
        return [(dim, channels[group].view(g, -1) if g > 1 and dim == 1 else channel_columns(channels[group], repeat))
                for group, dim, repeat in self.entries.get(key, ()) if group in channels]

    def shape(self, state: dict, key: str, channels: dict) -> list[int]:
        """Shape of entry `key` cut to `channels` (group key → kept channels)."""
        shape = list(state[key].shape)
        g = self.conv_groups.get(key, 1)
        for group, dim, repeat in self.entries.get(key, ()):
            if group in channels:
                shape[dim] = len(channels[group]) * repeat // (g if dim == 1 else 1)
        return shape


def select_channels(state: dict, plan: SlicePlan, channels: dict[str, torch.Tensor]) -> dict:
    """A new state dict: every planned entry cut to `channels[group]`, the others copied whole."""
    sub = {}
    for k, v in state.items():
        cuts = plan.cuts(k, channels)
        for dim, idx in cuts:
            v = take(v, dim, idx)
        sub[k] = v if cuts else v.clone()
    return sub
