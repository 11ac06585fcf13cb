"""Filter distance between checkpoints (SPEC 4) and the early-bird mask distance (You et al. 2019).

Filter distance. For one layer (conv1 of a prunable block) and two checkpoints a and b, rank
the filters by the L1 norm of their weights, largest first, ties broken by filter index. For
the filter at 1-based position i of a's ranking let sigma(i) be its 1-based position in b's:

    F(a, b)   = sum_{i=1..n} (1/i) |ln i - ln sigma(i)|
    F_k(a, b) = sum_{i=1..k} (1/i) |ln i - ln min(sigma(i), k+1)|        (top-k)

In F_k a filter of a's top-k that is missing from b's top-k counts as sigma(i) = k+1; k is
the number of filters a structured prune at `prune.ratio` keeps (`kept_count`). Both are
normalised by their value for the fully reversed ranking sigma(i) = n+1-i, so 0 means
identical rankings and 1 "as far apart as reversed" (a few permutations score slightly
above 1: reversal is the reference, not the maximum). F is not symmetric: the 1/i weights
come from a's positions, so matrices here are indexed [a, b] = F(a, b) (row = reference).

Conventions of this module (the README repeats them):
- distance to the final epoch is F(final, e): the final ranking (the ticket a prune of the
  finished run takes) is the reference, and F asks where its top filters sat at epoch e
  (the paper's Fig. 4: "important filters not yet identified as top rank");
- the distance between consecutive checkpoints is F(e+1, e): the newer ranking is the
  reference, the one a prune at that moment would use;
- network summaries are the mean over prunable layers and the mean weighted by each conv1's
  parameter count.

Early-bird mask distance: the channel mask keeps the top (1 - ratio) fraction of |gamma| of
all BatchNorm2d layers under one global threshold (ties by index); the distance between two
masks is the fraction of channels on which they differ (normalised Hamming distance).

Everything is vectorised over filters (sorts, scatters and gathers); the only Python loops
run over epochs, layers and output rows.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoint import load_checkpoint
from common.errors import UserError
from common.importance import l1_filter_norm, structured_keep
from common.models import BlockRef, build_model, prunable_blocks

EB_EPS = 0.1      # You et al. 2019: the early bird has emerged when all recent mask distances are <= 0.1
EB_HISTORY = 4    # ... to each of the previous 4 epochs (their FIFO queue of 5 masks)
NETWORK_MEAN, NETWORK_WEIGHTED = "network_mean", "network_weighted"
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


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
    return f"{block.name}.conv1"


def filter_norms(state: dict, blocks: list[BlockRef]) -> dict[str, torch.Tensor]:
    """Per prunable layer ("layerS.J.conv1"): the L1 norm of each conv1 filter — 03's criterion
    (common.importance), so 02 and the emergence stop rank the filters 03 cuts."""
    out = {}
    for b in blocks:
        if f"{b.name}.conv1.weight" not in state:
            raise UserError(f"checkpoint has no {b.name}.conv1.weight: not a model of this architecture")
        out[layer_name(b)] = l1_filter_norm(state, b)
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


# ------------------------------------------------------------------ emergence
def emergence_epoch(consecutive: list[float], eps: float, window: int) -> int | None:
    """Filter-distance emergence. consecutive[i] = distance between checkpoint i and i+1
    (here: network-mean normalised top-k F(i+1, i)). Returns the smallest e such that

        consecutive[e + j] < eps   for j = 0 .. window-1,

    i.e. the rankings of e, e+1, ..., e+window move by less than eps per step: the ticket
    of epoch e is already the settled one. It is known once checkpoint e + window exists,
    so a run that stops on emergence stops after epoch e + window. None if no such e."""
    if window < 1:
        raise ValueError("window must be >= 1")
    below = [d < eps for d in consecutive]
    for e in range(len(below) - window + 1):
        if all(below[e:e + window]):
            return e
    return None


def early_bird_epoch(mask_dist: torch.Tensor, eps: float = EB_EPS, history: int = EB_HISTORY) -> int | None:
    """You et al. 2019: the first checkpoint index e >= history whose mask distance to each of
    the previous `history` checkpoints is <= eps (their queue of 5 masks, max distance <= 0.1)."""
    for e in range(history, mask_dist.shape[0]):
        if float(mask_dist[e, e - history:e].max()) <= eps:
            return e
    return None


# ------------------------------------------------------------- a run's series
@dataclass
class Series:
    """What 02 needs from a pretraining run, epoch by epoch (the weights are not kept)."""
    epochs: list[int]
    arch: dict
    method: str
    norms: dict[str, torch.Tensor]   # layer → [E, n] filter L1 norms
    params: dict[str, int]           # layer → conv1 parameter count (the weighted mean's weights)
    gammas: torch.Tensor             # [E, N] all BN scales


def load_series(pretrain_dir: Path, made_by: str) -> Series:
    """Read every epoch_*.pt of a pretraining run; `made_by` is the command that writes them."""
    files = sorted((p for p in Path(pretrain_dir).glob("epoch_*.pt") if _EPOCH_FILE.search(p.name)),
                   key=lambda p: int(_EPOCH_FILE.search(p.name).group(1)))
    if not Path(pretrain_dir).is_dir() or not files:
        raise UserError(f"{pretrain_dir}: no pretraining checkpoints epoch_*.pt (run: {made_by})")
    if len(files) < 2:
        raise UserError(f"{pretrain_dir}: only {files[0].name}; a filter distance needs at least 2 "
                        f"epoch checkpoints (run more epochs: {made_by})")
    epochs, norms, gammas, arch, method = [], {}, [], None, ""
    for f in files:
        ck = load_checkpoint(f, required=("model", "arch", "epoch"), made_by=made_by)
        if arch is None:
            arch, method = ck["arch"], str(ck.get("method", "unknown"))
            model = build_model(arch)
            blocks, bn_keys = prunable_blocks(model), bn_gamma_keys(model)
            if not blocks:
                raise UserError(f"{f}: {arch['name']} has no prunable blocks")
        elif ck["arch"] != arch:
            raise UserError(f"{f}: architecture {ck['arch']} differs from the run's {arch}")
        epochs.append(int(ck["epoch"]))
        for layer, v in filter_norms(ck["model"], blocks).items():
            norms.setdefault(layer, []).append(v)
        missing = [k for k in bn_keys if k not in ck["model"]]
        if missing:
            raise UserError(f"{f}: no {missing[0]}: not a model of architecture {arch['name']}")
        gammas.append(torch.cat([ck["model"][k].detach().cpu().double().flatten() for k in bn_keys]))
    if len(set(epochs)) != len(epochs):
        raise UserError(f"{pretrain_dir}: two checkpoints claim the same epoch")
    params = {layer_name(b): model.get_submodule(b.name).conv1.weight.numel() for b in blocks}
    return Series(epochs, arch, method, {l: torch.stack(v) for l, v in norms.items()}, params, torch.stack(gammas))


@dataclass
class Analysis:
    filters: dict[str, dict[str, torch.Tensor]]  # layer (and the two network rows) → column → [E, E]
    k: dict[str, int]                            # layer → top-k size
    mask_dist: torch.Tensor                      # [E, E] early-bird mask distance


def analyse(series: Series, ratio: float) -> Analysis:
    """All pairwise filter distances per layer, their network summaries, and the mask distances."""
    per_layer = {l: pairwise_distances(n, kept_count(n.shape[1], ratio)) for l, n in series.norms.items()}
    k = {l: kept_count(n.shape[1], ratio) for l, n in series.norms.items()}
    total = sum(series.params.values())
    cols = next(iter(per_layer.values())).keys()
    per_layer[NETWORK_MEAN] = {c: torch.stack([d[c] for d in list(per_layer.values())]).mean(0) for c in cols}
    per_layer[NETWORK_WEIGHTED] = {c: sum(per_layer[l][c] * (series.params[l] / total) for l in series.params)
                                   for c in cols}
    return Analysis(per_layer, k, mask_distances(channel_masks(series.gammas, ratio)))


def consecutive_distances(analysis: Analysis) -> list[float]:
    """Network-mean normalised top-k F(e+1, e) for consecutive checkpoints."""
    d = analysis.filters[NETWORK_MEAN]["distance_topk"]
    return [float(d[i + 1, i]) for i in range(d.shape[0] - 1)]


def to_final(analysis: Analysis, layer: str = NETWORK_MEAN, column: str = "distance_topk") -> list[float]:
    """F(final, e) for every checkpoint e (the final ranking is the reference)."""
    return analysis.filters[layer][column][-1].tolist()


def distance_rows(epochs: list[int], analysis: Analysis) -> list[dict]:
    """filter_distance.csv: one row per (layer, epoch_a, epoch_b), every ordered pair."""
    rows = []
    for layer, d in analysis.filters.items():
        table = torch.stack([d["distance"], d["distance_norm"], d["distance_topk"]], -1).tolist()
        for i, a in enumerate(epochs):
            for j, b in enumerate(epochs):
                full, norm, topk = table[i][j]
                rows.append({"layer": layer, "epoch_a": a, "epoch_b": b, "distance": round(full, 6),
                             "distance_norm": round(norm, 6), "distance_topk": round(topk, 6)})
    return rows


def mask_rows(epochs: list[int], mask_dist: torch.Tensor) -> list[dict]:
    table = mask_dist.tolist()
    return [{"epoch_a": a, "epoch_b": b, "mask_distance": round(table[i][j], 6)}
            for i, a in enumerate(epochs) for j, b in enumerate(epochs)]


# ------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    """Atomic PNG write (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)


def _epoch_ticks(ax, epochs: list[int]):
    step = max(1, math.ceil(len(epochs) / 15))
    idx = list(range(0, len(epochs), step))
    ax.set_xticks(idx, [str(epochs[i]) for i in idx])
    ax.set_yticks(idx, [str(epochs[i]) for i in idx])


def plot_heatmap(epochs: list[int], d: dict[str, torch.Tensor], layer: str, k: int | None, path: Path):
    """Two panels (all filters, top-k), epochs x epochs, cell [row a, col b] = F(a, b)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    fig.subplots_adjust(wspace=0.4)
    panels = [("distance_norm", "normalised F, all filters"),
              ("distance_topk", f"normalised top-k F (k={k})" if k else "normalised top-k F")]
    for ax, (col, name) in zip(axes, panels):
        im = ax.imshow(d[col].numpy(), cmap="viridis", vmin=0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=name)
        _epoch_ticks(ax, epochs)
        ax.set_xlabel("epoch b (compared)")
        ax.set_ylabel("epoch a (reference)")
        ax.set_title(name)
    fig.suptitle(f"{layer}: filter distance, cell [row a, col b] = F(a, b), 1/i weights from row a's ranking\n"
                 "(F is not symmetric: read rows as the reference epoch); darker = closer", y=1.04)
    _save(fig, path)


def plot_distance_to_final(epochs: list[int], analysis: Analysis, marks: dict[str, int | None], path: Path):
    """Left: normalised top-k F(final, e) per layer and network mean. Right: early-bird mask distance."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for layer in analysis.filters:
        if layer in (NETWORK_MEAN, NETWORK_WEIGHTED):
            continue
        left.plot(epochs, to_final(analysis, layer), lw=1, alpha=0.8, marker=".", label=f"{layer} (k={analysis.k[layer]})")
    left.plot(epochs, to_final(analysis), color="black", lw=2.5, label="network mean")
    left.set_title("filter distance to the final epoch, F(final, e)")
    left.set_ylabel("normalised top-k filter distance")
    right.plot(epochs, analysis.mask_dist[-1].tolist(), color="tab:red", lw=2, marker=".", label="early-bird mask distance")
    right.axhline(EB_EPS, color="tab:red", ls=":", lw=1, label=f"early-bird eps = {EB_EPS}")
    right.set_title("early-bird BN mask distance to the final epoch")
    right.set_ylabel("fraction of BN channels whose mask differs")
    for (name, e), color in zip(marks.items(), ("black", "tab:red")):
        if e is not None:
            for ax in (left, right):
                ax.axvline(e, color=color, ls="--", lw=1, label=f"{name}: epoch {e}")
    for ax in (left, right):
        ax.set_xlabel("epoch e")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_mask_heatmap(epochs: list[int], mask_dist: torch.Tensor, ratio: float, path: Path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(mask_dist.numpy(), cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mask distance (symmetric)")
    _epoch_ticks(ax, epochs)
    ax.set_xlabel("epoch b")
    ax.set_ylabel("epoch a")
    ax.set_title(f"early-bird BN channel-mask distance, prune ratio {ratio}")
    _save(fig, path)


def plot_compare(curves: dict[str, tuple[list[int], list[float]]], path: Path):
    """Network-mean normalised top-k F(final, e) of several runs on one axis (the paper's Fig. 4)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, (epochs, values) in curves.items():
        ax.plot(epochs, values, lw=2, marker=".", label=label)
    ax.set_xlabel("epoch e")
    ax.set_ylabel("network-mean normalised top-k F(final, e)")
    ax.set_title("filter distance to each run's final epoch")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer)


class EmergenceWatch:
    """`pretrain.stop_on_emergence` for 01: feeds F(e, e-1) of each new epoch to
    `emergence_epoch`, keeping only the previous epoch's filter norms (no checkpoint reads).
    `consecutive` goes into last.pt so a resumed run continues the same series."""

    def __init__(self, blocks: list[BlockRef], ratio: float, eps: float, window: int,
                 consecutive: list[float] | None = None):
        self.blocks, self.ratio, self.eps, self.window = blocks, ratio, eps, window
        self.consecutive = list(consecutive or [])
        self.prev = None

    def start(self, state: dict):
        self.prev = filter_norms(state, self.blocks)

    def update(self, state: dict) -> int | None:
        """Add the newest epoch's weights; the emergence epoch once the rule fires, else None."""
        now = filter_norms(state, self.blocks)
        self.consecutive.append(network_distance(now, self.prev, self.ratio))
        self.prev = now
        return emergence_epoch(self.consecutive, self.eps, self.window)
