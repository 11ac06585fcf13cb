"""When the ticket has emerged: the filter-distance rule (SPEC 4), the early-bird rule (You et al.
2019), and `EmergenceWatch`, which applies the first one while 01 trains."""
from __future__ import annotations

import torch

from common.distance import filter_norms, network_distance
from common.selection import BlockRef

EB_EPS = 0.1      # You et al. 2019: the early bird has emerged when all recent mask distances are <= 0.1
EB_HISTORY = 4    # ... to each of the previous 4 epochs (their FIFO queue of 5 masks)


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


def early_bird_epoch(mask_dist: torch.Tensor, epochs: list[int], eps: float = EB_EPS,
                     history: int = EB_HISTORY) -> int | None:
    """You et al. 2019: the index of the first checkpoint whose mask distance to each of the previous
    `history` checkpoints is <= eps (their queue of 5 masks, max distance <= 0.1). `epochs[i]` is
    checkpoint i's epoch: only trained epochs (>= 1) enter the queue, as theirs starts with the mask
    after epoch 1; the init (epoch 0) is no early bird and no queue entry."""
    trained = [i for i, e in enumerate(epochs) if e >= 1]
    for j in range(history, len(trained)):
        if float(mask_dist[trained[j], trained[j - history:j]].max()) <= eps:
            return trained[j]
    return None


class EmergenceWatch:
    """`pretrain.stop_on_emergence` for 01: feeds F(e, e-1) of each new epoch to
    `emergence_epoch`, keeping only the previous epoch's filter norms (no checkpoint reads).
    `consecutive` goes into last.pt so a resumed run continues the same series."""

    def __init__(self, blocks: list[BlockRef], ratio: float, eps: float, window: int,
                 consecutive: list[float] | None = None, kind: str = "l1"):
        self.blocks, self.ratio, self.eps, self.window, self.kind = blocks, ratio, eps, window, kind
        self.consecutive = list(consecutive or [])
        self.prev = None

    def start(self, state: dict):
        self.prev = filter_norms(state, self.blocks, self.kind)

    def update(self, state: dict) -> int | None:
        """Add the newest epoch's weights; the emergence epoch once the rule fires, else None."""
        now = filter_norms(state, self.blocks, self.kind)
        self.consecutive.append(network_distance(now, self.prev, self.ratio))
        self.prev = now
        return emergence_epoch(self.consecutive, self.eps, self.window)
