"""Paper-scale experiment matrices, as resumable jobs of stage commands, and their report.

    python bench/paper.py run --data-root $LOFT_DATA --budget-s 540            # all matrices, in slices
    python bench/paper.py run --only table1 --seeds 0,1 --data-root $LOFT_DATA
    python bench/paper.py run --only rise --epochs-scale 0.25                   # the same matrix, shorter
    python bench/paper.py report                                                # tables and plots so far
    python bench/paper.py run --smoke --runs /tmp/p --out /tmp/p/out            # tiny sizes (the suite)

Matrices (RUNS/MATRIX/seedS/...):
- table1: PreActResNet-18 CIFAR-10 (yaml/preresnet18_c10.yaml): dense, GPipe-2/4, Local SGD-2/4,
  LoFT-2/4, and Local SGD-4 / LoFT-4 at equal compute (pretrain.data=shard) → L1 tickets at
  p = 50 / 80 % → 90-epoch fine-tune (finetune mode); accuracy against lineage training FLOPs;
- fig4: 02 (filter distance to the final epoch, emergence, early bird) on table1's dense, GPipe-4,
  LoFT-2 and LoFT-4 runs;
- fig5: tickets at p = 50 % cut from pretraining epochs 5, 10, 15, 20 of table1's dense, GPipe-4 and
  LoFT-4 runs, each fine-tuned: ticket accuracy against the epoch it was drawn at;
- rise: ResNet-32 CIFAR-10 (yaml/resnet32_c10.yaml), dense 180 epochs; one-shot global magnitude
  masks keeping R = 10 / 25 / 50 %; 1-LOT-R (`rewind`) and RISE-R (`rise`) from k = 1, 5, 10, 20,
  each continuing the pretraining schedule; the full model as reference.
Every job is one stage command in its own process, run as a user would. A finished job (its
output file exists) is skipped; an interrupted one resumes from its last.pt. `--budget-s` ends the
run before a wall-clock limit: a stage still running then is stopped (its checkpoints are atomic)
and the next `run` continues it. `report` reads only the stages' files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib import REPO, machine, mean_std
from table1 import METHODS as TABLE1_BENCH_METHODS

TABLE1_METHODS = {m: sets for m, sets in TABLE1_BENCH_METHODS.items() if not m.endswith("bf16")}  # bench/table1.py's
TABLE1_METHODS.update({  # the same at equal compute: each worker walks its 1/S of every pass (pretrain.data=shard)
    "localsgd-4-shard": {**TABLE1_METHODS["localsgd-4"], "pretrain.data": "shard"},
    "loft-4-shard": {**TABLE1_METHODS["loft-4"], "pretrain.data": "shard"},
})
RATIOS = (0.5, 0.8)
FINETUNE_EPOCHS = 90
FIG4_METHODS = ("dense", "gpipe-4", "loft-2", "loft-4")
FIG5_METHODS, FIG5_EPOCHS = ("dense", "gpipe-4", "loft-4"), (5, 10, 15, 20)
RISE_KEEP, RISE_K = (0.10, 0.25, 0.50), (1, 5, 10, 20)
MATRICES = ("table1", "fig4", "fig5", "rise")
ANALYTIC_KEY = {"loft": "loft", "localsgd": "localsgd", "gpipe": "gpipe_fwd_bwd"}  # comm.json's analytic entry
SMOKE = {"model.width": 0.125, "data.train_subset": 640, "data.test_subset": 200, "data.eval_batch_size": 200,
         "pretrain.batch_size": 32, "pretrain.local_iters": 5, "pretrain.bn_recal_batches": 2,
         "finetune.batch_size": 32, "dist.threads_per_rank": 1}


@dataclass
class Job:
    """One stage command; `done` exists once it has finished."""
    name: str
    script: str
    config: str
    run_dir: Path
    sets: dict
    flags: list = field(default_factory=list)
    done: Path = None
    resumable: Path | None = None  # last.pt: continue with --resume instead of starting over

    def command(self) -> list[str]:
        cmd = [sys.executable, self.script, "--config", str(REPO / self.config), "--run-dir", str(self.run_dir)]
        for k, v in self.sets.items():
            cmd += ["--set", f"{k}={v}"]
        if self.resumable is not None:
            cmd.append("--resume" if self.resumable.exists() else "--force")
        return cmd + self.flags


class Plan:
    """The sizes a matrix runs at: the paper's, scaled (`--epochs-scale`) or tiny (`--smoke`)."""

    def __init__(self, args):
        self.smoke, self.scale = args.smoke, args.epochs_scale
        self.machine = {"data.root": args.data_root, "data.lossless_test": 1000 if not args.smoke else 180}
        if args.smoke:
            self.machine.update(SMOKE)

    def epochs(self, e: int) -> int:
        return 2 if self.smoke else max(1, round(e * self.scale))

    def finetune_epochs(self, e: int) -> int:
        return 1 if self.smoke else max(1, round(e * self.scale))

    def epoch_points(self, points) -> list[int]:
        """Pretraining epochs (fig5's draws, rise's k) at this scale, distinct, at least 1."""
        return [1, 2] if self.smoke else sorted({max(1, round(p * self.scale)) for p in points})


def pretrain_job(matrix, plan, config, run_dir, sets) -> Job:
    sets = {**plan.machine, **sets}
    return Job(f"{matrix}:{run_dir.name}:pretrain", "01_pretrain_loft.py", config, run_dir, sets,
               done=run_dir / "pretrain/comm.json", resumable=run_dir / "pretrain/last.pt")


def ticket_jobs(matrix, plan, config, run_dir, sets, tag, source, finetune_sets, ft_tag) -> list[Job]:
    prune = Job(f"{matrix}:{run_dir.name}:prune {tag}", "03_prune.py", config, run_dir, {**plan.machine, **sets},
                ["--tag", tag, "--force"] + (["--from", str(source)] if source else []),
                done=run_dir / f"prune_{tag}/ticket.pt")
    tune = Job(f"{matrix}:{run_dir.name}:finetune {ft_tag}", "04_finetune.py", config, run_dir,
               {**plan.machine, **sets, **finetune_sets},
               ["--ticket", str(run_dir / f"prune_{tag}/ticket.pt"), "--tag", ft_tag],
               done=run_dir / f"finetune_{ft_tag}/result.json", resumable=run_dir / f"finetune_{ft_tag}/last.pt")
    return [prune, tune]


def table1_run(runs, seed, method) -> Path:
    return runs / "table1" / f"seed{seed}" / method


def matrix_jobs(matrix: str, plan: Plan, runs: Path, seeds: list[int]) -> list[Job]:
    jobs, config = [], "yaml/preresnet18_c10.yaml"
    E = plan.epochs(20)
    ft = {"finetune.mode": "finetune", "finetune.epochs": plan.finetune_epochs(FINETUNE_EPOCHS)}
    for seed in seeds:
        if matrix in ("table1", "fig4", "fig5"):
            methods = {"table1": TABLE1_METHODS, "fig4": FIG4_METHODS, "fig5": FIG5_METHODS}[matrix]
            for method in methods:
                run, sets = table1_run(runs, seed, method), {**TABLE1_METHODS[method], "seed": seed, "pretrain.epochs": E}
                jobs.append(pretrain_job("table1", plan, config, run, sets))
                if matrix == "table1":
                    for p in RATIOS:
                        tag = f"l1_p{round(100 * p)}"
                        jobs += ticket_jobs("table1", plan, config, run, {**sets, "prune.kind": "l1", "prune.ratio": p},
                                            tag, None, ft, f"{tag}_finetune")
                elif matrix == "fig4":
                    jobs.append(Job(f"fig4:{run.name}:distance", "02_filter_distance.py", config, run,
                                    {**plan.machine, **sets}, ["--force"],
                                    done=run / "distance/summary.json"))
                else:
                    for e in plan.epoch_points(FIG5_EPOCHS):
                        if e <= E:
                            tag = f"l1_p50_e{e:03d}"
                            jobs += ticket_jobs("fig5", plan, config, run, {**sets, "prune.kind": "l1", "prune.ratio": 0.5},
                                                tag, run / f"pretrain/epoch_{e:03d}.pt", ft, f"{tag}_finetune")
        elif matrix == "rise":
            rise_cfg, E_rise = "yaml/resnet32_c10.yaml", plan.epochs(180)
            run = runs / "rise" / f"seed{seed}" / "dense"
            ks = [k for k in plan.epoch_points(RISE_K) if k < E_rise]
            sets = {"seed": seed, "pretrain.method": "dense", "pretrain.epochs": E_rise, "finetune.rewind_epoch": ks[0]}
            if E_rise != 180:  # milestones 80/120 of 180 scale with the run
                ms = sorted({max(1, round(m * E_rise / 180)) for m in (80, 120)})
                sets.update({"pretrain.milestones": ms, "finetune.milestones": ms})
            jobs.append(pretrain_job("rise", plan, rise_cfg, run, sets))
            for keep in RISE_KEEP:
                tag = f"mag_r{round(100 * keep)}"
                for k in ks:
                    for mode in ("rewind", "rise"):
                        mode_sets = {"finetune.mode": mode, "finetune.rewind_epoch": k, "finetune.epochs": 0}
                        jobs += ticket_jobs("rise", plan, rise_cfg, run,
                                            {**sets, "prune.kind": "magnitude", "prune.ratio": round(1 - keep, 4)},
                                            tag, None, mode_sets, f"{tag}_{mode}_k{k}")
    return jobs


def unique(jobs: list[Job]) -> list[Job]:
    seen, out = set(), []
    for j in jobs:
        if j.name not in seen:
            seen.add(j.name)
            out.append(j)
    return out


def run(args) -> int:
    plan, runs = Plan(args), Path(args.runs)
    names = args.only.split(",") if args.only else MATRICES
    for n in names:
        if n not in MATRICES:
            print(f"error: --only {n}: not one of {', '.join(MATRICES)}", file=sys.stderr)
            return 2
    jobs = unique([j for n in names for j in matrix_jobs(n, plan, runs, args.seeds)])
    start, log = time.time(), runs / "paper_log.txt"
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i, job in enumerate(jobs):
        if job.done.exists():
            print(f"[{i + 1}/{len(jobs)}] skip {job.name} (done)")
            continue
        left = args.budget_s - (time.time() - start) if args.budget_s else None
        if left is not None and left < 1:
            print(f"budget of {args.budget_s} s reached before {job.name}; run again to continue")
            return 0
        print(f"[{i + 1}/{len(jobs)}] {job.name}", flush=True)
        t0 = time.time()
        try:
            with open(log, "a") as f:
                f.write(f"\n$ {' '.join(job.command())}\n")
                f.flush()
                r = subprocess.run(job.command(), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   timeout=left)
        except subprocess.TimeoutExpired:  # the stage was stopped; its checkpoints are whole
            print(f"budget of {args.budget_s} s reached during {job.name}; run again to continue it")
            return 0
        if r.returncode != 0:
            print(f"error: {job.name} failed (exit {r.returncode}); see {log}", file=sys.stderr)
            return r.returncode
        with open(runs / "paper_times.jsonl", "a") as f:
            f.write(json.dumps({"job": job.name, "seconds": round(time.time() - t0, 1)}) + "\n")
    print(f"all {len(jobs)} jobs of {', '.join(names)} done")
    return 0


# ------------------------------------------------------------------------ report
def si(x: float, unit: str) -> str:
    """1234567 → '1.23 M' + unit: tables that read at CPU-smoke and paper scale alike."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def dash(v) -> str:
    return "—" if v is None else str(v)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def results_under(folder: Path, pattern: str) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob(pattern))}


def table1_report(runs: Path, seeds) -> tuple[str, list]:
    rows = []
    for seed in seeds:
        for method in TABLE1_METHODS:
            run = table1_run(runs, seed, method)
            comm = read_json(run / "pretrain/comm.json")
            for p in RATIOS:
                res = read_json(run / f"finetune_l1_p{round(100 * p)}_finetune/result.json")
                if res and comm:
                    rows.append({"seed": seed, "method": method, "ratio": p, "acc": res["final_test_acc"],
                                 "acc_lossless": res.get("final_test_acc_lossless"),
                                 "measured": comm["measured_payload_bytes"],
                                 "analytic": comm["analytic_ps_bytes"], "train_flops": res["train_flops"]})
    lines = ["| method | p | ticket acc. (%) | lossless acc. (%) | measured bytes | analytic bytes | lineage training FLOPs | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in TABLE1_METHODS:
        for p in RATIOS:
            sel = [r for r in rows if r["method"] == method and r["ratio"] == p]
            if not sel:
                continue
            analytic = sel[0]["analytic"].get(ANALYTIC_KEY.get(method.split("-")[0], ""))
            lossless = [r["acc_lossless"] for r in sel if r["acc_lossless"] is not None]
            lines.append(f"| {method} | {round(100 * p)} % | {mean_std([r['acc'] for r in sel])} | "
                         f"{mean_std(lossless) if lossless else '—'} | {si(sel[0]['measured'], 'B')} | "
                         f"{si(analytic, 'B') if analytic else '—'} | {si(sel[0]['train_flops'], 'FLOP')} | "
                         f"{len(sel)} |")
    return "\n".join(lines), rows


def save_plot(fig, ax, path: Path, **labels):
    ax.set(**labels)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def table1_flops_plot(rows: list, plt, out: Path):
    """Ticket accuracy against the lineage's training FLOPs: the equal-compute reading of Table 1."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for p, marker in zip(RATIOS, "os"):
        for i, method in enumerate(TABLE1_METHODS):  # a colour per method, a marker per ratio
            sel = [r for r in rows if r["method"] == method and r["ratio"] == p]
            if sel:
                ax.scatter([sum(r["train_flops"] for r in sel) / len(sel)], [sum(r["acc"] for r in sel) / len(sel)],
                           marker=marker, color=f"C{i % 10}", label=f"{method} p={round(100 * p)}%")
    save_plot(fig, ax, out / "table1_flops.png", xlabel="lineage training FLOPs", ylabel="ticket accuracy (%)",
              xscale="log", title="Table 1 at equal compute")


def fig4_report(runs: Path, seeds, plt, out: Path) -> str:
    lines = ["| method | distance to final, each epoch | filter emergence epoch | early-bird epoch |", "|---|---|---:|---:|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in FIG4_METHODS:
        s = read_json(table1_run(runs, seeds[0], method) / "distance/summary.json")
        if not s:
            continue
        d = {int(e): v for e, v in s["distance_to_final"].items()}
        ax.plot(sorted(d), [d[e] for e in sorted(d)], marker="o", label=method)
        lines.append(f"| {method} | {' '.join(f'{d[e]:.3f}' for e in sorted(d))} | "
                     f"{dash(s.get('filter_emergence_epoch'))} | {dash(s.get('early_bird_epoch'))} |")
    save_plot(fig, ax, out / "fig4.png", xlabel="pretraining epoch", ylabel="filter distance to the final epoch",
              title="Fig. 4")
    return "\n".join(lines)


def fig5_report(runs: Path, seeds, plt, out: Path) -> str:
    lines = ["| method | pretraining epoch | ticket acc. (%) | seeds |", "|---|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in FIG5_METHODS:
        by_epoch = {}
        for seed in seeds:
            for name, res in results_under(table1_run(runs, seed, method), "finetune_l1_p50_e*_finetune/result.json").items():
                by_epoch.setdefault(int(name.split("_e")[1][:3]), []).append(res["final_test_acc"])
        for e in sorted(by_epoch):
            lines.append(f"| {method} | {e} | {mean_std(by_epoch[e])} | {len(by_epoch[e])} |")
        if by_epoch:
            ax.plot(sorted(by_epoch), [sum(v) / len(v) for _, v in sorted(by_epoch.items())], marker="o", label=method)
    save_plot(fig, ax, out / "fig5.png", xlabel="pretraining epoch the ticket is drawn at",
              ylabel="ticket accuracy (%)", title="Fig. 5 (p = 50 %)")
    return "\n".join(lines)


def rise_report(runs: Path, seeds, plt, out: Path) -> str:
    lines = ["| R (kept) | mode | k | acc. (%) | training complexity | seeds |", "|---|---|---:|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    full = []
    for seed in seeds:
        run = runs / "rise" / f"seed{seed}" / "dense"
        ck = last_metrics(run / "pretrain/metrics.csv")
        if ck:
            full.append((float(ck["test_acc"]), float(ck["train_flops"])))
    for keep in RISE_KEEP:
        for mode in ("rewind", "rise"):
            pts = {}
            for seed in seeds:
                run = runs / "rise" / f"seed{seed}" / "dense"
                for name, res in results_under(run, f"finetune_mag_r{round(100 * keep)}_{mode}_k*/result.json").items():
                    pts.setdefault(int(name.rsplit("_k", 1)[1]), []).append((res["final_test_acc"], res["train_flops"]))
            for k in sorted(pts):
                accs = [a for a, _ in pts[k]]
                lines.append(f"| {round(100 * keep)} % | {'RISE' if mode == 'rise' else '1-LOT'}-R | {k} | {mean_std(accs)} | "
                             f"{si(pts[k][0][1], 'FLOP')} | {len(accs)} |")
            if pts:
                ax.plot([pts[k][0][1] for k in sorted(pts)], [sum(a for a, _ in pts[k]) / len(pts[k]) for k in sorted(pts)],
                        marker="o" if mode == "rise" else "s", linestyle="-" if mode == "rise" else "--",
                        label=f"{'RISE' if mode == 'rise' else '1-LOT'}-{round(100 * keep)}%")
    if full:
        ax.axhline(sum(a for a, _ in full) / len(full), color="k", lw=0.8, label="full model")
        lines.append(f"| 100 % | full model | — | {mean_std([a for a, _ in full])} | {si(full[0][1], 'FLOP')} | {len(full)} |")
    save_plot(fig, ax, out / "rise_fig4.png", xlabel="training complexity (FLOPs)", ylabel="test accuracy (%)",
              xscale="log", title="RISE Fig. 4 (ResNet-32)")
    return "\n".join(lines)


def last_metrics(path: Path) -> dict | None:
    import csv
    if not path.exists():
        return None
    rows = list(csv.DictReader(open(path)))
    return rows[-1] if rows else None


def report(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t1, rows = table1_report(runs, args.seeds)
    table1_flops_plot(rows, plt, out)
    times = [json.loads(line) for line in (runs / "paper_times.jsonl").read_text().splitlines()] \
        if (runs / "paper_times.jsonl").exists() else []
    per_matrix = {}
    for t in times:
        per_matrix[t["job"].split(":")[0]] = per_matrix.get(t["job"].split(":")[0], 0) + t["seconds"]
    text = "\n\n".join([f"# Paper-scale results\n\n{machine()}" + (f"; GPU {gpu_name()}" if gpu_name() else ""),
                        "## Table 1 (PreActResNet-18, CIFAR-10)\n\n" + t1,
                        "## Fig. 4\n\n" + fig4_report(runs, args.seeds, plt, out),
                        "## Fig. 5\n\n" + fig5_report(runs, args.seeds, plt, out),
                        "## RISE Fig. 4\n\n" + rise_report(runs, args.seeds, plt, out),
                        "## Wall time per matrix (stage processes)\n\n" +
                        "\n".join(f"- {m}: {s / 60:.1f} min" for m, s in per_matrix.items())])
    (out / "paper.md").write_text(text + "\n")
    (out / "table1.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


def gpu_name() -> str | None:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--only", default=None, help=f"comma-separated matrices ({', '.join(MATRICES)})")
    p.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--epochs-scale", type=float, default=1.0, help="every epoch count times this (same matrix, shorter)")
    p.add_argument("--budget-s", type=float, default=0, help="stop before this many seconds of wall time (0: no limit)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the driver in minutes")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--runs", default=str(REPO / "runs/paper"))
    p.add_argument("--out", default=str(REPO / "bench/results/paper"))
    args = p.parse_args(argv)
    return run(args) if args.action == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
