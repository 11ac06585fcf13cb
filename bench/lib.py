"""Plain helpers for the benchmarks: run a stage script in-process, read its outputs, format the tables.

The benchmarks never re-implement a stage: they call the stage scripts' `main` with `--set`
overrides, exactly as a user would from the shell, and read the files the stages write.
"""
from __future__ import annotations

import argparse
import csv
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


def read_json(path: Path) -> dict | list | None:
    """The file's JSON; None where the stage has not written it (yet)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def last_row(path: Path) -> dict:
    """The last row of a metrics.csv; {} where there is none (yet)."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def mean_std(values: list) -> str:
    """Accuracies over seeds: '50.17 ± 1.66', one value alone '53.05', '—' when none (None left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


SI_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(x: float, unit: str = "", fmt: str = ".2f", spread: float = 0.0) -> str:
    """A count with the prefix that fits it, as tables that read at CPU-smoke and paper scale alike:
    si(7.86e12, "FLOP") = '7.86 TFLOP', si(0, "B") = '0 B' (below 1000: a whole number). Without a
    unit the prefix sticks to the number and a nonzero `spread` (a std over seeds) follows in the
    same prefix: si(2.14e6, fmt=".3g", spread=2.1e6) = '2.14M ± 2.1M' (bench/report.py's cells)."""
    factor, prefix = next(((f, p) for f, p in SI_PREFIXES if abs(x) >= f), (1, ""))
    number = f"{x / factor:{fmt}}" if factor > 1 else f"{x:.0f}"
    spread_text = f" ± {spread / factor:.2g}" if spread else ""
    if unit:
        return f"{number}{spread_text} {prefix}{unit}"
    return f"{number}{prefix}" + (f"{spread_text}{prefix}" if spread else "")


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
