"""Ticket initialisation and locked-weight updates for 04_finetune.py (SPEC 6).

Modes:
- `finetune`: the ticket's own (pruned, pretrained) weights;
- `rewind`: the kept weights reset to pretraining epoch k (structured: sliced with the
  ticket's kept indices; masks: epoch-k weights times the mask, the rest held at 0 — I-LOT);
- `scratch`: a fresh random init of the ticket's architecture (times the mask, if any);
- `rise`: masks only; epoch-k weights, and only the winners train: every other weight stays
  *locked at its epoch-k value* (RISE, Alg. 3, eq. 2).
One mechanism serves every masked mode: `LockedUpdate` zeroes the (weight-decayed) gradient of
the non-winners, so with momentum buffers starting at zero they never move, bit for bit, from
their initial value — 0 for finetune/rewind/scratch, the epoch-k value for rise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import FinetunedTicket, PretrainEpoch, Ticket, load
from common.config import section_from_file
from common.costs import train_flops_per_sample
from common.errors import UserError
from common.lineage import check_unchanged, epoch_files, file_sha256
from common.models import build_model
from common.prune import slice_blocks
from common.schedule import Schedule, schedule_of, ticket_schedule_source
from common.selection import prunable_blocks

FINETUNE_STREAM = 8_000_001  # data stream id of fine-tuning batches


def _full_arch(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k != "mids"}


def rewind_path(ticket: Ticket, epoch: int) -> Path:
    """The pretraining checkpoint of `epoch`; absent, one line listing the epochs that can be rewound to."""
    path = Path(ticket.pretrain_dir) / f"epoch_{epoch:03d}.pt"
    if not path.is_file():
        known = ticket.pretrain_sha256 or {str(e): f for e, f in epoch_files(Path(ticket.pretrain_dir)).items()}
        raise UserError(f"{path}: no such pretraining checkpoint; finetune.rewind_epoch={epoch} must be an epoch "
                        f"the ticket's pretraining run saved ({', '.join(sorted(known, key=int)) or 'none left'})")
    return path


def rewind_checkpoint(ticket: Ticket, epoch: int) -> PretrainEpoch:
    return load(rewind_path(ticket, epoch), PretrainEpoch)


def rewind_weights(ticket: Ticket, epoch: int, importable: frozenset[str] = frozenset()) -> dict:
    """The pretraining weights of `epoch`, cut to the ticket's structure (kept filters)."""
    src = rewind_checkpoint(ticket, epoch)
    state = src.model
    if ticket.kept:
        blocks = prunable_blocks(build_model(_full_arch(ticket.arch), importable), ticket.arch)
        state = slice_blocks(state, blocks, ticket.kept)
    return state


def ticket_weights(ticket: Ticket, mode: str, rewind_epoch: int, seed: int,
                   importable: frozenset[str] = frozenset()) -> dict:
    """Initial weights of the ticket's model for a fine-tuning mode. `scratch` draws the model's own
    init at full width and keeps the ticket's channels of it (common.narrowing: the same cut as 03's)."""
    mask = ticket.mask or {}
    if mode == "rise" and not mask:
        raise UserError("finetune.mode=rise needs a magnitude ticket (prune.kind=magnitude): it locks masked weights")
    if mode == "finetune":
        state = {k: v.clone() for k, v in ticket.model.items()}
    elif mode in ("rewind", "rise"):
        state = rewind_weights(ticket, rewind_epoch, importable)
    elif mode == "scratch":
        torch.manual_seed(seed + 1)  # not the pretraining init: a new draw of the pruned architecture
        state = build_model(ticket.arch, importable).state_dict()
    else:
        raise UserError(f"finetune.mode={mode!r} is not known")
    if mode != "rise":  # losers start at (and stay at) zero; rise keeps their epoch-k values
        for name, m in mask.items():
            state[name] = state[name] * m
    return state


class LockedUpdate:
    """Gradient hook for masked tickets: weight decay added by hand, then every non-winner's
    gradient zeroed, so no gradient step, no weight decay and no momentum ever reach it. Two
    foreach operators a step (add, multiply) over all parameters, not two per parameter; each
    element still gets (grad + wd·w)·mask, as before, bit for bit."""

    def __init__(self, mask: dict[str, torch.Tensor], weight_decay: float):
        self.mask, self.wd = dict(mask), weight_decay  # own dict: device copies replace entries here only

    @torch.no_grad()
    def __call__(self, model):
        named = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
        if self.wd and named:
            torch._foreach_add_([p.grad for _, p in named], [p for _, p in named], alpha=self.wd)
        masked = [(name, p.grad) for name, p in named if name in self.mask]
        for name, grad in masked:
            if self.mask[name].device != grad.device or self.mask[name].dtype != grad.dtype:
                self.mask[name] = self.mask[name].to(grad.device, grad.dtype)  # once, not every step
        if masked:
            torch._foreach_mul_([g for _, g in masked], [self.mask[name] for name, _ in masked])


def ticket_schedule(ticket: Ticket, fc, n_train: int) -> tuple[int, Schedule, str]:
    """(epochs to train, lr schedule, one line saying which) for a ticket.

    fresh: the finetune section's own schedule over finetune.epochs. rewind: the pretraining
    run's schedule (its saved config: lr, kind, milestones, warm-up, E epochs) continued from
    the end of epoch k, for finetune.epochs (0: all E - k remaining) epochs; the ticket's step t
    sits at pretraining position k * S_pre + t * S_pre / S_ticket (S = steps per epoch)."""
    steps = n_train // fc.batch_size
    if ticket_schedule_source(fc) == "fresh":
        if fc.epochs == 0:
            raise UserError("config key finetune.epochs: 0 needs finetune.schedule_from rewind")
        return fc.epochs, schedule_of(fc, steps), f"fresh {fc.schedule} schedule, lr {fc.lr}, {fc.epochs} epochs"
    pc = section_from_file(Path(ticket.pretrain_dir) / "config.yaml", "pretrain")
    k, left = fc.rewind_epoch, pc.epochs - fc.rewind_epoch
    if left < 1 or fc.epochs > left:
        raise UserError(f"finetune.schedule_from=rewind: the pretraining schedule has {pc.epochs} epochs; from "
                        f"rewind epoch {k}, finetune.epochs={fc.epochs} does not fit in the {max(left, 0)} that "
                        "remain (0 = all of them; or finetune.schedule_from=fresh)")
    own = n_train // pc.batch_size
    schedule = schedule_of(pc, own, pc.local_iters).continued(k, own, steps)
    epochs = fc.epochs or left
    return epochs, schedule, (f"the pretraining schedule ({pc.schedule}, lr {pc.lr}, {pc.epochs} epochs) continued "
                              f"from epoch {k}: {epochs} epochs, lr {schedule.lr(0):.4g} at the first step")


def complexity_base(ticket: Ticket, mode: str, rewind_epoch: int) -> int:
    """Training FLOPs already in the ticket's starting weights (the first term of its training
    complexity): P(k), the pretraining up to the rewind epoch, for rewind/rise; the complexity of
    the ticket's own weights for finetune; nothing for scratch."""
    if mode in ("rewind", "rise"):
        return rewind_checkpoint(ticket, rewind_epoch).train_flops
    if mode == "finetune":
        return ticket.train_flops
    return 0


@dataclass(frozen=True)
class TrainingComplexity:
    """A ticket's training complexity under 04 (docs/stages.md, "Training complexity"): the training
    already in its starting weights plus steps x batch x the masked per-sample cost. One count
    for TensorBoard's train_flops after every epoch and result.json's at the end."""
    base: int          # complexity_base
    per_sample: int    # forward + backward FLOPs of one sample, less the locked weights' gradients
    batch_size: int

    def this_stage(self, steps: int) -> int:
        return steps * self.batch_size * self.per_sample

    def after(self, steps: int) -> int:
        return self.base + self.this_stage(steps)


def training_complexity(ticket: Ticket, fc, input_shape, importable: frozenset[str] = frozenset()) -> TrainingComplexity:
    """The complexity count of `ticket` trained under the finetune section `fc`."""
    with torch.random.fork_rng(devices=[]):  # the model built to count draws its init: dropout later sees the same RNG
        per_sample = train_flops_per_sample(build_model(ticket.arch, importable), input_shape, ticket.mask)
    return TrainingComplexity(complexity_base(ticket, fc.mode, fc.rewind_epoch), per_sample, fc.batch_size)


def load_ticket(path: Path, made_by: str) -> Ticket:
    """A ticket (03's ticket.pt or 04's final.pt); `made_by` is the 03 command that makes one (with
    --from, from a pretraining checkpoint given instead)."""
    return load(path, (Ticket, FinetunedTicket), made_by=made_by)


def check_lineage(ticket: Ticket, ticket_path: Path, mode: str, rewind_epoch: int, remake: str) -> dict:
    """Refuse when a file the ticket was made from changed since (its source checkpoint, or the
    pretraining epoch it will be rewound to); returns {"ticket", "rewind"} records for the result.
    Tickets made before lineage was recorded carry no hashes and are taken as they are."""
    source = ticket.lineage["source"] if ticket.lineage else None
    if source and Path(source["path"]).is_file():  # gone is fine: the ticket holds its own weights
        check_unchanged(source["path"], source["sha256"], ticket_path, remake)
    rewind = None
    if mode in ("rewind", "rise"):
        path = rewind_path(ticket, rewind_epoch)
        known = ticket.pretrain_sha256
        rewind = {"path": str(path), "sha256": file_sha256(path)}
        if known is not None and known.get(str(rewind_epoch)) != rewind["sha256"]:
            raise UserError(f"{path} changed since {ticket_path} was made from its pretraining run "
                            f"(content hash differs): rewinding would pair the ticket's mask or filters "
                            f"with another run's weights; remake the ticket: {remake}")
    return {"ticket": {"path": str(ticket_path), "sha256": file_sha256(ticket_path)}, "rewind": rewind}


def param_counts(model: torch.nn.Module, mask: dict | None) -> dict:
    """Total, trainable (winners: every parameter but the masked-out weights) and nonzero parameters.
    Under RISE the losers stay at their nonzero epoch-k values: trainable < nonzero."""
    total = sum(p.numel() for p in model.parameters())
    locked = sum(int((~m).sum()) for m in (mask or {}).values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {"params_total": total, "params_trainable": total - locked, "params_nonzero": nonzero}
