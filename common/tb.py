"""TensorBoard scalars of a stage folder (`tensorboard --logdir runs` shows every run and stage).

The event file sits in the stage folder itself, so TensorBoard names each run after its folder
(`quick_c10/pretrain`, `quick_c10/finetune_l1_p50_finetune`, ...). Tags are the metrics.csv
column names (train_loss, test_acc, test_acc_lossless where measured, comm_bytes, train_flops)
plus lr; the step is the epoch. Only rank 0 writes: elsewhere a `Scalars` does nothing.
"""
from __future__ import annotations

import numbers
from pathlib import Path


def _summary_writer():
    """torch's SummaryWriter, or None where the tensorboard package is missing (one note, once)."""
    global _MISSING_NOTED
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:
        if not _MISSING_NOTED:
            print("note: the tensorboard package is not installed, so no event files are written "
                  "(pip install tensorboard); metrics.csv has every number")
            _MISSING_NOTED = True
        return None


_MISSING_NOTED = False


class Scalars:
    def __init__(self, folder: Path, enabled: bool, first_step: int = 0):
        self.writer = None
        SummaryWriter = _summary_writer() if enabled else None
        if SummaryWriter is not None:
            # purge_step: after --resume, TensorBoard hides what a killed run logged past its last checkpoint
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=first_step or None)

    def add(self, values: dict, step: int, skip=("epoch",)):
        """Every numeric value of `values` (a metrics row) under its own name."""
        if self.writer is None:
            return
        for name, value in values.items():
            if name not in skip and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def epoch_lr(trainer, tcfg) -> float:
    """The learning rate of the last step a trainer took (its schedule is a function of the step)."""
    from common.train import lr_at
    return lr_at(max(0, trainer.steps_done - 1), trainer.schedule)
