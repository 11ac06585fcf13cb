"""Paper-scale experiment matrices, as resumable jobs of stage commands, and their report.

    python bench/paper.py run --data-root $LOFT_DATA --budget-s 540            # all matrices, in slices
    python bench/paper.py run --only table1 --seeds 0,1 --data-root $LOFT_DATA
    python bench/paper.py run --only table1:preresnet18_c10,fig4:cifar10     # single panels
    python bench/paper.py run --only rise --epochs-scale 0.25                   # the same matrix, shorter
    python bench/paper.py run --only table1:preresnet18_c10 --methods dense,loft-4-shard --epochs-scale 0.3 \
        --finetune-epochs-scale 0.07 --set pretrain.local_iters=5 --set model.width=0.25 \
        --set data.train_subset=4000 --set data.test_subset=2000        # CPU scale (docs/results.md)
    python bench/paper.py report --seeds 0,1 --docs docs/results.md             # tables and plots so far
    python bench/paper.py run --smoke --runs /tmp/p --out /tmp/p/out            # tiny sizes (the suite)

Matrices and their panels (runs in RUNS/table1/ROW/seedS/METHOD/, RUNS/rise/MODEL/seedS/dense/):
- table1: every row of LoFT Table 1, each from its config (TABLE1_ROWS): PreResNet-18, PreResNet-34
  and ResNet-34 on CIFAR-10 and on CIFAR-100, PreResNet-18 on ImageNet. Per row the methods the
  paper lists (GPipe-2/4, Local SGD-2/4, LoFT-2/4; ImageNet has no Local SGD-2) → L1 tickets at
  p = 80 / 50 % (ImageNet also 30 %) → fine-tune (finetune mode), and the Dense Model cell: dense
  pretraining, no pruning (p = 0), fine-tuned the same way. Row preresnet18_c10 adds Local SGD-4 and
  LoFT-4 at equal samples (pretrain.data=shard; their training FLOPs are not dense's: the report
  gives the ratio). Accuracy against lineage training FLOPs, a plot per row;
- fig4: 02 (filter distance to the final epoch, emergence, early bird) on the dense, GPipe-4, LoFT-2
  and LoFT-4 runs of PreResNet-18, a panel per dataset: cifar100 and imagenet (the paper's two
  panels) and cifar10; the runs are table1's;
- fig5: tickets at p = 50 % cut from pretraining epochs 5, 10, 15, 20 of table1's PreResNet-18
  CIFAR-10 dense, GPipe-4 and LoFT-4 runs, each fine-tuned: ticket accuracy against the epoch;
- rise: RISE Fig. 4's three models (yaml/resnet32_c10.yaml, mobilenetv3_small_c10.yaml,
  resnet18_in.yaml): dense reference run; one-shot global magnitude masks keeping R = 10 / 25 / 50 %;
  1-LOT-R (`rewind`) and RISE-R (`rise`) from k = 1, 5, 10, 20, each continuing the pretraining
  schedule; accuracy against training complexity.
Scale: every matrix runs at any scale through the same flags. `--epochs-scale` multiplies every
epoch count (epoch milestones, warm-ups, fig5's draws and rise's k with it), `--finetune-epochs-scale`
the fine-tuning ones alone, `--set KEY=VALUE` sets a key in every job (width, images, ...; the
matrix's own keys win), `--smoke` is a tiny preset of all three (and rise's two extreme R).
Every job is one stage command in its own process, run as a user would, by bench/lib.py's
`run_stage`: a finished job is skipped, a cut-off one resumes from its last.pt (the rule and why:
bench/lib.py). `--budget-s` ends the run before a wall-clock limit: a stage still running then is
stopped (its checkpoints are atomic) and the next `run` continues it. `report` reads only the
stages' files.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lib import (REPO, Stage, StageFailed, commit, distance_stage, finetune_stage, last_row, machine, mean_std,
                 pretrain_stage, prune_stage, read_json, run_stage, si)
from common.config import load_config
from common.errors import UserError

METHOD_SETS = {  # a pretraining method's name in the matrices → its config overrides
    "dense": {"pretrain.method": "dense"},
    "gpipe-2": {"pretrain.method": "gpipe", "pretrain.workers": 2},
    "gpipe-4": {"pretrain.method": "gpipe", "pretrain.workers": 4},
    "localsgd-2": {"pretrain.method": "localsgd", "pretrain.workers": 2},
    "localsgd-4": {"pretrain.method": "localsgd", "pretrain.workers": 4},
    "loft-2": {"pretrain.method": "loft", "pretrain.workers": 2},
    "loft-4": {"pretrain.method": "loft", "pretrain.workers": 4},
}
METHOD_SETS.update({  # equal samples: each worker walks its 1/S of every pass (pretrain.data=shard)
    "localsgd-4-shard": {**METHOD_SETS["localsgd-4"], "pretrain.data": "shard"},
    "loft-4-shard": {**METHOD_SETS["loft-4"], "pretrain.data": "shard"},
})
CIFAR_METHODS = ("dense", "gpipe-2", "localsgd-2", "loft-2", "gpipe-4", "localsgd-4", "loft-4")
IMAGENET_METHODS = ("dense", "gpipe-2", "loft-2", "gpipe-4", "localsgd-4", "loft-4")  # the paper ran no Local SGD-2
CIFAR_RATIOS, IMAGENET_RATIOS = (0.8, 0.5), (0.8, 0.5, 0.3)


@dataclass(frozen=True)
class Table1Row:
    config: str
    methods: tuple
    ratios: tuple


TABLE1_ROWS = {  # LoFT Table 1, top to bottom; "dense" is the Dense Model column (pruning ratio 0)
    "preresnet18_c10": Table1Row("yaml/preresnet18_c10.yaml", CIFAR_METHODS + ("localsgd-4-shard", "loft-4-shard"),
                                 CIFAR_RATIOS),
    "preresnet34_c10": Table1Row("yaml/preresnet34_c10.yaml", CIFAR_METHODS, CIFAR_RATIOS),
    "resnet34_c10": Table1Row("yaml/r34_c10.yaml", CIFAR_METHODS, CIFAR_RATIOS),
    "preresnet18_c100": Table1Row("yaml/preresnet18_c100.yaml", CIFAR_METHODS, CIFAR_RATIOS),
    "preresnet34_c100": Table1Row("yaml/preresnet34_c100.yaml", CIFAR_METHODS, CIFAR_RATIOS),
    "resnet34_c100": Table1Row("yaml/r34_c100.yaml", CIFAR_METHODS, CIFAR_RATIOS),
    "preresnet18_in": Table1Row("yaml/preresnet18_in.yaml", IMAGENET_METHODS, IMAGENET_RATIOS),
}
FIG4_PANELS = {"cifar10": "preresnet18_c10", "cifar100": "preresnet18_c100", "imagenet": "preresnet18_in"}  # → table1 row
FIG4_METHODS = ("dense", "gpipe-4", "loft-2", "loft-4")
FIG5_ROW, FIG5_METHODS, FIG5_EPOCHS = "preresnet18_c10", ("dense", "gpipe-4", "loft-4"), (5, 10, 15, 20)
RISE_MODELS = {"resnet32_c10": "yaml/resnet32_c10.yaml", "mobilenetv3_small_c10": "yaml/mobilenetv3_small_c10.yaml",
               "resnet18_in": "yaml/resnet18_in.yaml"}
RISE_KEEP, RISE_K = (0.10, 0.25, 0.50), (1, 5, 10, 20)
PANELS = {"table1": tuple(TABLE1_ROWS), "fig4": tuple(FIG4_PANELS), "fig5": (FIG5_ROW,), "rise": tuple(RISE_MODELS)}
MATRICES = tuple(PANELS)
ANALYTIC_KEY = {"loft": "loft", "localsgd": "localsgd", "gpipe": "gpipe_fwd"}  # comm.json's, the paper's convention
SMOKE = {"model.width": 0.125, "data.train_subset": 640, "data.test_subset": 200, "data.eval_batch_size": 200,
         "pretrain.batch_size": 32, "pretrain.local_iters": 5, "pretrain.bn_recal_batches": 2,
         "finetune.batch_size": 32, "dist.threads_per_rank": 1}


class Plan:
    """The sizes a matrix runs at: the paper's, scaled (`--epochs-scale`, `--set`) or tiny (`--smoke`)."""

    def __init__(self, args):
        self.smoke, self.scale = args.smoke, args.epochs_scale
        self.finetune_scale = args.epochs_scale if args.finetune_epochs_scale is None else args.finetune_epochs_scale
        self.machine = {"data.root": args.data_root, **(SMOKE if args.smoke else {}), **args.set}
        self.methods, self.rise_keep = args.methods, args.rise_keep

    def chosen(self, methods) -> tuple:
        """A matrix's pretraining methods, less those `--methods` leaves out."""
        return tuple(m for m in methods if self.methods is None or m in self.methods)

    def base(self, cfg) -> dict:
        """Every job's keys: the machine and scale; lossless accuracy where the data has it (the
        shared CIFAR-10's test images 0-999)."""
        lossless = {"data.lossless_test": 180 if self.smoke else 1000} if cfg.data.dataset == "cifar10" else {}
        return {**lossless, **self.machine}

    def epochs(self, e: int) -> int:
        return 2 if self.smoke else max(1, round(e * self.scale))

    def finetune_epochs(self, e: int) -> int:
        return 1 if self.smoke else max(1, round(e * self.finetune_scale))

    def keeps(self, keeps) -> tuple:
        """rise's R values: `--rise-keep`, else all; the smoke runs the two ends only."""
        keeps = self.rise_keep or keeps
        return (keeps[0], keeps[-1]) if self.smoke else keeps

    def epoch_points(self, points) -> list[int]:
        """Pretraining epochs (fig5's draws, rise's k) at this scale, distinct, at least 1."""
        return [1, 2] if self.smoke else sorted({max(1, round(p * self.scale)) for p in points})


def section_sets(section, prefix: str, epochs: int) -> dict:
    """`prefix.epochs` and what scales with it: epoch milestones and the warm-up (rounds stay)."""
    sets = {f"{prefix}.epochs": epochs}
    if epochs != section.epochs:
        factor = epochs / section.epochs
        if section.schedule == "multistep" and section.milestone_unit == "epochs":
            sets[f"{prefix}.milestones"] = sorted({max(1, round(m * factor)) for m in section.milestones})
        if section.warmup_epochs:
            sets[f"{prefix}.warmup_epochs"] = round(section.warmup_epochs * factor, 4)
    return sets


def job_name(matrix: str, runs: Path, run_dir: Path, what: str) -> str:
    """e.g. fig4:preresnet18_c100/seed0/loft-4:distance (the run's folder below RUNS/MATRIX)."""
    return f"{matrix}:{'/'.join(run_dir.relative_to(runs).parts[1:])}:{what}"


def pretrain_job(matrix, runs, config, run_dir, sets) -> Stage:
    return pretrain_stage(config, run_dir, sets, job_name(matrix, runs, run_dir, "pretrain"))


def ticket_jobs(matrix, runs, config, run_dir, sets, tag, source, finetune_sets, ft_tag) -> list[Stage]:
    return [prune_stage(config, run_dir, sets, tag, source, job_name(matrix, runs, run_dir, f"prune {tag}")),
            finetune_stage(config, run_dir, {**sets, **finetune_sets}, tag, ft_tag,
                           job_name(matrix, runs, run_dir, f"finetune {ft_tag}"))]


def table1_run(runs, row, seed, method) -> Path:
    return runs / "table1" / row / f"seed{seed}" / method


def ticket_tag(ratio: float) -> str:
    return f"l1_p{round(100 * ratio)}"


def table1_pretrain(matrix, plan, runs, row, seed, method) -> tuple[Stage, dict, object]:
    """The pretraining job of one Table 1 run (shared by table1, fig4, fig5), its keys and config."""
    config = TABLE1_ROWS[row].config
    cfg = load_config(REPO / config)
    sets = {**plan.base(cfg), **METHOD_SETS[method], "seed": seed,
            **section_sets(cfg.pretrain, "pretrain", plan.epochs(cfg.pretrain.epochs))}
    run = table1_run(runs, row, seed, method)
    return pretrain_job(matrix, runs, config, run, sets), sets, cfg


def finetune_sets(plan, cfg) -> dict:
    """LoFT's workflow: fine-tune the pruned pretrained weights, the config's schedule at this scale."""
    return {"finetune.mode": "finetune", **section_sets(cfg.finetune, "finetune", plan.finetune_epochs(cfg.finetune.epochs))}


def table1_jobs(plan, runs, row, seed) -> list[Stage]:
    jobs, spec = [], TABLE1_ROWS[row]
    for method in plan.chosen(spec.methods):
        job, sets, cfg = table1_pretrain("table1", plan, runs, row, seed, method)
        ft = finetune_sets(plan, cfg)
        jobs.append(job)
        ratios = ((0.0,) if method == "dense" else ()) + spec.ratios  # dense: the no-prune cell, then its tickets
        for p in ratios:
            jobs += ticket_jobs("table1", runs, spec.config, job.run_dir, {**sets, "prune.kind": "l1", "prune.ratio": p},
                                ticket_tag(p), None, ft, f"{ticket_tag(p)}_finetune")
    return jobs


def fig4_jobs(plan, runs, panel, seed) -> list[Stage]:
    jobs, row = [], FIG4_PANELS[panel]
    for method in plan.chosen(FIG4_METHODS):
        job, sets, _ = table1_pretrain("fig4", plan, runs, row, seed, method)
        jobs += [job, distance_job("fig4", runs, row, job, sets)]
    return jobs


def distance_job(matrix, runs, row, pretrain: Stage, sets) -> Stage:
    return distance_stage(TABLE1_ROWS[row].config, pretrain.run_dir, sets,
                          job_name(matrix, runs, pretrain.run_dir, "distance"))


MARKS = {"filter_emergence_epoch": "filter emergence", "early_bird_epoch": "early bird"}  # 02's summary.json keys


def marked_epochs(run_dir: Path) -> dict[int, list[str]]:
    """The epochs 02's rules marked in this run ({} before 02 has run, or where no rule fired)."""
    summary, marks = read_json(run_dir / "distance/summary.json") or {}, {}
    for key, mark in MARKS.items():
        if summary.get(key) is not None:
            marks.setdefault(int(summary[key]), []).append(mark)
    return marks


def fig5_jobs(plan, runs, seed) -> list[Stage]:
    """Tickets drawn at the scaled epochs and, once 02 has run, at the epochs its emergence and
    early-bird rules mark: does stopping there give as good a ticket as pretraining to the end?"""
    jobs = []
    for method in plan.chosen(FIG5_METHODS):
        job, sets, cfg = table1_pretrain("fig5", plan, runs, FIG5_ROW, seed, method)
        ft = finetune_sets(plan, cfg)
        jobs += [job, distance_job("fig5", runs, FIG5_ROW, job, sets)]
        for e in sorted(set(plan.epoch_points(FIG5_EPOCHS)) | set(marked_epochs(job.run_dir))):
            if e <= sets["pretrain.epochs"]:
                tag = f"l1_p50_e{e:03d}"
                jobs += ticket_jobs("fig5", runs, TABLE1_ROWS[FIG5_ROW].config, job.run_dir,
                                    {**sets, "prune.kind": "l1", "prune.ratio": 0.5}, tag,
                                    job.run_dir / f"pretrain/epoch_{e:03d}.pt", ft, f"{tag}_finetune")
    return jobs


def rise_run(runs, model, seed) -> Path:
    return runs / "rise" / model / f"seed{seed}" / "dense"


def rise_jobs(plan, runs, model, seed) -> list[Stage]:
    config = RISE_MODELS[model]
    cfg = load_config(REPO / config)
    E = plan.epochs(cfg.pretrain.epochs)
    ks = [k for k in plan.epoch_points(RISE_K) if k < E]
    if not ks:
        raise UserError(f"rise:{model}: {E} pretraining epoch(s) leave no rewind epoch k < {E}; use a larger "
                        "--epochs-scale")
    sets = {**plan.base(cfg), "seed": seed, "pretrain.method": "dense", "finetune.rewind_epoch": ks[0],
            **section_sets(cfg.pretrain, "pretrain", E)}
    run = rise_run(runs, model, seed)
    jobs = [pretrain_job("rise", runs, config, run, sets)]
    for keep in plan.keeps(RISE_KEEP):
        tag = f"mag_r{round(100 * keep)}"
        for k in ks:
            for mode in ("rewind", "rise"):  # both continue the pretraining schedule from k (finetune.epochs 0)
                mode_sets = {"finetune.mode": mode, "finetune.rewind_epoch": k, "finetune.epochs": 0}
                jobs += ticket_jobs("rise", runs, config, run,
                                    {**sets, "prune.kind": "magnitude", "prune.ratio": round(1 - keep, 4)},
                                    tag, None, mode_sets, f"{tag}_{mode}_k{k}")
    return jobs


def matrix_jobs(matrix: str, plan: Plan, runs: Path, seeds: list[int], panels=None) -> list[Stage]:
    """The jobs of one matrix, for the given panels (default: all of them)."""
    jobs = []
    for seed in seeds:
        for panel in panels or PANELS[matrix]:
            if matrix == "table1":
                jobs += table1_jobs(plan, runs, panel, seed)
            elif matrix == "fig4":
                jobs += fig4_jobs(plan, runs, panel, seed)
            elif matrix == "fig5":
                jobs += fig5_jobs(plan, runs, seed)
            else:
                jobs += rise_jobs(plan, runs, panel, seed)
    return jobs


def selection(only: str | None) -> dict[str, list[str]]:
    """--only MATRIX[:PANEL],... → {matrix: its chosen panels}; a bare MATRIX means all of its panels."""
    chosen: dict[str, list[str]] = {}
    for item in (only.split(",") if only else MATRICES):
        matrix, _, panel = item.partition(":")
        if matrix not in PANELS:
            raise UserError(f"--only {item}: {matrix!r} is not one of {', '.join(MATRICES)}")
        if panel and panel not in PANELS[matrix]:
            raise UserError(f"--only {item}: {matrix} has panels {', '.join(PANELS[matrix])}")
        panels = chosen.setdefault(matrix, [])
        for p in ([panel] if panel else PANELS[matrix]):
            if p not in panels:
                panels.append(p)
    return chosen


def unique(jobs: list[Stage]) -> list[Stage]:
    """Each output once: table1, fig4 and fig5 share their pretraining runs."""
    seen, out = set(), []
    for j in jobs:
        if j.outputs not in seen:
            seen.add(j.outputs)
            out.append(j)
    return out


def run(args) -> int:
    """Run the first unfinished job, then plan again (fig5's marked draws appear once 02 has run),
    until none is left or the budget is spent."""
    plan, runs = Plan(args), Path(args.runs)
    chosen = selection(args.only)

    def planned() -> list[Stage]:
        return unique([j for m, panels in chosen.items() for j in matrix_jobs(m, plan, runs, args.seeds, panels)])

    start, log = time.time(), runs / "paper_log.txt"
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / "paper_commands.txt", "a") as f:  # the report lists how its runs were made
        f.write(f"{commit()}  {args.command}\n")
    seen_done = set()
    while True:
        jobs = planned()
        for i, job in enumerate(jobs):
            if job.finished() and job.outputs not in seen_done:
                seen_done.add(job.outputs)
                print(f"[{i + 1}/{len(jobs)}] skip {job.name} (done)")
        i, job = next(((i, j) for i, j in enumerate(jobs) if not j.finished()), (None, None))
        if job is None:
            print(f"all {len(jobs)} jobs of {', '.join(chosen)} done")
            return 0
        left = args.budget_s - (time.time() - start) if args.budget_s else None
        if left is not None and left < 1:
            print(f"budget of {args.budget_s} s reached before {job.name}; run again to continue")
            return 0
        print(f"[{i + 1}/{len(jobs)}] {job.name}", flush=True)
        t0 = time.time()
        try:
            run_stage(job, log, timeout=left)
        except subprocess.TimeoutExpired:  # the stage was stopped; its checkpoints are whole
            print(f"budget of {args.budget_s} s reached during {job.name}; run again to continue it")
            return 0
        except StageFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return e.returncode
        seen_done.add(job.outputs)
        with open(runs / "paper_times.jsonl", "a") as f:
            f.write(json.dumps({"job": job.name, "seconds": round(time.time() - t0, 1)}) + "\n")


# ------------------------------------------------------------------------ report
def dash(v) -> str:
    return "—" if v is None else str(v)


def results_under(folder: Path, pattern: str) -> dict[str, dict]:
    return {p.parent.name: read_json(p) for p in sorted(folder.glob(pattern))}


def byte_cells(method: str, comm: dict) -> tuple[str, str, str]:
    """(measured, analytic in the paper's Table 1 convention, GPipe's analytic forward+backward).
    LoFT / Local SGD measure one push per worker and round: doubled to the paper's pull+push.
    GPipe: the paper counts forward activations once; the real traffic adds the gradients back."""
    kind, analytic = method.split("-")[0], comm["analytic_ps_bytes"]
    measured = comm["measured_payload_bytes"] * (2 if kind in ("loft", "localsgd") else 1)
    paper = analytic.get(ANALYTIC_KEY.get(kind, ""))  # dense: no analytic count
    return (si(measured, "B"), si(paper, "B") if paper else "—",
            si(analytic["gpipe_fwd_bwd"], "B") if kind == "gpipe" else "—")


def table1_report(runs: Path, row: str, seeds) -> tuple[str, list]:
    """One Table 1 row: a line per method and pruning ratio (p = 0: the Dense Model cell)."""
    spec, rows = TABLE1_ROWS[row], []
    for seed in seeds:
        for method in spec.methods:
            run = table1_run(runs, row, seed, method)
            comm = read_json(run / "pretrain/comm.json")
            for p in ((0.0,) if method == "dense" else ()) + spec.ratios:
                res = read_json(run / f"finetune_{ticket_tag(p)}_finetune/result.json")
                if res and comm:
                    rows.append({"row": row, "seed": seed, "method": method, "ratio": p, "acc": res["final_test_acc"],
                                 "acc_lossless": res.get("final_test_acc_lossless"), "comm": comm,
                                 "train_flops": res["train_flops"]})
    lines = ["| method | p | ticket acc. (%) | lossless acc. (%) | measured bytes (LoFT/Local SGD pull+push, GPipe "
             "fwd+bwd) | analytic bytes (paper's convention; GPipe fwd) | GPipe analytic fwd+bwd | pretraining "
             "FLOPs ÷ dense | lineage training FLOPs | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in spec.methods:
        for p in ((0.0,) if method == "dense" else ()) + spec.ratios:
            sel = [r for r in rows if r["method"] == method and r["ratio"] == p]
            if not sel:
                continue
            comm = sel[0]["comm"]
            flops_ratio = comm.get("train_flops_ratio_to_dense")
            lines.append(f"| {method} | {'0 % (Dense Model)' if p == 0 else f'{round(100 * p)} %'} | "
                         f"{mean_std([r['acc'] for r in sel])} | {mean_std([r['acc_lossless'] for r in sel])} | "
                         f"{' | '.join(byte_cells(method, comm))} | {dash(flops_ratio)} | "
                         f"{si(sel[0]['train_flops'], 'FLOP')} | {len(sel)} |")
    return "\n".join(lines), rows


def save_plot(fig, ax, path: Path, **labels):
    ax.set(**labels)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def table1_flops_plot(row: str, rows: list, plt, out: Path):
    """Ticket accuracy against the lineage's training FLOPs: Table 1 read by compute, not by epochs or samples."""
    fig, ax = plt.subplots(figsize=(6, 4))
    spec = TABLE1_ROWS[row]
    for p, marker in zip((0.0,) + spec.ratios, "Dos^"):
        for i, method in enumerate(spec.methods):  # a colour per method, a marker per ratio
            sel = [r for r in rows if r["method"] == method and r["ratio"] == p]
            if sel:
                ax.scatter([sum(r["train_flops"] for r in sel) / len(sel)], [sum(r["acc"] for r in sel) / len(sel)],
                           marker=marker, color=f"C{i % 10}", label=f"{method} p={round(100 * p)}%")
    save_plot(fig, ax, out / f"table1_flops_{row}.png", xlabel="lineage training FLOPs",
              ylabel="ticket accuracy (%)", xscale="log", title=f"Table 1, {row}: accuracy vs training FLOPs")


def fig4_report(runs: Path, panel: str, seeds, plt, out: Path) -> str:
    lines = ["| method | distance to final, each epoch | consecutive F(e, e+1), each e | filter emergence epoch | "
             "early-bird epoch |", "|---|---|---|---:|---:|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    rules = {}
    for method in FIG4_METHODS:
        s = read_json(table1_run(runs, FIG4_PANELS[panel], seeds[0], method) / "distance/summary.json")
        if not s:
            continue
        d = {int(e): v for e, v in s["distance_to_final"].items()}
        line, = ax.plot(sorted(d), [d[e] for e in sorted(d)], marker="o", label=method)
        fired = s.get("filter_emergence_epoch")
        if fired is not None and int(fired) in d:
            ax.scatter([int(fired)], [d[int(fired)]], marker="*", s=160, color=line.get_color(), edgecolor="k",
                       zorder=3, label=f"{method}: filter emergence")
        consecutive = " ".join(f"{v:.3f}" for v in s.get("consecutive", {}).values())
        lines.append(f"| {method} | {' '.join(f'{d[e]:.3f}' for e in sorted(d))} | {consecutive} | "
                     f"{dash(s.get('filter_emergence_epoch'))} | {dash(s.get('early_bird_epoch'))} |")
        rules = {"filter emergence": s.get("filter_emergence_rule"), "early bird": s.get("early_bird_rule")}
    lines += [""] + [f"- {name} (— where it did not fire): {rule}" for name, rule in rules.items() if rule]
    save_plot(fig, ax, out / f"fig4_{panel}.png", xlabel="pretraining epoch",
              ylabel="filter distance to the final epoch", title=f"Fig. 4, {panel} ({FIG4_PANELS[panel]})")
    return "\n".join(lines)


def fig5_report(runs: Path, seeds, plt, out: Path) -> str:
    """Ticket accuracy against the epoch it is drawn at; the rows 02's rules marked say whether
    stopping pretraining there gives the final epoch's ticket quality."""
    lines = ["| method | pretraining epoch | ticket acc. (%) | seeds | marked by 02 |", "|---|---:|---:|---:|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(FIG5_METHODS):
        by_epoch = {}
        marks = marked_epochs(table1_run(runs, FIG5_ROW, seeds[0], method))
        for seed in seeds:
            run = table1_run(runs, FIG5_ROW, seed, method)
            for name, res in results_under(run, "finetune_l1_p50_e*_finetune/result.json").items():
                by_epoch.setdefault(int(name.split("_e")[1][:3]), []).append(res["final_test_acc"])
        last = max(by_epoch, default=None)
        for e in sorted(by_epoch):
            marked = marks.get(e, []) + (["final epoch"] if e == last else [])
            lines.append(f"| {method} | {e} | {mean_std(by_epoch[e])} | {len(by_epoch[e])} | {', '.join(marked)} |")
        if by_epoch:
            xs = sorted(by_epoch)
            ys = [sum(by_epoch[e]) / len(by_epoch[e]) for e in xs]
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=method)
            hit = [(e, y) for e, y in zip(xs, ys) if e in marks]
            if hit:
                ax.scatter(*zip(*hit), marker="*", s=160, color=f"C{i}", edgecolor="k", zorder=3,
                           label=f"{method}: marked by 02 (emergence / early bird)")
    save_plot(fig, ax, out / "fig5.png", xlabel="pretraining epoch the ticket is drawn at",
              ylabel="ticket accuracy (%)", title=f"Fig. 5 ({FIG5_ROW}, p = 50 %)")
    return "\n".join(lines)


def rise_report(runs: Path, model: str, seeds, plt, out: Path) -> str:
    lines = ["| R (kept) | mode | k | acc. (%) | training complexity | seeds |", "|---|---|---:|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    full = []
    for seed in seeds:
        ck = last_row(rise_run(runs, model, seed) / "pretrain/metrics.csv")
        if ck:
            full.append((float(ck["test_acc"]), float(ck["train_flops"])))
    for keep in RISE_KEEP:
        for mode in ("rewind", "rise"):
            pts = {}
            for seed in seeds:
                run = rise_run(runs, model, seed)
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
    save_plot(fig, ax, out / f"rise_fig4_{model}.png", xlabel="training complexity (FLOPs)", ylabel="test accuracy (%)",
              xscale="log", title=f"RISE Fig. 4 ({model})")
    return "\n".join(lines)


def report(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections, all_rows = [f"# The papers' experiment matrices (bench/paper.py report)\n\n{machine()}" + (f"; GPU {gpu_name()}" if gpu_name() else "")], []
    for row in TABLE1_ROWS:
        text, rows = table1_report(runs, row, args.seeds)
        if rows:
            table1_flops_plot(row, rows, plt, out)
            sections.append(f"## Table 1, {row} ({TABLE1_ROWS[row].config})\n\n" + text)
            all_rows += [{k: v for k, v in r.items() if k != "comm"} for r in rows]
    for panel, row in FIG4_PANELS.items():
        if (table1_run(runs, row, args.seeds[0], "loft-4") / "distance/summary.json").exists():
            sections.append(f"## Fig. 4, {panel} ({row})\n\n" + fig4_report(runs, panel, args.seeds, plt, out))
    if (table1_run(runs, FIG5_ROW, args.seeds[0], "loft-4")).exists():
        sections.append("## Fig. 5\n\n" + fig5_report(runs, args.seeds, plt, out))
    for model in RISE_MODELS:
        if rise_run(runs, model, args.seeds[0]).exists():
            sections.append(f"## RISE Fig. 4, {model}\n\n" + rise_report(runs, model, args.seeds, plt, out))
    times = [json.loads(line) for line in (runs / "paper_times.jsonl").read_text().splitlines()] \
        if (runs / "paper_times.jsonl").exists() else []
    per_matrix = {}
    for t in times:
        per_matrix[t["job"].split(":")[0]] = per_matrix.get(t["job"].split(":")[0], 0) + t["seconds"]
    made = (runs / "paper_commands.txt").read_text().splitlines() if (runs / "paper_commands.txt").exists() else []
    sections.append("## Made by (commit, command)\n\n" + "\n".join(f"    {line}" for line in made))
    sections.append("## Wall time per matrix (stage processes)\n\n" +
                    "\n".join(f"- {m}: {s / 60:.1f} min" for m, s in per_matrix.items()))
    text = "\n\n".join(sections)
    (out / "paper.md").write_text(text + "\n")
    if args.docs:
        embed(Path(args.docs), text, os.path.relpath(out.resolve(), REPO))
    (out / "table1.json").write_text(json.dumps(all_rows, indent=1))
    print(text)
    return 0


def markers(out: str) -> tuple[str, str]:
    """The lines a page marks a report's block with: one block per --out folder."""
    return f"<!-- begin: bench/paper.py report --out {out} -->", f"<!-- end: bench/paper.py report --out {out} -->"


def embed(page: Path, text: str, out: str):
    """Put the report between the page's markers for its --out folder, so the page's tables are the
    ones the report made from the runs; its headings go two levels down, under the page's section."""
    begin, end = markers(out)
    doc = page.read_text()
    if begin not in doc or end not in doc:
        raise UserError(f"--docs {page}: no '{begin}' ... '{end}' block to write the report into")
    head, rest = doc.split(begin, 1)
    body = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())
    page.write_text(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}")


def gpu_name() -> str | None:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def key_value(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{item!r}: expected dotted.key=value")
    return key, value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--only", default=None, help="comma-separated MATRIX or MATRIX:PANEL (" +
                   "; ".join(f"{m}: {', '.join(ps)}" for m, ps in PANELS.items()) + ")")
    p.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--epochs-scale", type=float, default=1.0, help="every epoch count times this (same matrix, shorter)")
    p.add_argument("--finetune-epochs-scale", type=float, default=None,
                   help="fine-tuning epochs times this instead (default: --epochs-scale)")
    p.add_argument("--set", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="a config key for every job, e.g. model.width=0.25 (repeatable; the matrix's own keys win)")
    p.add_argument("--methods", default=None, type=lambda s: s.split(","),
                   help=f"comma-separated pretraining methods to keep in table1, fig4 and fig5 ({', '.join(METHOD_SETS)})")
    p.add_argument("--rise-keep", default=None, type=lambda s: tuple(float(x) for x in s.split(",")),
                   help="rise's kept fractions R instead of " + ", ".join(map(str, RISE_KEEP)))
    p.add_argument("--budget-s", type=float, default=0, help="stop before this many seconds of wall time (0: no limit)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the driver in minutes")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--runs", default=str(REPO / "runs/paper"))
    p.add_argument("--out", default=str(REPO / "bench/results/paper"))
    p.add_argument("--docs", default=None, help="report: also write the tables into this Markdown page, between "
                   "its '<!-- begin: bench/paper.py report --out OUT -->' and '<!-- end: ... -->' lines")
    args = p.parse_args(argv)
    args.set = dict(args.set)
    args.command = shlex.join(["bench/paper.py", *(sys.argv[1:] if argv is None else argv)])
    unknown = [m for m in args.methods or () if m not in METHOD_SETS]
    if unknown:
        p.error(f"--methods {','.join(unknown)}: not one of {', '.join(METHOD_SETS)}")
    if any(not 0 < r <= 1 for r in args.rise_keep or ()):
        p.error(f"--rise-keep {args.rise_keep}: each R is a kept fraction in (0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args) if args.action == "run" else report(args)
    except UserError as e:  # a bad selection or scale: one line, exit 2, like the stages
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
