"""The one place that knows about distribution.

`setup_distributed` reads RANK / LOCAL_RANK / WORLD_SIZE (set by the DeepSpeed launcher,
torchrun or a hostfile launch; mpirun's and srun's own variables are mapped onto them), so plain
`python` runs without any process group. `agreed` and `from_main` carry what one rank did alone
(rank 0's writes and reads, a node's data preparation) to the others. `Comm` wraps the few
`deepspeed.comm` collectives the stages use and counts the payload bytes this rank hands to
each of them (SPEC section 3). Faults, launchers and the NCCL settings: docs/multigpu.md.
"""
from __future__ import annotations

import importlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from common.errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _skip_shm_op_build():
    """DeepSpeed JIT-compiles a shared-memory op (used only for inference all-reduce) on CPU
    init, ~1 min on 2 cores. The stages never use it, so the build is replaced by a no-op."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch` is shadowed
    ds_torch.build_shm_op = lambda: None


def pick_device(kind: str, local_rank: int, local_world: int) -> torch.device:
    """dist.device → this rank's device. A host with fewer GPUs than ranks is refused (one line on
    each rank) rather than left to fail on `cuda:N` deep inside the first CUDA call."""
    cuda = torch.cuda.is_available()
    if kind == "cpu" or (kind == "auto" and not cuda):
        return torch.device("cpu")
    if not cuda:
        raise UserError("dist.device=cuda: no CUDA GPU is visible here (use --set dist.device=cpu)")
    gpus = torch.cuda.device_count()
    if local_world > gpus:
        raise UserError(f"{local_world} ranks on this host but {gpus} CUDA GPU(s): run plain `python` (one "
                        "process trains the S workers in turn on one GPU) or add --set dist.device=cpu "
                        "(gloo ranks on the CPU)")
    return torch.device(f"cuda:{local_rank}")


def configure_kernels(device: torch.device, deterministic: bool):
    """dist.deterministic, both ways (a process may run several stages): deterministic kernels
    that raise on an op without one, or cuDNN autotuning. Call before any CUDA work: cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it first starts. The CPU kernels used here are deterministic
    anyway; the flag is set there too, so the same code runs on both."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"


# mpirun and srun start the ranks themselves and say who is who in their own variables.
MPI_VARIABLES = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
                 "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_WORLD_SIZE": "OMPI_COMM_WORLD_LOCAL_SIZE"}


def launcher_ranks(environ) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE to set from an mpirun (Open MPI) or srun
    (SLURM) launch; {} when RANK is already set (DeepSpeed, torchrun) or no launcher started us.
    SLURM counts only inside an srun step (SLURM_STEP_NUM_TASKS): a batch script's plain
    `python` sees SLURM_PROCID too but is one process. MASTER_ADDR/MASTER_PORT must be given."""
    if "RANK" in environ:
        return {}
    if "OMPI_COMM_WORLD_RANK" in environ:
        launcher = "mpirun"
        ranks = {k: environ.get(v, "") for k, v in MPI_VARIABLES.items()}
    elif "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        launcher = "srun"
        ranks = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
                 "LOCAL_RANK": environ.get("SLURM_LOCALID", ""),
                 "LOCAL_WORLD_SIZE": _tasks_on_each_node(environ.get("SLURM_STEP_TASKS_PER_NODE", ""))}
    else:
        return {}
    missing = [k for k, v in ranks.items() if not v.isdigit()]
    if missing:
        raise UserError(f"started by {launcher} but its variables give no {', '.join(missing)}: launch with "
                        "`deepspeed` or `torchrun`, or set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE")
    if int(ranks["WORLD_SIZE"]) > 1 and not all(environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")):
        raise UserError(f"started by {launcher} as {ranks['WORLD_SIZE']} ranks but MASTER_ADDR / MASTER_PORT are "
                        "not set: export them (the first node's address and a free port) before launching")
    return ranks


def _tasks_on_each_node(tasks_per_node: str) -> str:
    """SLURM_STEP_TASKS_PER_NODE ("4", "4(x2)", "4(x2),3") → the count when every node has the same, else ""."""
    counts = {m.group(1) for m in re.finditer(r"(\d+)(\(x\d+\))?", tasks_per_node)}
    return counts.pop() if len(counts) == 1 else ""


# Under NCCL a collective whose peer died or hung would be caught by a watchdog thread that ends
# the process with a C++ trace. Blocking wait has no watchdog: the collective itself raises in
# Python after dist.timeout_s, and `common.cli.run_stage` turns that into one line (exit 3).
# Async error handling 1 (abort the communicator, then end) applies only where a user turns
# blocking wait off. Set before the process group exists; a value the user exported wins.
NCCL_ERROR_HANDLING = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def setup_distributed(timeout_s: int = 300, threads_per_rank: int = 0, device: str = "auto",
                      deterministic: bool = False) -> DistEnv:
    os.environ.update(launcher_ranks(os.environ))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
    dev = pick_device(device, local_rank, local_world)
    configure_kernels(dev, deterministic)  # before the first CUDA work (cuBLAS workspace)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Ranks on one host share its cores: without this each would start cores-many threads.
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    env = DistEnv(rank, world, local_rank, local_world, dev)
    if env.distributed:
        os.environ["DS_ACCELERATOR"] = dev.type  # deepspeed picks its accelerator at import
        for name, value in NCCL_ERROR_HANDLING.items():
            os.environ.setdefault(name, value)
        import deepspeed
        if dev.type == "cpu":
            _skip_shm_op_build()
        deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    return env


def setup_from_config(dist_cfg) -> DistEnv:
    """setup_distributed with the config's dist section."""
    return setup_distributed(dist_cfg.timeout_s, dist_cfg.threads_per_rank, dist_cfg.device, dist_cfg.deterministic)


def one_line(e: BaseException) -> str:
    """An error as the single line a user reads: a UserError's own text, else its type and first line."""
    if isinstance(e, UserError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextmanager
def agreed(env: DistEnv | None, what: str):
    """Leave the block on every rank only once all ranks have run it, each knowing whether any failed.

    For work some ranks do alone (rank 0's writes, each node's data preparation), in place of the
    barrier that would follow it: the ranks exchange a one-line status instead, so a failure on
    one rank ends every rank at once, not after dist.timeout_s in a barrier (or an NCCL watchdog
    abort). The rank that failed raises its own error; the others one line naming it."""
    if env is None or not env.distributed:
        yield
        return
    error = None
    try:
        yield
    except BaseException as e:  # an interrupt too: the peers must not wait for this rank
        error = e
    statuses = [None] * env.world
    try:
        torch.distributed.all_gather_object(statuses, None if error is None else one_line(error))
    except Exception:
        if error is None:
            raise  # a dead peer: run_stage's one line
    else:
        if any(s is not None for s in statuses):  # every rank stops here: leave the group together (as teardown)
            torch.distributed.destroy_process_group()
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        r, status = failed[0]
        raise UserError(f"rank {r} failed {what}: {status}")


def from_main(env: DistEnv | None, obj):
    """Rank 0's `obj` on every rank (pickled through the process group): a rank never needs to
    see rank 0's files."""
    if env is None or not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_main(env: DistEnv | None, what: str, work, *args):
    """work(*args) on rank 0 alone (a check of the run folder, a read of last.pt); its result on
    every rank, or its error: rank 0 raises it, the others one line naming it (`agreed`)."""
    result = None
    with agreed(env, what):
        if env is None or env.is_main:
            result = work(*args)
    return from_main(env, result)


def teardown(env: DistEnv):
    """Barrier, then destroy the group: without it ~1 run in 10 aborted at exit (DEEPSPEED.md).
    Called after a clean finish only: after an error a barrier would wait for a peer that may be
    gone, and the exiting process releases the group anyway."""
    if env.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank died, hung past dist.timeout_s or lost its link."""
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout"))


WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Comm:
    """Collectives over workers, with payload byte counting (SPEC section 3).

    A payload is the 1-D tensor one worker hands over per collective. In one process the S
    workers run in turn and are the (virtual) ranks; under the launcher a rank hands its
    workers' payloads in one all-gather. Counted: the bytes handed over, in the wire dtype.
    Float payloads travel in `wire_dtype` and come back as fp32, so sums are taken in fp32.
    """

    def __init__(self, env: DistEnv, wire_dtype: str = "fp32"):
        self.env = env
        self.wire = WIRE_DTYPES[wire_dtype]
        self.bytes_sent = 0  # payload handed to collectives by this rank, in the dtype sent

    def _count(self, t: torch.Tensor):
        self.bytes_sent += t.numel() * t.element_size()

    def _on_wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.wire) if t.is_floating_point() else t

    def gather_workers(self, payloads: dict[int, torch.Tensor], sizes: dict[int, int]) -> dict[int, torch.Tensor]:
        """Every worker's 1-D payload; `sizes` gives all S workers' lengths (known on every rank)."""
        dtype = next(iter(payloads.values())).dtype
        if not self.env.distributed:
            wired = {w: self._on_wire(p) for w, p in payloads.items()}
            for p in wired.values():
                self._count(p)
            return {w: p.to(dtype) for w, p in wired.items()}
        import deepspeed.comm as dcomm
        per = len(sizes) // self.env.world
        owners = [list(range(r * per, (r + 1) * per)) for r in range(self.env.world)]
        width = max(sum(sizes[w] for w in ws) for ws in owners)  # all_gather needs equal lengths
        local = self._on_wire(torch.cat([payloads[w] for w in sorted(payloads)]))
        buf = torch.nn.functional.pad(local, (0, width - len(local))).to(self.env.device)
        self._count(buf)
        out = [torch.empty_like(buf) for _ in range(self.env.world)]
        dcomm.all_gather(out, buf)
        gathered = {}
        for ws, flat in zip(owners, out):
            flat, offset = flat.to(local.device, dtype), 0
            for w in ws:
                gathered[w] = flat[offset:offset + sizes[w]]
                offset += sizes[w]
        return gathered

    def gather_stack(self, payloads: dict[int, torch.Tensor], workers: int) -> torch.Tensor:
        """All S workers' equal-length payloads as one [S, n] stack in worker order, on every rank
        (the same order in one process and under the launcher)."""
        n = len(next(iter(payloads.values())))
        gathered = self.gather_workers(payloads, {w: n for w in range(workers)})
        return torch.stack([gathered[w] for w in range(workers)])

    def sum_metric(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce for bookkeeping (losses, byte counters): not counted as training traffic."""
        if not self.env.distributed:
            return t
        import deepspeed.comm as dcomm
        buf = t.to(self.env.device)
        dcomm.all_reduce(buf)
        return buf.to(t.device)

    def barrier(self):
        if self.env.distributed:
            torch.distributed.barrier()


def workers_of_rank(workers: int, env: DistEnv) -> list[int]:
    """Worker ids run by this rank: S/W consecutive ids from the global rank."""
    if workers % env.world:
        raise UserError(f"pretrain.workers={workers} is not a multiple of the {env.world} launched ranks")
    per = workers // env.world
    return list(range(env.rank * per, (env.rank + 1) * per))
