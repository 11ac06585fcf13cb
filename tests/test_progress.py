"""Progress within an epoch (common/progress.py EpochBar): on a terminal a bar of the epoch's steps
with the recent loss and the rate; in a log nothing per step (the stages' one line per epoch:
tests/test_lineage.py)."""
import io

import torch

import common.progress as P
from common.progress import EpochBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_shows_steps_the_recent_loss_and_the_rate(monkeypatch):
    clock = iter([10.0, 10.1, 10.2, 10.7, 10.8, 10.9])
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    bar = EpochBar("epoch 3", 6, stream=Terminal())
    for i, seconds in enumerate([10.0, 10.1, 10.2, 10.7, 10.8]):
        bar.update(1, torch.tensor(float(i)))
        if seconds == 10.2:
            assert bar.bar.postfix == "loss 0.0000"        # read at the first step, then every REDRAW_S seconds
        if seconds == 10.7:
            assert bar.bar.postfix == "loss 2.0000"        # the mean of the steps since: (1 + 2 + 3) / 3
    bar.update(1, torch.tensor(20.0), count=2)             # the last update (a sum of 2 losses) is read: (4 + 20) / 3
    shown = str(bar.bar)
    assert "epoch 3" in shown and "6/6" in shown and "step/s" in shown and "loss 8.0000" in shown, shown
    bar.close()


def test_in_a_log_or_on_other_ranks_the_bar_writes_nothing():
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        with EpochBar("epoch 1", 3, enabled, stream=stream) as bar:
            for _ in range(3):
                bar.update(1, torch.tensor(1.0))
        assert bar.bar is None and stream.getvalue() == ""
