"""Progress within an epoch, suited to where the output goes.

On a terminal: a tqdm bar of the epoch's steps, redrawn in place, with the recent mean loss and
the rate (steps/s). Anywhere else (a log file, a pipe, a batch scheduler's capture): nothing,
because tqdm redraws with carriage returns that turn a log into one endless line; the stage
prints one line per epoch instead.

The training loops (common.pretrain) make one `EpochBar` per epoch; `update` takes the loss as a
device scalar and reads it (a host sync) only when the bar is redrawn, at most every
`REDRAW_S` seconds.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

REDRAW_S = 0.5  # seconds between loss read-outs (and tqdm redraws)


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


class EpochBar:
    """`total` steps of one epoch: a bar on a terminal where `enabled` (rank 0), else nothing."""

    def __init__(self, desc: str, total: int, enabled: bool = True, stream=None):
        stream = stream or sys.stderr
        self.bar = (tqdm(total=total, desc=desc, unit="step", leave=False, file=stream, mininterval=REDRAW_S)
                    if enabled and on_terminal(stream) else None)
        self.losses, self.count, self.shown_at = [], 0, 0.0

    def update(self, steps: int, loss, count: int = 1):
        """`steps` more done; `loss`: the sum of `count` per-step losses over them (a device scalar)."""
        if self.bar is None:
            return
        self.losses.append(loss)
        self.count += count
        now = time.monotonic()
        if now - self.shown_at >= REDRAW_S or self.bar.n + steps >= self.bar.total:
            self.bar.set_postfix_str(f"loss {float(sum(self.losses)) / self.count:.4f}", refresh=False)
            self.losses, self.count, self.shown_at = [], 0, now
        self.bar.update(steps)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
