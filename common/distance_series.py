"""A pretraining run's filter-norm series (its epoch checkpoints) and its analysis: pairwise
filter distances per layer and network summaries, distance to the final epoch, early-bird mask
distances, and the rows 02 writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import PretrainEpoch, load
from common.distance import (NETWORK_MEAN, NETWORK_WEIGHTED, bn_gamma_keys, channel_masks, filter_norms, kept_count,
                             layer_name, mask_distances, pairwise_distances)
from common.errors import UserError
from common.lineage import epoch_files
from common.models import build_model, check_weights
from common.selection import prunable_blocks


@dataclass
class Series:
    """What 02 needs from a pretraining run, epoch by epoch (the weights are not kept)."""
    epochs: list[int]
    arch: dict
    method: str
    norms: dict[str, torch.Tensor]   # layer → [E, n] filter scores (L1 norms unless prune.kind says otherwise)
    params: dict[str, int]           # layer → its producer's parameter count (the weighted mean's weights)
    gammas: torch.Tensor             # [E, N] all BN scales


def load_series(pretrain_dir: Path, made_by: str, kind: str = "l1", importable: frozenset[str] = frozenset(),
                files: list[Path] | None = None, plain_arch: dict | None = None) -> Series:
    """Read every epoch_*.pt of a pretraining run (or the given `files`, in order: checkpoints, or
    plain state_dicts of `plain_arch` trained elsewhere, numbered by their place in the list);
    `made_by` is the command that writes them. Filters are scored by the criterion `kind`
    (prune.kind) names: the one 03 prunes by."""
    where = pretrain_dir if files is None else "--from"
    files = files or [f for _, f in sorted(epoch_files(Path(pretrain_dir)).items())]
    if not files:
        raise UserError(f"{pretrain_dir}: no pretraining checkpoints epoch_*.pt (run: {made_by})")
    if len(files) < 2:
        raise UserError(f"{where}: only {files[0].name}; a filter distance needs at least 2 "
                        f"epoch checkpoints (run more epochs: {made_by})")
    epochs, norms, gammas, arch, method = [], {}, [], None, ""
    for f in files:
        ck = load(f, PretrainEpoch, made_by=made_by, plain_arch=plain_arch)
        if arch is None:
            arch, method = ck.arch, ck.method
            model = build_model(arch, importable)
            blocks, bn_keys = prunable_blocks(model, arch), bn_gamma_keys(model)
            if not blocks:
                raise UserError(f"{f}: {arch['name']} has no prunable blocks")
        elif ck.arch != arch:
            raise UserError(f"{f}: architecture {ck.arch} differs from the run's {arch}")
        check_weights(model, ck.model, f)
        epochs.append(ck.epoch if plain_arch is None else len(epochs))
        for layer, v in filter_norms(ck.model, blocks, kind).items():
            norms.setdefault(layer, []).append(v)
        missing = [k for k in bn_keys if k not in ck.model]
        if missing:
            raise UserError(f"{f}: no {missing[0]}: not a model of architecture {arch['name']}")
        gammas.append(torch.cat([ck.model[k].detach().cpu().double().flatten() for k in bn_keys])
                      if bn_keys else torch.zeros(0, dtype=torch.float64))   # no BatchNorm (a ViT): no early bird
    if len(set(epochs)) != len(epochs):
        raise UserError(f"{pretrain_dir}: two checkpoints claim the same epoch")
    params = {layer_name(b): model.get_submodule(b.producer).weight.numel() for b in blocks}
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
    if not series.gammas.shape[1]:   # Early-Bird masks are BatchNorm scales: undefined without BN (NaN, never reached)
        return Analysis(per_layer, k, torch.full((len(series.epochs),) * 2, float("nan"), dtype=torch.float64))
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
