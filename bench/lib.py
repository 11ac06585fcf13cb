"""Plain helpers for the benchmarks: run a stage script in-process, read its outputs.

The benchmarks never re-implement a stage: they call the stage scripts' `main` with `--set`
overrides, exactly as a user would from the shell, and read the files the stages write.
"""
from __future__ import annotations

import argparse
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
    name = f"{tag}_{sets.get('finetune.mode', 'finetune')}"  # named here: the benchmarks read it back
    out = run_dir / f"finetune_{name}"
    if not (out / "result.json").exists():
        run_stage("03_prune", config, run_dir, sets, "--force", "--tag", tag)
        run_stage("04_finetune", config, run_dir, sets, "--force", "--ticket", str(run_dir / f"prune_{tag}/ticket.pt"),
                  "--tag", name)
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
    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"commit {commit()}")


def commit() -> str:
    """The repository's short commit hash for result stamps; "unknown" (with one note on stderr) where
    git is not installed or this is no git checkout, e.g. a copied tree on a lent GPU machine."""
    import subprocess
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError as e:  # no git executable
        print(f"note: commit stamp 'unknown' (git: {e.strerror or type(e).__name__})", file=sys.stderr)
        return "unknown"
    if done.returncode != 0 or not done.stdout.strip():
        print("note: commit stamp 'unknown' (not a git checkout here)", file=sys.stderr)
        return "unknown"
    return done.stdout.strip()


def add_run_args(ap: argparse.ArgumentParser, epochs: int, finetune_epochs: int, runs: str) -> None:
    """The options of a one-table accuracy benchmark (bench/overlap.py, bench/vit.py)."""
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--finetune-epochs", type=int, default=finetune_epochs)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared/data"))
    ap.add_argument("--runs", default=runs, help="run folders (resumed if cut off)")
    ap.add_argument("--out", default=str(REPO / "bench/results"))


def write_results(out_dir: str | Path, name: str, title: str, script: str, argv, table: list[str], rows: list) -> None:
    """OUT/NAME.md (the title, the command, the machine and commit, then `table`) and OUT/NAME.json
    (`rows`); the Markdown is printed too."""
    command = " ".join(["python", script, *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine()}", "", *table])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(text)


def bench_args(doc: str, name: str, config: str, smoke_sets: dict, argv=None):
    """The options every accuracy benchmark takes → (args, extra --set overrides, seeds, runs, out)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--config", default=str(REPO / config))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: checks the pipeline in minutes")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    p.add_argument("--runs", default=None, help=f"where the runs go (default: runs/bench_{name}[_smoke])")
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage run (dist.threads_per_rank)")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    extra = dict(smoke_sets) if args.smoke else {}
    if args.threads:
        extra["dist.threads_per_rank"] = args.threads
    if args.data_root:
        extra["data.root"] = args.data_root
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.smoke else None]
    runs = Path(args.runs or REPO / f"runs/bench_{name}{'_smoke' if args.smoke else ''}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, extra, seeds, runs, out
