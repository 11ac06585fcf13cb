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
from common.progress import EpochBar
from common.loft import FlatLayout, RoundExchange, draw_partition, mean_of_workers, worker_arch
from common.models import build_model
from common.narrowing import SlicePlan
from common.selection import partitioned_blocks
from common.schedule import schedule_of
from common.train import SGDStep, check_finite, flat_buffers, lr_at, make_sgd

RECAL_STREAM = 9_000_001  # data stream id of the fixed BN-recalibration batches
CHECK_EVERY = 100          # dense steps between finiteness checks (each one host sync)


def recal_stream(train_set, cfg) -> Stream:
    return Stream(train_set, min(cfg.data.eval_batch_size, len(train_set)), cfg.seed, RECAL_STREAM)


def _epoch_bar(epoch: int, steps: int, env: DistEnv) -> EpochBar:
    """A bar of the epoch's steps on a terminal (rank 0), nothing in a log: the stage prints one line per epoch."""
    return EpochBar(f"epoch {epoch}", steps, env.is_main)


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
@torch.no_grad()
def momentum_into_flat_buffers(sgds: list[SGDStep]) -> tuple[dict[torch.dtype, torch.Tensor] | None, list[dict]]:
    """One flat buffer per dtype holding the SGD momentum of every parameter of `sgds`' models, and
    per SGDStep its buffers by parameter name (views into the flat buffers), attached to its
    optimizer: SGD updates them in place, so a round resets, loads and reads them all with one
    operator per dtype (common.loft.RoundExchange). None without momentum (SGD keeps no buffers)."""
    if not sgds or sgds[0].tc.momentum == 0:
        return None, [{} for _ in sgds]
    named = [list(sgd.model.named_parameters()) for sgd in sgds]
    flats, pieces = flat_buffers([p for params in named for _, p in params])
    by_sgd, i = [], 0
    for sgd, params in zip(sgds, named):
        mine = pieces[i:i + len(params)]
        sgd.attach_momentum(mine)
        by_sgd.append({k: buf for (k, _), buf in zip(params, mine)})
        i += len(params)
    return flats, by_sgd


@torch.no_grad()
def fresh_momentum(flats: dict[torch.dtype, torch.Tensor] | None):
    """Momentum as at a fresh start (LoFT's default every round), one fill per dtype. -0.0 is the
    exact additive identity: with dampening 0 the first step's buf = momentum·buf + grad is then
    grad bit for bit, as from no buffer (+0.0 would turn a -0.0 gradient into +0.0)."""
    for flat in (flats or {}).values():
        flat.fill_(-0.0)


class SequentialWorkers:
    """This rank's LoFT / Local SGD workers one after another: each its own subnetwork module,
    optimizer and batch stream, built once (a worker's widths are the same every round). Their
    tensors and momentum buffers live in flat buffers (`flats`, `momentum_flats`) into which the
    round exchange loads each round's slices in place."""

    def __init__(self, arch_of: dict[int, dict], tcfg, device, schedule, streams: dict[int, Stream],
                 importable: frozenset[str] = frozenset()):
        self.sgds = {w: SGDStep(build_model(a, importable), tcfg, device, schedule, compile=tcfg.compile)
                     for w, a in arch_of.items()}
        self.streams = streams
        self.flats = into_flat_buffers([sgd.model for sgd in self.sgds.values()])
        self.module_states = {w: sgd.model.state_dict() for w, sgd in self.sgds.items()}  # views into `flats`
        self.momentum_flats, momenta = momentum_into_flat_buffers(list(self.sgds.values()))
        self.momentum_states = dict(zip(self.sgds, momenta))

    def train(self, steps: range) -> torch.Tensor:
        """K local steps of each worker; the sum of all their losses (a device scalar; summed per
        worker first, the order a fused round sums in)."""
        sums = []
        for w, sgd in self.sgds.items():
            sgd.model.train()
            sums.append(torch.stack([sgd(t, [self.streams[w].batch(t)]) for t in steps]).sum())
        return torch.stack(sums).sum()


class FusedWorkers:
    """This rank's LoFT / Local SGD workers as one fused module (common.fused): one forward,
    backward and update per step for all of them. Same interface as `SequentialWorkers`."""

    def __init__(self, arch_of: dict[int, dict], tcfg, device, schedule, streams: dict[int, Stream],
                 importable: frozenset[str] = frozenset()):
        self.ids = sorted(arch_of)
        sub = build_model(arch_of[self.ids[0]], importable)
        n = len(self.ids)
        self.sgd = SGDStep(fuse(sub, n), tcfg, device, schedule, loss_fn=fused_criterion(n), compile=tcfg.compile)
        self.streams = streams
        self.flats = into_flat_buffers([self.sgd.model])
        shapes = {k: v.shape for k, v in sub.state_dict().items()}
        self.module_states = dict(zip(self.ids, worker_views(self.sgd.model.state_dict(), shapes, n)))
        self.momentum_flats, (fused_momentum,) = momentum_into_flat_buffers([self.sgd])
        self.momentum_states = dict(zip(self.ids, worker_views(fused_momentum, shapes, n))) if fused_momentum else {}

    def train(self, steps: range) -> torch.Tensor:
        """K fused steps; the sum of all workers' losses over them."""
        self.sgd.model.train()
        losses = []
        for t in steps:
            xs, ys = zip(*(self.streams[w].batch(t) for w in self.ids))
            losses.append(self.sgd(t, [(torch.cat(xs, 1), torch.stack(ys, 1))]))
        return torch.stack(losses).sum()


class Loft:
    # How the S workers' copies of a shared tensor ([S, n] stack) become the new global value, and
    # the same for carried momentum. One-function ablations: a method's rule is its own attribute.
    combine = staticmethod(mean_of_workers)
    combine_momentum = staticmethod(mean_of_workers)

    def __init__(self, cfg, arch: dict, init_state: dict, train_set, env: DistEnv, comm: Comm):
        self.cfg, self.arch, self.env, self.comm = cfg, arch, env, comm
        pc = cfg.pretrain
        self.S, self.K = pc.workers, pc.local_iters
        model = build_model(arch, cfg.importable)
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
        self.round = 0
        part = draw_partition(self.blocks, self.S, cfg.seed, 0)  # sizes per worker are the same every round
        self.train_flops_per_step = pc.batch_size * sum(
            flops_per_sample(build_model(worker_arch(arch, part, w), cfg.importable), input_shape(cfg.data),
                             backward=True) for w in range(self.S))
        streams = {w: Stream(train_set, pc.batch_size, cfg.seed, w, device=env.device,
                             shard=(w, self.S) if shard else None) for w in self.my_workers}
        arch_of = {w: worker_arch(arch, part, w) for w in self.my_workers}
        if pc.fused_workers:
            self.check_fusable(part)
        self.workers = (FusedWorkers if pc.fused_workers else SequentialWorkers)(
            arch_of, pc, env.device, self.schedule, streams, cfg.importable)
        self.exchange = RoundExchange(self.plan, self.layout, part, self.S, self.workers.module_states,
                                      self.workers.flats, env.device)
        # carried momentum: a global state of its own (parameters only), moved by the same exchange
        self.momentum_flat, self.momentum_exchange = None, None
        if pc.carry_momentum and self.workers.momentum_flats is not None:
            params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
            self.momentum_layout = FlatLayout.of(params)
            self.momentum_flat = self.momentum_layout.flatten(params, env.device)
            self.momentum_exchange = RoundExchange(self.plan, self.momentum_layout, part, self.S,
                                                   self.workers.momentum_states, self.workers.momentum_flats,
                                                   env.device)

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
        narrowest = min(blocks, key=lambda b: b.mid // b.group.segments)   # a worker takes channels of every segment
        if self.S > narrowest.mid // narrowest.group.segments:
            per = f" per conv group of {narrowest.group.segments}" if narrowest.group.segments > 1 else ""
            raise UserError(f"pretrain.workers={self.S} exceeds the narrowest partitioned block "
                            f"({narrowest.mid // narrowest.group.segments} channels{per})")
        return blocks

    def check_fusable(self, part: dict):
        """Fused workers need equal shapes: S must divide every partitioned block's width (its
        width per conv group where a grouped conv reads it)."""
        segments = {b.name: b.group.segments for b in self.blocks}
        for name, sets in part.items():
            if len({len(s) for s in sets}) > 1:
                mid = sum(len(s) for s in sets)
                per = f" ({segments[name]} conv groups of {mid // segments[name]})" if segments[name] > 1 else ""
                raise UserError(f"pretrain.fused_workers: block {name} has {mid} channels{per}, not divisible by "
                                f"pretrain.workers={self.S} (the fused workers need equal widths)")

    def run_round(self, r: int) -> torch.Tensor:
        """Partition, train this rank's workers for K steps each, aggregate. Returns the losses'
        sum over this rank's workers and steps (a device scalar). The weights, and the momentum
        when it is carried, go through the round exchange (common.loft.RoundExchange)."""
        part = draw_partition(self.blocks, self.S, self.cfg.seed, r)
        steps = range(r * self.K, (r + 1) * self.K)
        self.exchange.begin_round(part)
        self.exchange.load(self.flat)
        if self.momentum_exchange is not None:
            self.momentum_exchange.begin_round(part)
            self.momentum_exchange.load(self.momentum_flat)
        else:
            fresh_momentum(self.workers.momentum_flats)
        loss = self.workers.train(steps)
        new_flat = self.exchange.aggregate(self.flat, self.comm, self.combine)
        if self.momentum_exchange is not None:
            self.momentum_flat = self.momentum_exchange.aggregate(self.momentum_flat, self.comm, self.combine_momentum)
        check_finite(loss, f"round {r} (steps {steps.start}-{steps.stop - 1})",
                     self.comm if self.env.distributed else None)
        self.flat, self.round = new_flat, r + 1
        return loss

    def train_epoch(self, epoch: int) -> float:
        first, last = self.round, epoch_end_round(epoch, self.steps_per_epoch, self.K)
        losses = []
        with _epoch_bar(epoch, (last - first) * self.K, self.env) as bar:
            for r in range(first, last):
                losses.append(self.run_round(r))
                bar.update(self.K, losses[-1], self.K * len(self.my_workers))
        total = torch.stack(losses).sum().double().cpu() if losses else torch.zeros((), dtype=torch.float64)
        count = float(len(losses) * self.K * len(self.my_workers))
        loss = self.comm.sum_metric(torch.stack([total, torch.tensor(count, dtype=torch.float64)]))
        return float(loss[0] / loss[1]) if loss[1] else float("nan")

    def global_state(self) -> dict:
        return self.state

    @property
    def steps_done(self) -> int:
        return self.round * self.K

    @property
    def momentum(self) -> dict | None:
        """The carried momentum by parameter name (views into `momentum_flat`); None when not carried."""
        return None if self.momentum_flat is None else self.momentum_layout.views(self.momentum_flat)

    def state_dict(self) -> dict:
        return {"round": self.round, "momentum": _cpu(self.momentum)}

    def load_state_dict(self, d: dict, weights: dict):
        self.flat, self.round = self.layout.flatten(weights, self.env.device), int(d["round"])
        if self.momentum_flat is not None:
            self.momentum_flat = self.momentum_layout.flatten(d["momentum"], self.env.device)


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
        model = build_model(arch, cfg.importable)
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

    def _init_schedule(self, cfg, tc, arch: dict, train_set, stream_id: int, schedule=None):
        """The batch stream, step counters, lr schedule (the section's own unless given) and
        training FLOPs of a full-model trainer."""
        self.stream = Stream(train_set, tc.batch_size, cfg.seed, stream_id, device=self.env.device)
        self.steps_per_epoch = len(train_set) // tc.batch_size
        self.schedule = schedule or schedule_of(tc, self.steps_per_epoch, getattr(tc, "local_iters", None))  # K: pretraining only
        self.step = 0
        self.train_flops_per_step = tc.batch_size * flops_per_sample(build_model(arch, cfg.importable),
                                                                     input_shape(cfg.data),
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
        with _epoch_bar(epoch, len(steps), self.env) as bar:
            for t in steps:
                losses.append(self.train_step(t))
                bar.update(1, losses[-1])
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
        self.model = build_model(arch, cfg.importable)
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

    def train_step(self, t: int) -> torch.Tensor:
        """Step t; its mean loss (a device scalar), through the pipeline engine under the launcher."""
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
