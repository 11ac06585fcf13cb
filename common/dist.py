"""The one place that knows about distribution.

`setup_distributed` reads RANK / LOCAL_RANK / WORLD_SIZE (set by the DeepSpeed launcher,
torchrun or a hostfile launch), so plain `python` runs without any process group.
`Comm` wraps the few `deepspeed.comm` collectives the stages use and counts the payload
bytes this rank hands to each of them (SPEC section 3).
"""
from __future__ import annotations

import importlib
import os
import warnings
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
    """cuDNN autotuning for speed, or deterministic kernels (dist.deterministic) for runs that
    repeat bit for bit on CUDA. CPU kernels here are deterministic already: nothing to set."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS's first use
        # warn_only: the models' global average pool (output 1x1) has no flagged-deterministic CUDA
        # backward, but each input element receives exactly one addition there, so it is exact.
        torch.use_deterministic_algorithms(True, warn_only=True)
        warnings.filterwarnings("ignore", message="adaptive_avg_pool2d_backward_cuda does not have a deterministic")


def setup_distributed(timeout_s: int = 300, threads_per_rank: int = 0, device: str = "auto",
                      deterministic: bool = False) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
    dev = pick_device(device, local_rank, local_world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    configure_kernels(dev, deterministic)
    # Ranks on one host share its cores: without this each would start cores-many threads.
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    env = DistEnv(rank, world, local_rank, local_world, dev)
    if env.distributed:
        os.environ["DS_ACCELERATOR"] = dev.type  # deepspeed picks its accelerator at import
        import deepspeed
        if dev.type == "cpu":
            _skip_shm_op_build()
        deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    return env


def setup_from_config(dist_cfg) -> DistEnv:
    """setup_distributed with the config's dist section."""
    return setup_distributed(dist_cfg.timeout_s, dist_cfg.threads_per_rank, dist_cfg.device, dist_cfg.deterministic)


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
