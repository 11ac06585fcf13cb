"""Learning-rate schedules: a `Schedule` built once from a training section, then a pure function
of the trainer's step (`lr_at(step, schedule)` in common.train).

Kinds (`schedule:` in a training section; p = position in the schedule, in its own steps;
T = epochs x steps per epoch; W = warm-up steps):
- constant:  1
- step:      0.1 ** ([p >= T/2] + [p >= 3T/4])                         (÷10 at 50 % and 75 %)
- multistep: gamma ** #{milestones m : p >= m}       (milestones in epochs, or in rounds of K steps)
- cosine:    0.5 (1 + cos(pi (p - W) / (T - W)))   annealed from the end of the warm-up to T
times base_lr, and times min(1, (p + 1) / W) during a linear warm-up of `warmup_epochs`.

Rewinding (`finetune.schedule_from: rewind`, Frankle et al. 2020): a ticket rewound to epoch k
continues the *pretraining* run's schedule where that run was at the end of epoch k, so the
ticket's step t sits at position k * S_pre + t * S_pre / S_ticket of it (S = steps per epoch;
with the same batch size: exactly pretraining step k * S + t). `Schedule.continued` builds that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from common.errors import UserError

KINDS = ("cosine", "step", "multistep", "constant")


@dataclass(frozen=True)
class Schedule:
    base_lr: float
    kind: str
    total_steps: int                 # T: the schedule's length in its own steps
    milestones: tuple = ()           # multistep: positions (own steps) at which lr *= gamma
    gamma: float = 0.1
    warmup_steps: float = 0.0        # W
    offset: float = 0.0              # position of the trainer's step 0 (rewinding: k epochs in)
    scale: float = 1.0               # schedule steps per trainer step (rewinding with another batch)

    def position(self, step: int) -> float:
        return self.offset + step * self.scale if (self.offset or self.scale != 1.0) else step

    def lr(self, step: int) -> float:
        p, T, W = self.position(step), max(1, self.total_steps), self.warmup_steps
        warm = min(1.0, (p + 1) / W) if W > 0 else 1.0
        if self.kind == "constant":
            main = 1.0
        elif self.kind == "step":
            frac = p / T
            main = 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
        elif self.kind == "multistep":
            main = self.gamma ** sum(p >= m for m in self.milestones)
        elif self.kind == "cosine":
            main = 1.0 if p < W else 0.5 * (1.0 + math.cos(math.pi * (min(p, T) - W) / max(1, T - W)))
        else:
            raise ValueError(self.kind)
        return self.base_lr * warm * main

    def continued(self, epoch: int, own_steps_per_epoch: int, trainer_steps_per_epoch: int) -> "Schedule":
        """This schedule resumed at the end of `epoch`, driven by a trainer with its own epoch length."""
        return replace(self, offset=float(epoch * own_steps_per_epoch),
                       scale=own_steps_per_epoch / trainer_steps_per_epoch)


def schedule_of(tc, steps_per_epoch: int, local_iters: int | None = None) -> Schedule:
    """The schedule of a training section (cfg.pretrain or cfg.finetune) over its own epochs.
    A milestone in rounds is `local_iters` steps each (every pretraining method: the lr then
    changes at the same step for dense, GPipe, Local SGD and LoFT)."""
    unit = tc.milestone_unit
    per = local_iters if unit == "rounds" else steps_per_epoch
    return Schedule(base_lr=tc.lr, kind=tc.schedule, total_steps=tc.epochs * steps_per_epoch,
                    milestones=tuple(m * per for m in tc.milestones), gamma=tc.gamma,
                    warmup_steps=tc.warmup_epochs * steps_per_epoch)


def check_schedule_keys(tc, section: str):
    """Constraints between one section's schedule keys (config validation: one line, UserError)."""
    ms = list(tc.milestones)
    if tc.schedule == "multistep":
        if not ms:
            raise UserError(f"config key {section}.milestones: schedule multistep needs at least one milestone")
        if any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] <= 0:
            raise UserError(f"config key {section}.milestones: {ms} must be positive and strictly increasing")
    elif ms:
        raise UserError(f"config key {section}.milestones: only used by schedule multistep "
                        f"(schedule is {tc.schedule!r})")
    if tc.warmup_epochs and tc.epochs and tc.warmup_epochs >= tc.epochs:
        raise UserError(f"config key {section}.warmup_epochs: {tc.warmup_epochs} must be shorter than "
                        f"{section}.epochs={tc.epochs}")


def ticket_schedule_source(fc) -> str:
    """'rewind' or 'fresh': where a ticket's learning rate comes from (`finetune.schedule_from`;
    auto = rewind for the rewinding modes, fresh for finetune and scratch)."""
    if fc.schedule_from != "auto":
        return fc.schedule_from
    return "rewind" if fc.mode in ("rewind", "rise") else "fresh"
