"""Filter distance between checkpoints (SPEC 4) and the early-bird mask distance (You et al. 2019).

Filter distance. For one prunable channel group (its producers' filters: conv1 of a BasicBlock)
and two checkpoints a and b, rank the filters by their score under `prune.kind`'s criterion (the
L1 norm of their weights by default), largest first, ties broken by filter index. For
the filter at 1-based position i of a's ranking let sigma(i) be its 1-based position in b's:

    F(a, b)   = sum_{i=1..n} (1/i) |ln i - ln sigma(i)|
    F_k(a, b) = sum_{i=1..k} (1/i) |ln i - ln min(sigma(i), k+1)|        (top-k)

In F_k a filter of a's top-k that is missing from b's top-k counts as sigma(i) = k+1; k is
the number of filters a structured prune at `prune.ratio` keeps (`kept_count`). Both are
normalised by their value for the fully reversed ranking sigma(i) = n+1-i, so 0 means
identical rankings and 1 "as far apart as reversed" (a few permutations score slightly
above 1: reversal is the reference, not the maximum). F is not symmetric: the 1/i weights
come from a's positions, so matrices here are indexed [a, b] = F(a, b) (row = reference).

Conventions of this module (docs/method.md repeats them):
- distance to the final epoch is F(final, e): the final ranking (the ticket a prune of the
  finished run takes) is the reference, and F asks where its top filters sat at epoch e
  (the paper's Fig. 4: "important filters not yet identified as top rank");
- the distance between consecutive checkpoints is F(e+1, e): the newer ranking is the
  reference, the one a prune at that moment would use;
- network summaries are the mean over prunable groups and the mean weighted by the parameter
  count of each group's first producer.

Early-bird mask distance: the channel mask keeps the top (1 - ratio) fraction of |gamma| of
all BatchNorm2d layers under one global threshold (ties by index); the distance between two
masks is the fraction of channels on which they differ (normalised Hamming distance).

The module holds the metric and its per-layer inputs; a run's series and its analysis are in
common/distance_series.py, the emergence rules and 01's watch in common/emergence.py, the
figures in common/distance_plots.py.

Everything is vectorised over filters (sorts, scatters and gathers); the only Python loops
run over epochs, layers and output rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import UserError
from common.importance import filter_ranking, structured_keep
from common.selection import BlockRef

NETWORK_MEAN, NETWORK_WEIGHTED = "network_mean", "network_weighted"


# ------------------------------------------------------------------ the metric
def kept_count(n: int, ratio: float) -> int:
    """Filters a structured prune at `ratio` keeps: 03's own count (common.importance)."""
    return structured_keep(n, ratio)


def rankings(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """norms [..., n] → (order, pos): order[..., i] = filter at 0-based rank i (largest first,
    ties by filter index: a stable sort of -norm); pos[..., f] = 1-based rank of filter f."""
    order = torch.sort(-norms, dim=-1, stable=True).indices
    ranks = torch.arange(1, norms.shape[-1] + 1, dtype=torch.long).expand_as(order)
    pos = torch.empty_like(order).scatter_(-1, order, ranks.contiguous())
    return order, pos


def _weighted_log_gap(sigma: torch.Tensor) -> torch.Tensor:
    """sum_i (1/i)|ln i - ln sigma_i| over the last dim (sigma: positions, 1-based, i = 1..len)."""
    i = torch.arange(1, sigma.shape[-1] + 1, dtype=torch.float64)
    return ((i.log() - sigma.double().log()).abs() / i).sum(-1)


def reversed_value(n: int, k: int | None = None) -> float:
    """F (k None) or F_k of the fully reversed ranking sigma(i) = n+1-i: the normaliser."""
    sigma = torch.arange(n, 0, -1)
    if k is not None:
        sigma = sigma[:k].clamp(max=k + 1)
    return float(_weighted_log_gap(sigma))


def pairwise_distances(norms: torch.Tensor, k: int, chunk: int = 32) -> dict[str, torch.Tensor]:
    """norms [E, n] (one layer, E checkpoints) → {"distance", "distance_norm", "distance_topk"},
    each [E, E] float64 with [a, b] = F(a, b); distance_topk is the normalised F_k (its raw
    value is "distance_topk_raw", kept out of the CSV: it is distance_topk * reversed_value(n, k))."""
    E, n = norms.shape
    if not 1 <= k <= n:
        raise ValueError(f"top-k: k={k} outside 1..{n}")
    order, pos = rankings(norms)
    full, topk = torch.empty(E, E, dtype=torch.float64), torch.empty(E, E, dtype=torch.float64)
    for rows in torch.arange(E).split(chunk):                  # bounds memory at chunk * E * n
        sigma = pos[:, order[rows]].transpose(0, 1)            # [a, b, i] = pos_b(order_a[i])
        full[rows] = _weighted_log_gap(sigma)
        topk[rows] = _weighted_log_gap(sigma[..., :k].clamp(max=k + 1))
    ref, ref_k = reversed_value(n), reversed_value(n, k)
    return {"distance": full,
            "distance_norm": full / ref if ref > 0 else torch.zeros_like(full),    # n = 1: one ranking only
            "distance_topk": topk / ref_k if ref_k > 0 else torch.zeros_like(topk),
            "distance_topk_raw": topk}


def filter_distance(norms_a: torch.Tensor, norms_b: torch.Tensor, k: int | None = None,
                    normalise: bool = False) -> float:
    """F(a, b) of one layer from its filter norms at a and b; top-k if k is given."""
    d = pairwise_distances(torch.stack([norms_a, norms_b]).double(), k or norms_a.numel())
    if k is None:
        return float(d["distance_norm" if normalise else "distance"][0, 1])
    return float(d["distance_topk" if normalise else "distance_topk_raw"][0, 1])


# ------------------------------------------------------------- per-layer inputs
def layer_name(block: BlockRef) -> str:
    return block.producer


def filter_norms(state: dict, blocks: list[BlockRef], kind: str = "l1") -> dict[str, torch.Tensor]:
    """Per prunable group, named by its first producer ("layerS.J.conv1"): each channel's score by
    the criterion `prune.kind` names (common.importance.filter_ranking; L1 by default), so 02 and
    the emergence stop rank the filters 03 cuts."""
    out, score = {}, filter_ranking(kind)
    for b in blocks:
        missing = [p for p, _ in b.group.producers if f"{p}.weight" not in state]
        if missing:
            raise UserError(f"checkpoint has no {missing[0]}.weight: not a model of this architecture")
        out[layer_name(b)] = score(state, b.group)
    return out


def network_distance(norms_a: dict, norms_b: dict, ratio: float) -> float:
    """Network mean over layers of the normalised top-k F(a, b): one number per epoch pair,
    e.g. for 01 to feed `emergence_epoch` with F(e+1, e) from the norms of two epochs."""
    vals = [float(pairwise_distances(torch.stack([norms_a[l], norms_b[l]]),
                                     kept_count(norms_a[l].numel(), ratio))["distance_topk"][0, 1])
            for l in norms_a]
    return sum(vals) / len(vals)


def bn_gamma_keys(model: nn.Module) -> list[str]:
    """State keys of the scale (gamma) of every BatchNorm2d, in module order."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]


def channel_masks(gammas: torch.Tensor, ratio: float) -> torch.Tensor:
    """gammas [E, N] (all BN scales of E checkpoints) → bool masks [E, N] keeping the top
    kept_count(N, ratio) of |gamma| under one global threshold, ties by channel index."""
    order = torch.sort(-gammas.abs(), dim=-1, stable=True).indices
    keep = torch.zeros_like(gammas, dtype=torch.bool)
    return keep.scatter_(-1, order[:, :kept_count(gammas.shape[-1], ratio)], True)


def mask_distances(masks: torch.Tensor) -> torch.Tensor:
    """masks [E, N] bool → [E, E] fraction of channels that differ (symmetric)."""
    m = masks.double()
    ones = m.sum(1)
    return (ones[:, None] + ones[None, :] - 2 * m @ m.T) / masks.shape[1]
