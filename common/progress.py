"""Progress display that suits where the output goes.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (a log file, a pipe, a batch
scheduler's capture): no bar at all, because tqdm redraws with carriage returns that turn a log
into one endless line; the stage prints one line per epoch instead.

Where it belongs: `common.pretrain._progress(it, epoch, env, unit)`, the one place the training
loops (`Loft.train_epoch`, `Dense.train_epoch`) make a bar, should return
`progress(it, f"epoch {epoch} {unit}", env.is_main)`; tests/test_lineage.py shows the result.
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
