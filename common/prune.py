"""Pruning (SPEC section 5): structured L1 filter pruning and unstructured magnitude masks.

Structured (LoFT; Li et al. 2016). For every prunable channel group (`common.selection.prunable_blocks`:
with the `paper` preset, blocks [1:] of every stage) keep the ceil((1-p)·C) producer (conv1)
filters of largest L1 norm (at least one; ties go to the lower index; where a grouped conv produces
or reads the group, ceil((1-p)·C/g) in each of its g conv groups), with the group's member
(mid-BN) channels and its consumers' (conv2's) input channels. Kept indices are sorted ascending,
so channel order is preserved. The result is the model narrowed by `common.narrowing.narrow` (a
physically smaller model, rebuilt later by `build_model` from `arch["mids"]`), whose forward
equals the full model's with the pruned channels masked (conv2's input columns zeroed).
Pruning an already narrowed model prunes its current widths further; `kept` indices are
then composed with the source's, so they always index the pretrained (full-width) model.

Unstructured (LTH / "Rise of the Lottery Heroes"). Remove the fraction p of the weights of
every nn.Conv2d / nn.Linear (their .weight only: no bias, no BN) by |w|, ranked over all
layers at once (scope "global": exactly round(R·N) weights survive, R = 1 - p) or per layer
(scope "layer": round(R·n_l) in each). Ties go to the lower flat index of the concatenation
of the layers in state-dict order. If the source already carries a mask (iterative pruning
of a fine-tuned masked ticket), only its surviving weights are ranked and the fraction p of
*the survivors* is removed, so I rounds keep (1-p)^I of the weights and every new mask is a
subset of the previous one. Pruned weights are stored as zeros; FLOPs do not shrink
physically, so a sparse estimate (each layer's FLOPs times its kept fraction) is reported.

Scores and keep counts come from common/importance.py (a new criterion: one function there).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common.costs import flops_per_sample, layer_flops
from common.errors import UserError
from common.importance import (FILTER_CRITERIA, WEIGHT_CRITERIA, is_structured, structured_keep, top_filters,
                               unstructured_keep)
from common.models import count_params, narrowed_arch
from common.narrowing import SlicePlan, narrow, select_channels
from common.selection import BlockRef, prunable_blocks


def slice_blocks(state: dict, blocks: list[BlockRef], kept: dict[str, torch.Tensor]) -> dict:
    """A copy of `state` with every block's mid-channel entries reduced to `kept[block]`."""
    return select_channels(state, SlicePlan.of(blocks, state), kept)


@dataclass
class Pruned:
    """What either kind of pruning returns: the new model and what the ticket records."""
    model: nn.Module
    arch: dict
    rows: list[dict]                                  # the printed per-block / per-layer table
    kept: dict[str, torch.Tensor] = field(default_factory=dict)   # l1: block → channel indices
    mask: dict[str, torch.Tensor] = field(default_factory=dict)   # magnitude: param → bool
    threshold: float = float("nan")                   # magnitude (global): smallest kept |w|


@torch.no_grad()
def prune_filters(model: nn.Module, arch: dict, ratio: float,
                  source_kept: dict[str, torch.Tensor] | None = None, kind: str = "l1") -> Pruned:
    """Structured pruning of every prunable block at ratio p by the filter criterion `kind`
    (L1 norm unless another is registered); returns a narrower model.

    `kept` indexes the pretrained (full-width) model's channels: the source's own channels,
    composed through `source_kept` when the source was itself pruned. `rows` give each
    block's width before/after and its L1 threshold (the norm of its weakest kept filter)."""
    state = model.state_dict()
    blocks = prunable_blocks(model, arch)
    rel, rows = {}, []
    for b in blocks:
        norms = FILTER_CRITERIA[kind](state, b.group)
        segments = b.group.segments   # a grouped conv's conv groups keep as many filters each
        rel[b.name] = top_filters(norms, structured_keep(b.mid // segments, ratio), segments)
        rows.append({"block": b.name, "before": b.mid, "after": len(rel[b.name]),
                     "l1_threshold": float(norms[rel[b.name]].min())})
    new_arch = narrowed_arch(arch, {name: len(idx) for name, idx in rel.items()})
    pruned = narrow(model, [b.group for b in blocks], {b.group.name: rel[b.name] for b in blocks})
    source_kept = source_kept or {}
    kept = {name: (source_kept[name][idx] if name in source_kept else idx).clone() for name, idx in rel.items()}
    return Pruned(pruned.eval(), new_arch, rows, kept=kept)


# ------------------------------------------------------------------ unstructured
def maskable_weights(model: nn.Module) -> list[str]:
    """State-dict names of the .weight of every nn.Conv2d / nn.Linear, in state-dict order."""
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return [k for k in model.state_dict() if k in names]


def magnitude_mask(weights: dict[str, torch.Tensor], ratio: float, scope: str = "global",
                   old_mask: dict[str, torch.Tensor] | None = None, kind: str = "magnitude") -> dict[str, torch.Tensor]:
    """param name → bool mask keeping round((1-p)·n) of the surviving weights by their score
    (the weight criterion `kind`: |w| unless another is registered).

    scope "global" ranks all layers together, "layer" each layer alone. Ties go to the lower
    flat index in the concatenation of `weights` (in its order). With `old_mask`, only the
    weights it keeps are ranked and the fraction p of them is removed: the new mask is a
    subset of the old one."""
    if scope not in ("global", "layer"):
        raise ValueError(f"scope {scope!r}")
    names = list(weights)
    groups = [names] if scope == "global" else [[k] for k in names]
    mask = {}
    for group in groups:
        scores = torch.cat([WEIGHT_CRITERIA[kind](weights[k]).reshape(-1) for k in group])
        alive = torch.cat([(old_mask[k] if old_mask else torch.ones_like(weights[k], dtype=torch.bool)).reshape(-1)
                           for k in group])
        alive_idx = alive.nonzero().squeeze(1)                       # ascending flat indices
        keep = unstructured_keep(len(alive_idx), ratio)
        order = torch.sort(scores[alive_idx], descending=True, stable=True).indices[:keep]
        flat = torch.zeros_like(alive)
        flat[alive_idx[order]] = True
        for k, part in zip(group, flat.split([weights[k].numel() for k in group])):
            mask[k] = part.reshape(weights[k].shape).clone()
    return mask


@torch.no_grad()
def prune_magnitude(model: nn.Module, arch: dict, ratio: float, scope: str,
                    old_mask: dict[str, torch.Tensor] | None = None, kind: str = "magnitude") -> Pruned:
    """Unstructured magnitude pruning; the returned model holds zeros at the pruned weights."""
    state = model.state_dict()
    names = maskable_weights(model)
    mask = magnitude_mask({k: state[k] for k in names}, ratio, scope, old_mask, kind)
    pruned = copy.deepcopy(model)
    pruned.load_state_dict({k: (v * mask[k] if k in mask else v).clone() for k, v in state.items()})
    rows = [{"layer": k, "size": state[k].numel(),
             "before": int(old_mask[k].sum()) if old_mask else state[k].numel(),
             "after": int(mask[k].sum())} for k in names]
    survivors = torch.cat([state[k].abs().double()[mask[k]] for k in names])
    threshold = float(survivors.min()) if scope == "global" and survivors.numel() else float("nan")
    return Pruned(pruned.eval(), dict(arch), rows, mask=mask, threshold=threshold)


# ------------------------------------------------------------------------ costs
def sparse_flops(model: nn.Module, mask: dict[str, torch.Tensor], input_shape=(3, 32, 32)) -> int:
    """Dense forward FLOPs with each masked layer's FLOPs scaled by its kept fraction."""
    dense = flops_per_sample(model, input_shape)
    per = layer_flops(model, input_shape)
    saved = sum(per.get(k.rsplit(".", 1)[0], 0) * (1.0 - float(m.float().mean())) for k, m in mask.items())
    return int(round(dense - saved))


def nonzero_params(model: nn.Module, mask: dict[str, torch.Tensor] | None) -> int:
    """Parameter count minus the weights a mask removes."""
    removed = sum(int((~m).sum()) for m in (mask or {}).values())
    return count_params(model) - removed


# ------------------------------------------------------------------------ report
def format_table(pruned: Pruned, kind: str) -> str:
    """The per-block (l1) or per-layer (magnitude) table printed by 03_prune.py."""
    if is_structured(kind):
        lines = [f"{'block':<12} {'mid width':^17} {'L1 threshold':>13}"]
        lines += [f"{r['block']:<12} {r['before']:>7} → {r['after']:<7} {r['l1_threshold']:>13.4f}" for r in pruned.rows]
    else:
        lines = [f"{'layer':<28} {'size':>9} {'kept before':>12} {'kept after':>11} {'kept %':>7}"]
        lines += [f"{r['layer']:<28} {r['size']:>9} {r['before']:>12} {r['after']:>11} "
                  f"{100 * r['after'] / r['size']:>6.2f}%" for r in pruned.rows]
        if not math.isnan(pruned.threshold):
            lines.append(f"global |w| threshold (smallest kept): {pruned.threshold:.6g}")
    return "\n".join(lines)


def format_totals(before: dict, after: dict) -> str:
    """'params 11.17M → 6.2M (-44.5 %)' lines for every count present in both dicts."""
    lines = []
    for key in before:
        if key in after:
            b, a = before[key], after[key]
            lines.append(f"{key:<13} {b:>14,} → {a:>14,}  ({100 * (b - a) / max(b, 1):5.1f} % fewer)")
    return "\n".join(lines)


def default_tag(kind: str, ratio: float) -> str:
    if kind in ("l1", "magnitude"):  # the papers' names: l1_p50 (pruned 50 %), mag_r20 (kept 20 %)
        return f"l1_p{round(100 * ratio)}" if kind == "l1" else f"mag_r{round(100 * (1 - ratio))}"
    return f"{kind}_p{round(100 * ratio)}"


def check_tag(tag: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tag):
        raise UserError(f"--tag {tag!r}: use letters, digits, '_', '.', '-' only (it names a folder)")
    return tag
