"""Pretraining methods behind one interface, used by 01_pretrain_loft.py.

A method owns the global weights and knows how to train one epoch:
- `Loft`: rounds of partition → local training → aggregation (common.loft), S workers per
  run, S/W of them on each of W ranks;
- `Dense`: the full model trained as usual (one process).
Both keep every RNG stream addressable by (seed, stream, step), so `resume` only needs the
weights, the momentum buffers and the counters that `state_dict` returns.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from common.costs import epoch_end_round
from common.data import Stream
from common.dist import Comm, DistEnv, workers_of_rank
from common.errors import UserError
from common.loft import SlicePlan, aggregate, draw_partition, extract, worker_arch
from common.models import build_model, partitioned_blocks
from common.train import make_sgd, lr_at, train_steps, sgd_step

RECAL_STREAM = 9_000_001  # data stream id of the fixed BN-recalibration batches


class Loft:
    def __init__(self, cfg, arch: dict, init_state: dict, train_set, env: DistEnv, comm: Comm):
        self.cfg, self.arch, self.env, self.comm = cfg, arch, env, comm
        pc = cfg.pretrain
        self.S, self.K = pc.workers, pc.local_iters
        model = build_model(arch)
        self.blocks = partitioned_blocks(model, pc.partition_stage1)
        if not self.blocks:
            raise UserError(f"model.arch={arch['name']}: no partitionable blocks")
        narrowest = min(b.mid for b in self.blocks)
        if self.S > narrowest:
            raise UserError(f"pretrain.workers={self.S} exceeds the narrowest partitioned block "
                            f"({narrowest} channels)")
        self.my_workers = workers_of_rank(self.S, env)
        self.streams = {w: Stream(train_set, pc.batch_size, cfg.seed, w) for w in self.my_workers}
        self.steps_per_epoch = len(train_set) // pc.batch_size
        if self.K > self.steps_per_epoch:
            raise UserError(f"pretrain.local_iters={self.K} exceeds the {self.steps_per_epoch} steps of an epoch")
        self.total_steps = pc.epochs * self.steps_per_epoch
        self.state = {k: v.clone() for k, v in init_state.items()}
        self.plan = SlicePlan.of(self.blocks, self.state)
        self.momentum = ({k: torch.zeros_like(v) for k, v in model.named_parameters()}
                         if pc.carry_momentum else None)
        self.round = 0

    def run_round(self, r: int) -> float:
        """Partition, train this rank's workers for K steps each, aggregate. Returns mean loss."""
        part = draw_partition(self.blocks, self.S, self.cfg.seed, r)
        steps = range(r * self.K, (r + 1) * self.K)
        results, moms, losses = {}, {}, []
        for w in self.my_workers:
            sub = build_model(worker_arch(self.arch, part, w))
            sub.load_state_dict(extract(self.state, self.plan, part, w))
            mom = extract(self.momentum, self.plan, part, w) if self.momentum is not None else None
            loss, moms[w] = train_steps(sub, self.streams[w], steps, self.total_steps, self.cfg.pretrain,
                                        self.env.device, mom, where=f"round {r} worker {w}")
            results[w] = {k: v.detach().cpu() for k, v in sub.state_dict().items()}
            losses.append(loss)
        self.state = aggregate(self.state, self.plan, part, results, self.comm, self.S)
        if self.momentum is not None:
            self.momentum = aggregate(self.momentum, self.plan, part, moms, self.comm, self.S)
        self.round = r + 1
        return sum(losses) / len(losses)

    def train_epoch(self, epoch: int) -> float:
        first, last = self.round, epoch_end_round(epoch, self.steps_per_epoch, self.K)
        losses = [self.run_round(r) for r in tqdm(range(first, last), desc=f"epoch {epoch} rounds",
                                                  disable=not self.env.is_main, leave=False)]
        loss = torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64)
        loss = self.comm.sum_metric(loss)
        return float(loss[0] / loss[1]) if loss[1] else float("nan")

    def state_dict(self) -> dict:
        return {"round": self.round, "momentum": self.momentum}

    def load_state_dict(self, d: dict, weights: dict):
        self.state, self.round, self.momentum = dict(weights), int(d["round"]), d["momentum"]


class Dense:
    """The full model, one stream, optimizer state kept across epochs (one process)."""

    def __init__(self, cfg, arch: dict, init_state: dict, train_set, env: DistEnv, comm: Comm):
        if env.distributed:
            raise UserError("pretrain.method=dense under the launcher is not implemented yet; run it with plain python")
        self.cfg, self.env = cfg, env
        self.model = build_model(arch)
        self.model.load_state_dict(init_state)
        self.model.to(env.device)
        self.opt = make_sgd(self.model, cfg.pretrain.lr, cfg.pretrain.momentum, cfg.pretrain.weight_decay)
        self.stream = Stream(train_set, cfg.pretrain.batch_size, cfg.seed, 0)
        self.steps_per_epoch = len(train_set) // cfg.pretrain.batch_size
        self.total_steps = cfg.pretrain.epochs * self.steps_per_epoch
        self.step = 0

    @property
    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def train_epoch(self, epoch: int) -> float:
        pc, losses = self.cfg.pretrain, []
        self.model.train()
        for t in tqdm(range(self.step, epoch * self.steps_per_epoch), desc=f"epoch {epoch} steps",
                      disable=not self.env.is_main, leave=False):
            x, y = self.stream.batch(t)
            losses.append(sgd_step(self.model, self.opt, x.to(self.env.device), y.to(self.env.device),
                                   lr_at(t, self.total_steps, pc.lr, pc.schedule), pc.grad_clip,
                                   where=f"epoch {epoch} step {t}"))
        self.step = epoch * self.steps_per_epoch
        return sum(losses) / max(1, len(losses))

    def state_dict(self) -> dict:
        return {"step": self.step, "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict, weights: dict):
        self.model.load_state_dict(weights)
        self.step = int(d["step"])
        self.opt.load_state_dict(d["opt"])


METHODS = {"loft": Loft, "dense": Dense}


def recal_stream(train_set, cfg) -> Stream:
    return Stream(train_set, min(cfg.data.eval_batch_size, len(train_set)), cfg.seed, RECAL_STREAM)
