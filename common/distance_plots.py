"""The figures of 02: filter-distance heatmaps, distance to the final epoch, early-bird mask
distances, and the comparison of several runs. Written atomically like every output."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from common.checkpoint import save_figure_atomic
from common.distance import NETWORK_MEAN, NETWORK_WEIGHTED
from common.distance_series import Analysis, to_final


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    try:
        save_figure_atomic(fig, path)
    finally:
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
    """Left: normalised top-k F(final, e) per layer and network mean. Right: early-bird mask distance to
    the final epoch (no eps line: the early-bird rule compares each epoch with the 4 before it, early_bird.png)."""
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
