"""Plain helpers for the benchmarks: run a stage script in-process, read its outputs.

The benchmarks never re-implement a stage: they call the stage scripts' `main` with `--set`
overrides, exactly as a user would from the shell, and read the files the stages write.
"""
from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def stage(name: str):
    return importlib.import_module(name)


def run_stage(script: str, config: str | Path, run_dir: Path, sets: dict, *flags: str):
    args = ["--config", str(config), "--run-dir", str(run_dir), *flags]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    stage(script).main(args)


def pretrain_done(run_dir: Path, epochs: int) -> bool:
    return (run_dir / "pretrain" / f"epoch_{epochs:03d}.pt").exists() and (run_dir / "pretrain/comm.json").exists()


def pretrain(config, run_dir: Path, sets: dict, epochs: int):
    """01, skipped when finished, resumed when a previous benchmark run was cut off."""
    if pretrain_done(run_dir, epochs):
        return
    flags = ("--resume",) if (run_dir / "pretrain/last.pt").exists() else ("--force",)
    run_stage("01_pretrain_loft", config, run_dir, sets, *flags)


def prune_and_finetune(config, run_dir: Path, sets: dict, tag: str) -> dict:
    """03 then 04 (skipped when its result exists); returns result.json."""
    out = run_dir / f"finetune_{tag}_{sets.get('finetune.mode', 'finetune')}"
    if not (out / "result.json").exists():
        run_stage("03_prune", config, run_dir, sets, "--force", "--tag", tag)
        run_stage("04_finetune", config, run_dir, sets, "--force", "--ticket", str(run_dir / f"prune_{tag}/ticket.pt"))
    return read_json(out / "result.json")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def machine() -> str:
    import os
    import platform
    import subprocess
    import torch
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"commit {commit or '?'}")
