"""Pretraining methods behind one interface, used by 01_pretrain_loft.py (SPEC 2).

- `Loft`: rounds of partition → local training → aggregation (common.loft); S workers,
  S/W of them on each of W ranks.
- `LocalSGD`: the same round with nothing partitioned: S full replicas on their own streams,
  every parameter and BN buffer averaged every K steps (Stich 2019).
- `Dense`: the full model; under the launcher data parallel through the DeepSpeed engine
  (each rank takes its share of the micro-batches of one global batch).
- `GPipe`: under the launcher with S ranks, DeepSpeed's pipeline engine over S stages cut by
  SPEC 3's rule; in one process it trains as `Dense` over S micro-batches and counts the
  activations and gradients that would cross the cuts.
Every RNG stream is addressed by (seed, stream, step), so resuming needs only the weights,
optimizer state and counters in `state_dict`.
Interface: train_epoch(epoch) → mean loss; global_state() (collective) → full state dict;
train_flops_per_step (all workers, forward+backward); steps_done; state_dict()/load_state_dict(d, weights).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.costs import epoch_end_round, flops_per_sample, pipeline_cuts
from common.data import Stream, input_shape
from common.dist import Comm, DistEnv, workers_of_rank
from common.errors import UserError
from common.fused import fuse, fused_criterion, worker_views
from common.progress import progress
from common.loft import (FlatLayout, RoundExchange, SlicePlan, aggregate, draw_partition, extract, mean_of_workers,
                         partition_to, worker_arch)
from common.models import build_model, partitioned_blocks
from common.schedule import schedule_of
from common.train import SGDStep, check_finite, flat_buffers, lr_at, make_sgd

RECAL_STREAM = 9_000_001  # data stream id of the fixed BN-recalibration batches
CHECK_EVERY = 100          # dense steps between finiteness checks (each one host sync)


def recal_stream(train_set, cfg) -> Stream:
    return Stream(train_set, min(cfg.data.eval_batch_size, len(train_set)), cfg.seed, RECAL_STREAM)


def _progress(it, epoch, env, unit):
    """A bar on a terminal (rank 0), nothing in a log: the stage prints one line per epoch."""
    return progress(it, f"epoch {epoch} {unit}", env.is_main)


def _to(state: dict | None, device) -> dict | None:
    """A copy of `state` on `device` (a copy even where it already is: the caller's dict stays untouched)."""
    return None if state is None else {k: v.to(device, copy=True) for k, v in state.items()}


def _cpu(state: dict | None) -> dict | None:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


@torch.no_grad()
def into_flat_buffers(modules: list[nn.Module]) -> dict[torch.dtype, torch.Tensor]:
    """Move the state-dict tensors (parameters and buffers) of persistent `modules` into flat
    buffers, one per dtype, values and layout kept: each becomes a view into its dtype's buffer, so
    a round loads and reads them all with one operator (common.loft.RoundExchange). `.data` is
    re-pointed: the modules and their optimizers keep the same tensor objects."""
    tensors = list({id(t): t for m in modules for t in m.state_dict(keep_vars=True).values()}.values())
    flats, pieces = flat_buffers(tensors)
    for t, piece in zip(tensors, pieces):
        piece.copy_(t)
        t.data = piece
    return flats


# ----------------------------------------------------------------- LoFT / LocalSGD
class Worker:
    """One LoFT / Local SGD worker: its subnetwork module, optimizer and batch stream, built once
    (a worker's partition sizes are the same every round); each round its slices of the global
    state are copied into the module in place and its momentum starts afresh (or carried)."""

    def __init__(self, arch: dict, tcfg, device, schedule, stream: Stream):
        self.sgd = SGDStep(build_model(arch), tcfg, device, schedule, compile=tcfg.compile)
        self.stream = stream
        self.module_state = self.sgd.model.state_dict()  # views of the live parameters and buffers

    @torch.no_grad()
    def load(self, state: dict, plan: SlicePlan, part: dict, worker: int, momentum: dict | None):
        """The round's start tensor by tensor (what RoundExchange.load does in one gather)."""
        extract(state, plan, part, worker, out=self.module_state)
        self.reset_momentum(momentum, plan, part, worker)

    def reset_momentum(self, momentum: dict | None, plan: SlicePlan, part: dict | None, worker: int):
        self.sgd.reset_optimizer(None if momentum is None else extract(momentum, plan, part, worker))

    def train(self, steps: range) -> torch.Tensor:
        """K local steps; the sum of their losses (a device scalar)."""
        self.sgd.model.train()
        return torch.stack([self.sgd(t, [self.stream.batch(t)]) for t in steps]).sum()


class FusedWorkers:
    """This rank's LoFT / Local SGD workers as one fused module (common.fused): one forward,
    backward and update per step for all of them. Same interface as a dict of `Worker`s."""

    def __init__(self, arch_of: dict[int, dict], tcfg, device, schedule, streams: dict[int, Stream]):
        self.ids = sorted(arch_of)
        sub = build_model(arch_of[self.ids[0]])
        n = len(self.ids)
        self.sgd = SGDStep(fuse(sub, n), tcfg, device, schedule, loss_fn=fused_criterion(n), compile=tcfg.compile)
        self.streams = streams
        self.flats = into_flat_buffers([self.sgd.model])
        shapes = {k: v.shape for k, v in sub.state_dict().items()}
        self.views = dict(zip(self.ids, worker_views(self.sgd.model.state_dict(), shapes, n)))

    @property
    def module_states(self) -> dict[int, dict]:
        return self.views

    @torch.no_grad()
    def load(self, state: dict, plan: SlicePlan, part: dict, momentum: dict | None):
        """The round's start tensor by tensor (what RoundExchange.load does in one gather)."""
        for w in self.ids:
            extract(state, plan, part, w, out=self.views[w])
        self.reset_momentum(momentum, plan, part)

    @torch.no_grad()
    def reset_momentum(self, momentum: dict | None, plan: SlicePlan, part: dict | None):
        fused_momentum = None
        if momentum is not None:  # each worker's momentum slices, placed like its weights
            fused_momentum = {k: torch.empty_like(p) for k, p in self.sgd.model.named_parameters()}
            for w, views in zip(self.ids, self._views(fused_momentum)):
                extract(momentum, plan, part, w, out=views)
        self.sgd.reset_optimizer(fused_momentum)

    def _views(self, fused: dict) -> list[dict]:
        return worker_views(fused, {k: self.views[self.ids[0]][k].shape for k in fused}, len(self.ids))

    def train(self, steps: range) -> torch.Tensor:
        """K fused steps; the sum of all workers' losses over them."""
        self.sgd.model.train()
        losses = []
        for t in steps:
            xs, ys = zip(*(self.streams[w].batch(t) for w in self.ids))
            losses.append(self.sgd(t, [(torch.cat(xs, 1), torch.stack(ys, 1))]))
        return torch.stack(losses).sum()

    def momenta(self, fallback: dict[int, dict]) -> dict[int, dict]:
        # every fused parameter holds a buffer: `load` set them all (`fallback` is never needed)
        return dict(zip(self.ids, self._views(self.sgd.momentum(fallback={}))))


class SequentialWorkers:
    """This rank's workers one after another, each a persistent `Worker`; their tensors all live in
    one flat buffer per dtype (`flats`), so a round loads and reads them with one operator."""

    def __init__(self, arch_of: dict[int, dict], tcfg, device, schedule, streams: dict[int, Stream]):
        self.workers = {w: Worker(a, tcfg, device, schedule, streams[w]) for w, a in arch_of.items()}
        self.flats = into_flat_buffers([worker.sgd.model for worker in self.workers.values()])
        for worker in self.workers.values():
            worker.module_state = worker.sgd.model.state_dict()  # views into the flat buffers now

    @property
    def module_states(self) -> dict[int, dict]:
        return {w: worker.module_state for w, worker in self.workers.items()}

    def load(self, state: dict, plan: SlicePlan, part: dict, momentum: dict | None):
        for w, worker in self.workers.items():
            worker.load(state, plan, part, w, momentum)

    def reset_momentum(self, momentum: dict | None, plan: SlicePlan, part: dict | None):
        for w, worker in self.workers.items():
            worker.reset_momentum(momentum, plan, part, w)

    def train(self, steps: range) -> torch.Tensor:
        return torch.stack([worker.train(steps) for worker in self.workers.values()]).sum()

    def momenta(self, fallback: dict[int, dict]) -> dict[int, dict]:
        return {w: worker.sgd.momentum(fallback[w]) for w, worker in self.workers.items()}


class Loft:
    # How the S workers' copies of a shared tensor ([S, n] stack) become the new global value, and
    # the same for carried momentum. One-function ablations: a method's rule is its own attribute.
    combine = staticmethod(mean_of_workers)
    combine_momentum = staticmethod(mean_of_workers)

    def __init__(self, cfg, arch: dict, init_state: dict, train_set, env: DistEnv, comm: Comm):
        self.cfg, self.arch, self.env, self.comm = cfg, arch, env, comm
        pc = cfg.pretrain
        self.S, self.K = pc.workers, pc.local_iters
        model = build_model(arch)
        self.blocks = self.split_blocks(model)
        self.my_workers = workers_of_rank(self.S, env)
        shard = pc.data == "shard"
        per_pass = len(train_set) // self.S if shard else len(train_set)  # the images a worker walks per epoch
        self.steps_per_epoch = per_pass // pc.batch_size
        walked = f"{per_pass} training images" + (f" (1/{self.S} of {len(train_set)}: pretrain.data=shard)" if shard else "")
        if self.steps_per_epoch == 0:
            raise UserError(f"pretrain.batch_size={pc.batch_size} exceeds the {walked} a worker walks per epoch")
        if self.K > self.steps_per_epoch:
            raise UserError(f"pretrain.local_iters={self.K} exceeds the {self.steps_per_epoch} steps of an epoch "
                            f"({walked} in batches of pretrain.batch_size={pc.batch_size})")
        self.schedule = schedule_of(pc, self.steps_per_epoch, pc.local_iters)
        self.layout = FlatLayout.of(init_state)
        self.flat = self.layout.flatten(init_state, env.device)  # the global state (`state`: its views)
        self._state, self._state_of = None, None
        self.plan = SlicePlan.of(self.blocks, self.state)
        self.momentum = ({k: torch.zeros_like(v, device=env.device) for k, v in model.named_parameters()}
                         if pc.carry_momentum else None)
        self.round = 0
        part = draw_partition(self.blocks, self.S, cfg.seed, 0)  # sizes per worker are the same every round
        self.train_flops_per_step = pc.batch_size * sum(
            flops_per_sample(build_model(worker_arch(arch, part, w)), input_shape(cfg.data.dataset), backward=True)
            for w in range(self.S))
        streams = {w: Stream(train_set, pc.batch_size, cfg.seed, w, device=env.device,
                             shard=(w, self.S) if shard else None) for w in self.my_workers}
        arch_of = {w: worker_arch(arch, part, w) for w in self.my_workers}
        if pc.fused_workers:
            self.check_fusable(part)
        self.workers = (FusedWorkers if pc.fused_workers else SequentialWorkers)(
            arch_of, pc, env.device, self.schedule, streams)
        self.exchange = RoundExchange(self.plan, self.layout, part, self.S, self.workers.module_states,
                                      self.workers.flats, env.device)

    @property
    def state(self) -> dict:
        """The global state dict: views into `flat` (new buffers every round, so a dict taken
        earlier keeps its values)."""
        if self._state_of is not self.flat:
            self._state, self._state_of = self.layout.views(self.flat), self.flat
        return self._state

    def split_blocks(self, model):
        blocks = partitioned_blocks(model, self.cfg.pretrain.partition_stage1, self.arch, self.cfg.pretrain.overlap)
        if not blocks:
            raise UserError(f"model.arch={self.arch['name']}: no partitionable blocks")
        narrowest = min(b.mid for b in blocks)
        if self.S > narrowest:
            raise UserError(f"pretrain.workers={self.S} exceeds the narrowest partitioned block ({narrowest} channels)")
        return blocks

    def check_fusable(self, part: dict):
        """Fused workers need equal shapes: S must divide every partitioned block's width."""
        for name, sets in part.items():
            if len({len(s) for s in sets}) > 1:
                mid = sum(len(s) for s in sets)
                raise UserError(f"pretrain.fused_workers: block {name} has {mid} channels, not divisible by "
                                f"pretrain.workers={self.S} (the fused workers need equal widths)")

    def run_round(self, r: int) -> torch.Tensor:
        """Partition, train this rank's workers for K steps each, aggregate. Returns the losses'
        sum over this rank's workers and steps (a device scalar). Loading and aggregation run on
        the flat buffers (common.loft.RoundExchange); carried momentum tensor by tensor."""
        part = draw_partition(self.blocks, self.S, self.cfg.seed, r)
        steps = range(r * self.K, (r + 1) * self.K)
        self.exchange.begin_round(part)
        self.exchange.load(self.flat)
        carried = partition_to(part, self.env.device) if self.momentum is not None else None
        self.workers.reset_momentum(self.momentum, self.plan, carried)
        loss = self.workers.train(steps)
        new_flat = self.exchange.aggregate(self.flat, self.comm, self.combine)
        if self.momentum is not None:
            moms = self.workers.momenta({w: extract(self.momentum, self.plan, carried, w) for w in self.my_workers})
            self.momentum = aggregate(self.momentum, self.plan, carried, moms, self.comm, self.S, self.combine_momentum)
        check_finite(loss, f"round {r} (steps {steps.start}-{steps.stop - 1})",
                     self.comm if self.env.distributed else None)
        self.flat, self.round = new_flat, r + 1
        return loss

    def train_epoch(self, epoch: int) -> float:
        first, last = self.round, epoch_end_round(epoch, self.steps_per_epoch, self.K)
        losses = [self.run_round(r) for r in _progress(range(first, last), epoch, self.env, "rounds")]
        total = torch.stack(losses).sum().double().cpu() if losses else torch.zeros((), dtype=torch.float64)
        count = float(len(losses) * self.K * len(self.my_workers))
        loss = self.comm.sum_metric(torch.stack([total, torch.tensor(count, dtype=torch.float64)]))
        return float(loss[0] / loss[1]) if loss[1] else float("nan")

    def global_state(self) -> dict:
        return self.state

    @property
    def steps_done(self) -> int:
        return self.round * self.K

    def state_dict(self) -> dict:
        return {"round": self.round, "momentum": _cpu(self.momentum)}

    def load_state_dict(self, d: dict, weights: dict):
        self.flat, self.round = self.layout.flatten(weights, self.env.device), int(d["round"])
        self.momentum = _to(d["momentum"], self.env.device)


class LocalSGD(Loft):
    """S full replicas, averaged every K steps: a LoFT round with no partitioned block."""
    combine = staticmethod(mean_of_workers)  # its own rule: an edit of LoFT's leaves the baseline alone
    combine_momentum = staticmethod(mean_of_workers)

    def split_blocks(self, model):
        return []


# ---------------------------------------------------------------------- Dense
@contextlib.contextmanager
def counting_all_reduce(comm: Comm):
    """Count the payload of every deepspeed.comm.all_reduce issued inside (engine gradients)."""
    import deepspeed.comm as dcomm
    real = dcomm.all_reduce

    def counted(tensor, *args, **kwargs):
        comm.bytes_sent += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    dcomm.all_reduce = counted
    try:
        yield
    finally:
        dcomm.all_reduce = real


class Dense:
    """The full model; one global batch per step split into `micro` chunks (gradient accumulation
    in one process, the chunks shared out among ranks under the launcher).

    Also the trainer of 04: `tcfg` is the training section (cfg.pretrain or cfg.finetune),
    `grad_hook(model)` edits the summed gradients before each update (masks, locked weights)."""

    def __init__(self, cfg, arch, init_state, train_set, env: DistEnv, comm: Comm, default_micro: int | None = None,
                 tcfg=None, stream_id: int = 0, grad_hook=None, schedule=None):
        tc = self.tc = tcfg or cfg.pretrain
        self.cfg, self.env, self.comm, self.grad_hook = cfg, env, comm, grad_hook
        self.micro = tc.micro_batches or default_micro or env.world
        if tc.batch_size % self.micro or self.micro % env.world:
            raise UserError(f"batch_size={tc.batch_size} must split into {self.micro} micro-batches, "
                            f"a multiple of the {env.world} ranks")
        model = build_model(arch)
        model.load_state_dict(init_state)
        self._init_schedule(cfg, tc, arch, train_set, stream_id, schedule)
        self.sgd = SGDStep(model, tc, env.device, self.schedule, grad_hook)
        self.model, self.opt = self.sgd.model, self.sgd.opt
        self.engine = None
        if env.distributed:
            import deepspeed
            self.engine, self.opt, _, _ = deepspeed.initialize(model=self.model, optimizer=self.opt, config={
                "train_batch_size": tc.batch_size, "train_micro_batch_size_per_gpu": tc.batch_size // self.micro,
                "gradient_accumulation_steps": self.micro // env.world, "gradient_clipping": tc.grad_clip,
                "steps_per_print": 10**9})

    def _init_schedule(self, cfg, tc, arch, train_set, stream_id: int, schedule=None):
        """The batch stream, step counters, lr schedule (the section's own unless given) and
        training FLOPs of a full-model trainer."""
        self.stream = Stream(train_set, tc.batch_size, cfg.seed, stream_id, device=self.env.device)
        self.steps_per_epoch = len(train_set) // tc.batch_size
        self.schedule = schedule or schedule_of(tc, self.steps_per_epoch, getattr(tc, "local_iters", None))  # K: pretraining only
        self.step = 0
        self.train_flops_per_step = tc.batch_size * flops_per_sample(build_model(arch), input_shape(cfg.data.dataset),
                                                                     backward=True)

    def my_chunks(self, t: int):
        x, y = self.stream.batch(t)
        per = self.micro // self.env.world
        chunks = list(zip(x.chunk(self.micro), y.chunk(self.micro)))
        return chunks[self.env.rank * per:(self.env.rank + 1) * per]

    def train_step(self, t: int) -> torch.Tensor:
        """Step t; its mean loss over this rank's chunks (a device scalar)."""
        if self.engine is None:
            return self.sgd(t, self.my_chunks(t))
        for g in self.opt.param_groups:
            g["lr"] = self.sgd.lr(t)
        losses = []
        for x, y in self.my_chunks(t):
            loss = self.sgd.forward_loss(self.engine, x, y)
            with counting_all_reduce(self.comm):
                self.engine.backward(loss)
                if self.grad_hook and self.engine.is_gradient_accumulation_boundary():
                    self.grad_hook(self.model)
                self.engine.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        steps = range(self.step, epoch * self.steps_per_epoch)
        comm = self.comm if self.env.distributed else None
        losses, checked = [], 0
        for t in _progress(steps, epoch, self.env, "steps"):
            losses.append(self.train_step(t))
            if len(losses) - checked == CHECK_EVERY or t == steps.stop - 1:
                check_finite(torch.stack(losses[checked:]), f"steps {steps.start + checked}-{t}", comm)
                checked = len(losses)
        self.step = epoch * self.steps_per_epoch
        total = torch.stack(losses).sum().double().cpu() if losses else torch.zeros((), dtype=torch.float64)
        loss = self.comm.sum_metric(torch.stack([total, torch.tensor(float(len(losses)), dtype=torch.float64)]))
        return float(loss[0] / loss[1])

    def global_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def steps_done(self) -> int:
        return self.step

    def state_dict(self) -> dict:
        return {"step": self.step, "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict, weights: dict):
        self.model.load_state_dict(weights)
        self.step = int(d["step"])
        self.opt.load_state_dict(d["opt"])


# ---------------------------------------------------------------------- GPipe
def pipeline_stages(model: nn.Module, stages: int) -> list[nn.Sequential]:
    """The layer list cut by SPEC 3's rule: floor(L/S) layers a stage, the remainder on the last."""
    layers = model.layer_list()
    bounds = [0] + [c + 1 for c in pipeline_cuts(len(layers), stages)] + [len(layers)]
    return [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])]


class GPipeCounter:
    """Hooks on the cut layers of the full model: bytes of the activations (forward) and of their
    gradients (backward) that a pipeline would send across each cut."""

    def __init__(self, model: nn.Module, stages: int, comm: Comm):
        layers = model.layer_list()
        for i in pipeline_cuts(len(layers), stages):
            layers[i].register_forward_hook(self._hook)
        self.comm = comm

    def _hook(self, module, inputs, out):
        if torch.is_grad_enabled() and module.training:
            self.comm.bytes_sent += out.numel() * out.element_size()
            if out.requires_grad:
                out.register_hook(self._count_grad)

    def _count_grad(self, grad):
        self.comm.bytes_sent += grad.numel() * grad.element_size()


class GPipe(Dense):
    def __init__(self, cfg, arch, init_state, train_set, env: DistEnv, comm: Comm):
        S = cfg.pretrain.workers
        if not env.distributed:
            super().__init__(cfg, arch, init_state, train_set, env, comm, default_micro=S)
            GPipeCounter(self.model, S, comm)
            return
        if env.world != S:
            raise UserError(f"pretrain.method=gpipe needs one rank per stage: launched {env.world} ranks, workers={S}")
        import deepspeed
        from deepspeed.pipe import PipelineModule
        tc = self.tc = cfg.pretrain
        self.cfg, self.env, self.comm, self.engine, self.grad_hook = cfg, env, comm, None, None
        self.micro = tc.micro_batches or S
        if tc.batch_size % self.micro:
            raise UserError(f"pretrain.batch_size={tc.batch_size} must split into {self.micro} micro-batches")
        self.model = build_model(arch)
        self.model.load_state_dict(init_state)
        pipe = PipelineModule(layers=pipeline_stages(self.model, S), num_stages=S, loss_fn=F.cross_entropy,
                              partition_method="uniform")
        self.opt = make_sgd(pipe, tc.lr, tc.momentum, tc.weight_decay)
        self.pipe_engine, self.opt, _, _ = deepspeed.initialize(model=pipe, optimizer=self.opt, config={
            "train_batch_size": tc.batch_size, "train_micro_batch_size_per_gpu": tc.batch_size // self.micro,
            "gradient_accumulation_steps": self.micro, "gradient_clipping": tc.grad_clip, "steps_per_print": 10**9})
        self._count_pipeline_sends()
        self._init_schedule(cfg, tc, arch, train_set, stream_id=0)
        self.owned = self._owned_keys(pipe)

    def _count_pipeline_sends(self):
        """Wrap the engine's two send instructions (activations forward, input gradients back) in
        this engine's copy of its instruction table, counting what each hands to p2p.send."""
        from deepspeed.runtime.pipe import schedule
        comm, table = self.comm, dict(type(self.pipe_engine)._INSTRUCTION_MAP)
        send_act, send_grad = table[schedule.SendActivation], table[schedule.SendGrad]

        def act(eng, buffer_id):
            out = eng.pipe_buffers["outputs"][buffer_id]
            comm.bytes_sent += out.numel() * out.element_size()
            return send_act(eng, buffer_id)

        def grad(eng, buffer_id):
            g = eng.pipe_buffers["inputs"][buffer_id].grad
            comm.bytes_sent += g.numel() * g.element_size()
            return send_grad(eng, buffer_id)

        table[schedule.SendActivation], table[schedule.SendGrad] = act, grad
        self.pipe_engine._INSTRUCTION_MAP = table

    def _owned_keys(self, pipe) -> list[str]:
        mine = {id(t) for t in list(pipe.parameters()) + list(pipe.buffers())}
        full = dict(self.model.state_dict(keep_vars=True))
        return [k for k, t in full.items() if id(t) in mine]

    def train_step(self, t: int) -> float:
        if not self.env.distributed:
            return super().train_step(t)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(t, self.schedule)
        x, y = self.stream.batch(t)
        loss = self.pipe_engine.train_batch(data_iter=iter(list(zip(x.chunk(self.micro), y.chunk(self.micro)))))
        return loss.detach().reshape(())  # every stage gets the same (broadcast) loss

    def global_state(self) -> dict:
        """Collective: each stage contributes the tensors it owns; every rank gets the full model."""
        if not self.env.distributed:
            return super().global_state()
        full = self.model.state_dict()
        parts = [None] * self.env.world
        torch.distributed.all_gather_object(parts, {k: full[k].detach().cpu() for k in self.owned})
        merged = {k: v for p in parts for k, v in p.items()}
        return {k: merged[k].clone() for k in full}

    def state_dict(self) -> dict:
        if self.env.distributed:  # each stage holds its own optimizer state: not saved (yet)
            return {"step": self.step, "opt": None}
        return super().state_dict()

    def load_state_dict(self, d: dict, weights: dict):
        if d["opt"] is None:
            raise UserError("--resume of a multi-rank gpipe run is not supported (optimizer state is per stage)")
        super().load_state_dict(d, weights)


METHODS = {"loft": Loft, "localsgd": LocalSGD, "dense": Dense, "gpipe": GPipe}
