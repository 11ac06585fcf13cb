"""Plain helpers for the benchmarks: run a stage script, read its outputs, format the tables.

The benchmarks never re-implement a stage: they run the stage scripts with `--set` overrides,
exactly as a user would from the shell, each in its own process, and read the files the stages
write. `run_stage` is the one way every benchmark runs a stage (bench/paper.py, overlap.py,
vit.py), and one rule, read from the stage's own folder, says how:

- finished: the files the stage writes last all exist -> skipped, its files stay as they are;
- cut off: no final output, but its folder holds last.pt (01 and 04 write it after every
  epoch) -> --resume, which continues after the last whole epoch;
- started, no epoch kept: its folder holds other files (config.yaml, epoch_000.pt, a partial
  distance/ or prune_TAG/) -> --force, which starts it over; nothing worth keeping is lost;
- fresh: its folder is missing or empty -> neither flag: there is nothing to resume or clear.

What each stage writes last, so what "finished" means, and why:
- 01: pretrain/comm.json, written after the last epoch's epoch_EEE.pt; both must exist.
  comm.json alone is also there after a finished run of fewer epochs (another --epochs or
  --epochs-scale into the same folder), which would then pass for the run asked for; with its
  last epoch file missing it is resumed instead, and 01 extends it (constant schedule) or
  refuses in one line (a schedule that spans the epochs). A longer finished run is not told
  apart: give each scale its own --runs folder. A run that pretrain.stop_on_emergence ended
  early has no last epoch file either; the benchmarks need every epoch, so it fails (below).
- 02: distance/summary.json, after the CSVs and plots.
- 03: prune_TAG/ticket.pt. A finished ticket is never cut again, e.g. while its fine-tuning is
  cut off: 04's resume checks that the ticket's content is the one it started from.
- 04: finetune_TAG/result.json, after final.pt.

A stage that exits non-zero, or exits 0 without its final output, raises `StageFailed`: no
caller loops on it or reads a half-made run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------ running a stage
class StageFailed(Exception):
    """A stage exited non-zero (`returncode`, its own) or exited 0 without its final output (1)."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.returncode = returncode


@dataclass
class Stage:
    """One stage command: SCRIPT --config CONFIG --run-dir RUN_DIR --set K=V ... FLAGS, writing
    into `folder`; `outputs` are the files it writes last (see the module docstring)."""
    name: str
    script: str
    config: str | Path  # relative to the repository or absolute
    run_dir: Path
    sets: dict
    folder: Path
    outputs: tuple[Path, ...]
    flags: list = field(default_factory=list)

    def finished(self) -> bool:
        return all(p.exists() for p in self.outputs)

    def start_flags(self) -> list[str]:
        """--resume for a cut-off run, --force for a started one with no epoch kept, none when fresh."""
        if (self.folder / "last.pt").exists():
            return ["--resume"]
        return ["--force"] if self.folder.is_dir() and any(self.folder.iterdir()) else []

    def command(self) -> list[str]:
        """The command line, run in the repository (configs name data roots relative to it), so its
        paths are absolute."""
        cmd = [sys.executable, self.script, "--config", str(REPO / self.config),
               "--run-dir", str(self.run_dir.absolute())]
        for k, v in self.sets.items():
            cmd += ["--set", f"{k}={v}"]
        return cmd + self.start_flags() + self.flags


def pretrain_stage(config, run_dir: Path, sets: dict, name: str | None = None) -> Stage:
    """01 into pretrain/; its last epoch file is named by the config's pretrain.epochs (the file's or a --set)."""
    from common.config import load_config
    epochs = load_config(REPO / config, [f"{k}={v}" for k, v in sets.items()]).pretrain.epochs
    out = run_dir / "pretrain"
    return Stage(name or f"{run_dir}:pretrain", "01_pretrain_loft.py", config, run_dir, sets, out,
                 (out / f"epoch_{epochs:03d}.pt", out / "comm.json"))


def distance_stage(config, run_dir: Path, sets: dict, name: str | None = None) -> Stage:
    out = run_dir / "distance"
    return Stage(name or f"{run_dir}:distance", "02_filter_distance.py", config, run_dir, sets, out,
                 (out / "summary.json",))


def prune_stage(config, run_dir: Path, sets: dict, tag: str, source: Path | None = None,
                name: str | None = None) -> Stage:
    """03 into prune_TAG, from the last pretraining epoch or `source` (--from)."""
    out = run_dir / f"prune_{tag}"
    return Stage(name or f"{run_dir}:prune {tag}", "03_prune.py", config, run_dir, sets, out, (out / "ticket.pt",),
                 ["--tag", tag] + (["--from", str(Path(source).absolute())] if source else []))


def finetune_stage(config, run_dir: Path, sets: dict, ticket: str, tag: str, name: str | None = None) -> Stage:
    """04 of prune_TICKET/ticket.pt into finetune_TAG."""
    out, ticket_file = run_dir / f"finetune_{tag}", run_dir / f"prune_{ticket}/ticket.pt"
    return Stage(name or f"{run_dir}:finetune {tag}", "04_finetune.py", config, run_dir, sets, out,
                 (out / "result.json",), ["--ticket", str(ticket_file.absolute()), "--tag", tag])


def run_stage(stage: Stage, log: Path | None = None, timeout: float | None = None) -> bool:
    """Run `stage` by the module docstring's rule; False when it had finished before (skipped).
    Its output goes to the terminal, or is appended to `log` after the command line. Past
    `timeout` seconds the stage is killed (its checkpoints are atomic: the next run resumes it)
    and subprocess.TimeoutExpired is raised."""
    if stage.finished():
        return False
    cmd = stage.command()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if log is None:
        done = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout)
    else:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    see = f"; see {log}" if log else ""
    if done.returncode != 0:
        raise StageFailed(f"{stage.name} failed (exit {done.returncode}){see}", done.returncode)
    missing = [p for p in stage.outputs if not p.exists()]
    if missing:  # running it again would do the same
        raise StageFailed(f"{stage.name} finished without writing {missing[0]}{see}")
    return True


def prune_and_finetune(config, run_dir: Path, sets: dict, tag: str) -> dict:
    """03 into prune_TAG, then 04 of that ticket (finetune.mode of `sets`); returns its result.json."""
    name = f"{tag}_{sets.get('finetune.mode', 'finetune')}"  # named here: the benchmarks read it back
    run_stage(prune_stage(config, run_dir, sets, tag))
    run_stage(finetune_stage(config, run_dir, sets, tag, name))
    return read_json(run_dir / f"finetune_{name}/result.json")


# ------------------------------------------------------------------ reading and formatting results
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


# ------------------------------------------------------------------ stamps and the one-table benchmarks
def machine() -> str:
    import platform
    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"commit {commit()}")


def commit() -> str:
    """The repository's short commit hash for result stamps; "unknown" (with one note on stderr) where
    git is not installed or this is no git checkout, e.g. a copied tree on a lent GPU machine."""
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
    ap.add_argument("--runs", default=runs, help="run folders (a finished stage is skipped, a cut-off one resumed)")
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


def measured_round_bytes(state: dict, blocks: list, workers: int, wire_dtype: str = "fp32") -> int:
    """Bytes one round's aggregation hands to the collectives (all S workers, in one process),
    measured by running the trainers' own exchange (common.loft.RoundExchange) on `state`; no
    block: a Local SGD round (every worker's full state)."""
    import torch
    from common.dist import Comm, DistEnv
    from common.loft import FlatLayout, RoundExchange, draw_partition, mean_of_workers
    from common.narrowing import SlicePlan
    from common.train import flat_buffers
    part = draw_partition(blocks, workers, 0, 0)
    plan, layout = SlicePlan.of(blocks, state), FlatLayout.of(state)
    keys = list(state)
    like = [torch.empty(plan.shape(state, k, {g: sets[w] for g, sets in part.items()}), dtype=state[k].dtype)
            for w in range(workers) for k in keys]
    flats, pieces = flat_buffers(like)
    local = {w: dict(zip(keys, pieces[w * len(keys):(w + 1) * len(keys)])) for w in range(workers)}
    exchange = RoundExchange(plan, layout, part, workers, local, flats, "cpu")
    exchange.begin_round(part)
    comm = Comm(DistEnv(), wire_dtype)
    exchange.aggregate(layout.flatten(state, "cpu"), comm, mean_of_workers)
    return comm.bytes_sent
