"""Progress display that suits where the output goes.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (a log file, a pipe, a batch
scheduler's capture): no bar at all, because tqdm redraws with carriage returns that turn a log
into one endless line; the stage prints one line per epoch instead.

`common.pretrain._progress`, the one place the training loops make a bar, calls it.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def progress(iterable, desc: str, enabled: bool = True, **kwargs):
    """tqdm over `iterable` on a terminal (and where `enabled`, e.g. rank 0 only), else the iterable as is."""
    if not (enabled and on_terminal()):
        return iterable
    return tqdm(iterable, desc=desc, leave=False, **kwargs)
