"""Shared fixtures: the real CIFAR-10 in ../shared/data, tiny configs, stage runners."""
from __future__ import annotations

import copy
import importlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOFT_DATA", REPO.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# A narrow PreActResNet-18 on 640 real CIFAR-10 images: one epoch is 20 steps of 32. On a CUDA
# machine it trains on the GPU with deterministic kernels, so resumed = uninterrupted there too;
# tests that compare one process with several ranks pin CPU_RANKS (gloo ranks on any machine).
TINY = {
    "seed": 0,
    "model": {"arch": "preresnet18", "width": 0.125},
    "data": {"root": str(DATA), "train_subset": 640, "test_subset": 200, "eval_batch_size": 200},
    "pretrain": {"method": "loft", "workers": 2, "local_iters": 5, "epochs": 2, "batch_size": 32,
                 "lr": 0.05, "bn_recal_batches": 2},
    "dist": {"threads_per_rank": 1, "deterministic": True},
}
CPU_RANKS = {"threads_per_rank": 1, "device": "cpu"}


def _merge(a, b):
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs: one intra-op thread is ~100x faster than two fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(arch, seed=0):
    """A model with random BN affine parameters and running statistics, so BN slicing matters."""
    from common.models import build_model
    torch.manual_seed(seed)
    model = build_model(arch)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _data_present():
    if not (DATA / "cifar-10-batches-py").is_dir():
        pytest.exit(f"real CIFAR-10 not found under {DATA} (set LOFT_DATA)", returncode=3)


@pytest.fixture
def tiny_config(tmp_path):
    """Write a tiny config (with nested overrides) and return its path."""
    def make(name="tiny", **overrides):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_merge(TINY, overrides)))
        return path
    return make


def brought_model_config(tmp_path: Path, name: str, model: dict, **pretrain) -> Path:
    """A small config for a model brought by name (tests/test_byom.py, test_vit.py): 256 real
    CIFAR-10 images, LoFT, L1 pruning at 50 %, CPU ranks; `pretrain` overrides its section."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "seed": 0, "model": model,
        "data": {"root": str(DATA), "train_subset": 256, "test_subset": 100, "eval_batch_size": 100},
        "pretrain": {"method": "loft", "workers": 2, "local_iters": 4, "epochs": 1, "batch_size": 32,
                     "lr": 0.02, "bn_recal_batches": 1, **pretrain},
        "prune": {"kind": "l1", "ratio": 0.5},
        "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.01, "schedule": "constant"},
        "dist": CPU_RANKS}))
    return cfg


def stage(name: str):
    """Import a numbered stage script as a module (e.g. stage('01_pretrain_loft'))."""
    return importlib.import_module(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], launcher: list[str] | None = None, timeout=600) -> subprocess.CompletedProcess:
    """Run a stage script as a user would: python SCRIPT ... or deepspeed ... SCRIPT ..."""
    cmd = (launcher or [sys.executable]) + args
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **CLI_ENV}, capture_output=True, text=True,
                          timeout=timeout)


def start_cli(args: list[str]) -> subprocess.Popen:
    """`run_cli` in the background (python SCRIPT ...): the caller waits for it or kills it."""
    return subprocess.Popen([sys.executable] + args, cwd=REPO, env={**os.environ, **CLI_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def deepspeed_launcher(ranks: int) -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    return [str(exe), "--num_gpus", str(ranks), "--master_port", str(free_port())]


def pruned_lineage(root: Path, config: dict) -> tuple[Path, Path]:
    """01 (the tiny config merged with `config`) → 03 structured 50 % and magnitude keep-20 %
    tickets in root/run: the upstream of the fine-tuning tests."""
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(_merge(TINY, config)))
    run = root / "run"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(run)])
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run)])
    stage("03_prune").main(["--config", str(cfg), "--run-dir", str(run),
                            "--set", "prune.kind=magnitude", "--set", "prune.ratio=0.8"])
    return cfg, run


def run_finetune(cfg, run, ticket: str, *sets: str):
    """04 in process on run/TICKET/ticket.pt; --force since tests may share an output folder."""
    args = ["--config", str(cfg), "--run-dir", str(run), "--force", "--ticket", str(run / ticket / "ticket.pt")]
    for s in sets:
        args += ["--set", s]
    stage("04_finetune").main(args)


def interrupt_in_epoch(monkeypatch, epoch: int):
    """LoFT dies inside `epoch` after one round of it (its work lost, as in a crash); returns undo()."""
    import common.pretrain as P
    real = P.Loft.train_epoch

    def dies(self, e):
        if e == epoch:
            self.run_round(self.round)
            raise KeyboardInterrupt
        return real(self, e)

    monkeypatch.setattr(P.Loft, "train_epoch", dies)
    return lambda: monkeypatch.setattr(P.Loft, "train_epoch", real)


# ------------------------------------------------- a finished lineage (faults, lineage tests)
FT = {"pretrain": {"epochs": 2}, "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.05}}



def main_of(script, cfg, run, *extra, sets=()):
    args = ["--config", str(cfg), "--run-dir", str(run), *extra]
    for s in sets:
        args += ["--set", s]
    stage(script).main(args)



def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "[WARNING]" not in l]



def files_with_mtimes(folder):
    """Every file under `folder`: its bytes and modification time (a rewrite with equal bytes shows too)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}



@pytest.fixture(scope="session")


def finished_lineage(tmp_path_factory):
    """01 (2 epochs) → 03 (structured 50 %) → 04 (1 epoch, finetune) in root/run, finished (one per
    test process: tests copy it with `run_copy` before changing anything)."""
    root = tmp_path_factory.mktemp("finished_lineage")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(_merge(TINY, FT)))
    run = root / "run"
    main_of("01_pretrain_loft", cfg, run)
    main_of("03_prune", cfg, run)
    main_of("04_finetune", cfg, run)
    return cfg, run



@pytest.fixture


def run_copy(finished_lineage, tmp_path):
    cfg, run = finished_lineage
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return cfg, copy
