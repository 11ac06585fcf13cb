"""Importance: which filters or weights a ticket keeps — the one place 02 (filter distance), the
emergence stop of 01 and 03 (pruning) take it from.

A pruning criterion is one scoring function and one registration:
- `@filter_criterion(name)`: fn(state, group) → one score per channel of a prunable channel
  group (common.groups.ChannelGroup; higher = kept); `prune.kind=name` then prunes structurally (narrower blocks, `kept` indices);
- `@weight_criterion(name)`: fn(weight) → one score per weight (higher = kept); `prune.kind=name`
  then prunes by masks (unstructured, `mask`).
Keep counts: a block keeps ceil((1 - p)·C) filters (at least one; a group of s segments, read per
conv group by a grouped conv, ceil((1 - p)·C/s) of each segment); a group of n weights keeps
round((1 - p)·n), half up. Both round (1 - p)·x to 6 decimals first, so that 0.3·10 is 3, not
3.0000000000000004, and a half never depends on float noise.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from common.groups import ChannelGroup

FILTER_CRITERIA: dict[str, Callable] = {}
WEIGHT_CRITERIA: dict[str, Callable] = {}


def filter_criterion(name: str):
    def register(fn):
        FILTER_CRITERIA[name] = fn
        return fn
    return register


def weight_criterion(name: str):
    def register(fn):
        WEIGHT_CRITERIA[name] = fn
        return fn
    return register


def pruning_kinds() -> list[str]:
    return [*FILTER_CRITERIA, *WEIGHT_CRITERIA]


def is_structured(kind: str) -> bool:
    return kind in FILTER_CRITERIA


def filter_ranking(kind: str) -> Callable:
    """The filter criterion 02 and the emergence stop rank by for `prune.kind`: its own when it is
    structured (so they rank what 03 cuts), L1 for a weight criterion (which ranks no filters)."""
    return FILTER_CRITERIA[kind] if is_structured(kind) else FILTER_CRITERIA["l1"]


@filter_criterion("l1")
def l1_filter_norm(state: dict, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each filter of the group's producer (conv1 in a BasicBlock; LoFT; Li et al.
    2016), float64 on the CPU. A group with two producers (an SE gate beside its expand conv)
    ranks a channel by the sum of its filters' L1 norms over both."""
    return sum(state[f"{name}.weight"].detach().cpu().double().abs().flatten(1).sum(1)
               for name, _ in group.producers)


@weight_criterion("magnitude")
def weight_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w| (LTH, RISE)."""
    return weight.detach().cpu().double().abs()


def structured_keep(channels: int, ratio: float) -> int:
    """Filters a block keeps at prune ratio p: ceil((1 - p) * C), at least 1."""
    return max(1, math.ceil(round((1.0 - ratio) * channels, 6)))


def unstructured_keep(n: int, ratio: float) -> int:
    """Weights a group keeps: round((1 - p) * n), half up."""
    return int(math.floor(round((1.0 - ratio) * n, 6) + 0.5))


def top_filters(scores: torch.Tensor, keep: int, segments: int = 1) -> torch.Tensor:
    """Indices of the `keep` largest scores of each of `segments` equal consecutive blocks (a
    group read per conv group by a grouped conv: ChannelGroup.segments; one block: the `keep`
    largest overall), ties to the lower index, returned sorted ascending."""
    blocks = scores.view(segments, -1)
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.sort((order + torch.arange(segments)[:, None] * blocks.shape[1]).reshape(-1)).values
