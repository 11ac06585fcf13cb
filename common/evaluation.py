"""Test accuracy, overall and on the lossless part of the test set (`data.lossless_test`).

The CIFAR-10 in ../shared/data has lossless test images at original indices 0-999 and
JPEG-recovered ones after (its PROVENANCE.txt). `data.lossless_test: N` reports, beside
`test_acc`, `test_acc_lossless`: the accuracy on the evaluated images whose *original* index
is < N. With `data.test_subset` (a class-balanced pick, `common.data.balanced_subset`), that is
the part of the subset with original index < N, not its first N images.
"""
from __future__ import annotations

import dataclasses

import torch

from common.data import balanced_subset, load_dataset, on_device, prepare_data
from common.errors import UserError
from common.train import correct_per_sample


def load_splits(cfg, env):
    """(train set, test set, positions of the lossless test images) of a stage, the sets moved to
    the rank's device (common.data.on_device). One rank per node prepares the data first."""
    prepare_data(cfg.data, env)
    train_set, test_set = load_dataset(cfg.data, train=True), load_dataset(cfg.data, train=False)
    lossless = lossless_positions(cfg.data, test_set)
    return on_device(train_set, env), on_device(test_set, env), lossless


def lossless_positions(cfg_data, test_set) -> torch.Tensor | None:
    """Positions in `test_set` (as `load_dataset` returned it) of the images of original index
    < data.lossless_test; None when it is 0."""
    n = cfg_data.lossless_test
    if not n:
        return None
    if cfg_data.test_subset:
        full = load_dataset(dataclasses.replace(cfg_data, test_subset=0), train=False)
        original = balanced_subset(full.labels, cfg_data.test_subset)
        size = len(full)
    else:
        original, size = torch.arange(len(test_set)), len(test_set)
    if n > size:
        raise UserError(f"config key data.lossless_test: {n} exceeds the {size} test images")
    positions = torch.nonzero(original < n).flatten()
    if len(positions) == 0:
        raise UserError(f"config key data.lossless_test: none of the data.test_subset={cfg_data.test_subset} "
                        f"test images has an original index < {n}")
    return positions


def accuracies(model, test_set, batch_size: int, device, lossless: torch.Tensor | None) -> dict:
    """{"test_acc": %, and with `lossless` positions "test_acc_lossless": % on them}."""
    correct, _ = correct_per_sample(model, test_set, batch_size, device)
    out = {"test_acc": 100.0 * int(correct.sum()) / max(1, len(correct))}
    if lossless is not None:
        out["test_acc_lossless"] = 100.0 * int(correct[lossless].sum()) / len(lossless)
    return out
