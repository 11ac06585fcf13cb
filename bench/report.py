"""Summarise a tree of runs: one Markdown table per configuration, mean ± std over seeds, and a
plot of ticket accuracy against the training FLOPs of its lineage, one point per run.

    python bench/report.py runs/                      # writes runs/report.md and runs/report.png
    python bench/report.py runs/ --out /tmp/summary   # writes /tmp/summary.md and /tmp/summary.png

A run is any folder holding pretrain/config.yaml (what 01 writes), found at any depth. Runs whose
resolved configs agree on everything but the seed (and the machine: dist.*, data.root, name) form
one configuration; each of their finetune_*/result.json folders is a row (ticket × mode, the
folder name), averaged over the seeds that have it. Runs of one configuration that share a seed
are repeats, not seeds: each repeat is reported on its own. Per run: its unpruned reference (the
last pretraining epoch's test accuracy) and the emergence epochs 02 found (distance/summary.json).

A result counts for its run only if its lineage is the run's pretraining as it is now, by the
hashes its files recorded (final.pt: the ticket's pretraining epochs; result.json: the ticket and
the rewind checkpoint). Others are listed apart, marked: `foreign` (a ticket of another run's
pretraining, e.g. 04 --ticket OTHER/...) or `stale` (the run's pretraining was redone, 01
--force, after the ticket was made). Only files the stages write are read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml

from lib import last_row, mean_std, read_json, si  # lib also puts the repository on sys.path
from common.checkpoint import FinetunedTicket, load
from common.lineage import file_sha256, pretrain_hashes
from common.runs import flat

# what a configuration is: the pretraining experiment, not the machine it ran on nor its seed
NOT_CONFIGURATION = ("seed", "name", "dist.", "data.root", "data.eval_batch_size", "data.loader_workers",
                     "prune.", "finetune.")
COLUMNS = ["best acc. (%)", "final acc. (%)", "lossless acc. (%)", "trainable params", "nonzero params",
           "FLOPs/sample", "comm. bytes", "training FLOPs"]


def number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_run(folder: Path) -> dict:
    """One run's pretraining summary and its fine-tuned tickets (those of another lineage apart),
    from the files the stages wrote."""
    cfg = flat(yaml.safe_load((folder / "pretrain/config.yaml").read_text()))
    pre = last_row(folder / "pretrain/metrics.csv")
    comm = read_json(folder / "pretrain/comm.json") or {}
    now = {"epochs": pretrain_hashes(folder / "pretrain"), "seed": cfg.get("seed"),
           "tickets": {file_sha256(t) for t in folder.glob("prune_*/ticket.pt")}}
    tickets, apart = {}, []
    for result_file in sorted(folder.glob("finetune_*/result.json")):
        res = read_json(result_file)
        final = last_row(result_file.parent / "metrics.csv")
        name = result_file.parent.name.removeprefix("finetune_")
        cells = {
            "best acc. (%)": res.get("best_test_acc"), "final acc. (%)": res.get("final_test_acc"),
            "lossless acc. (%)": number(final.get("test_acc_lossless")),
            "trainable params": res.get("params_trainable", res.get("params")),
            "nonzero params": res.get("params_nonzero"),
            "FLOPs/sample": res.get("flops_per_sample_sparse") or res.get("flops_per_sample"),
            "comm. bytes": comm.get("measured_payload_bytes"), "training FLOPs": res.get("train_flops")}
        mark = lineage_mark(folder, now, result_file.parent, res)
        if mark:
            apart.append({"name": name, "mark": mark, **cells})
        else:
            tickets[name] = cells
    return {"folder": folder, "config": cfg, "seed": cfg.get("seed"), "tickets": tickets, "apart": apart,
            "pretrain acc": number(pre.get("test_acc")), "pretrain lossless": number(pre.get("test_acc_lossless")),
            "pretrain epoch": pre.get("epoch"), "pretrain flops": number(pre.get("train_flops")),
            "comm bytes": comm.get("measured_payload_bytes"), "flops ratio": comm.get("train_flops_ratio_to_dense"),
            "distance": read_json(folder / "distance/summary.json")}


def lineage_mark(run: Path, now: dict, result_dir: Path, result: dict) -> str | None:
    """None when the result was trained from this run's pretraining as it is `now` (its epochs'
    hashes, seed, tickets' hashes), by the hashes of the pretraining epochs its ticket recorded and
    of its rewind checkpoint; else why it is not: stale (its ticket is this run's, the pretraining
    was redone since) or foreign (another run's)."""
    lineage = result.get("lineage") or {}
    ticket, rewind = lineage.get("ticket") or {}, lineage.get("rewind")
    trained = load(result_dir / "final.pt", FinetunedTicket) if (result_dir / "final.pt").is_file() else None
    recorded = (trained.pretrain_sha256 if trained else None) or {}   # none in files older than the hashes
    rewound_here = not rewind or rewind["sha256"] in now["epochs"].values()
    if rewound_here and all(now["epochs"].get(e) == h for e, h in recorded.items()):
        return None
    origin = Path(trained.pretrain_dir) if trained else Path(rewind["path"]).parent
    if ticket.get("sha256") in now["tickets"] or origin.resolve() == (run / "pretrain").resolve():
        made = (yaml.safe_load((result_dir / "config.yaml").read_text()) or {}).get("seed")
        seeds = f"seed {made} then, {now['seed']} now" if made != now["seed"] else "its epoch files changed since"
        return f"**stale**: pretrain/ was redone after its ticket was made ({seeds})"
    return f"**foreign**: ticket {ticket.get('path', result.get('ticket'))} of the pretraining in {origin}"


def pretraining_cost(cfg: dict, ratios: list) -> str:
    """What pretrain.data equalises, and the training FLOPs it spent against dense (comm.json)."""
    data = cfg.get("pretrain.data", "full")
    what = {"full": "every worker walks the whole set", "shard": "equal samples, not equal FLOPs"}[data]
    ratios = [r for r in ratios if r is not None]
    return f"Pretraining data `{data}` ({what})" + (f": training FLOPs {ratios[0]}× dense's." if ratios else ".")


def configuration(cfg: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)  # lists (milestones) as tuples: a dict key
                        for k, v in cfg.items() if not k.startswith(NOT_CONFIGURATION)))


def counts(values: list) -> str:
    """A count column's cell: the seeds' mean in k/M/G/T/P, ± their std where they disagree."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return si(statistics.mean(values), fmt=".3g", spread=spread)


def title(cfg: dict, differing: list[str]) -> tuple[str, str]:
    """A configuration's heading, and its short name in the plot's legend (the method and what differs)."""
    method = cfg["pretrain.method"]
    label = method if method == "dense" else f"{method}-{cfg['pretrain.workers']}"
    extra = [f"{k}={cfg.get(k)}" for k in differing if k not in ("pretrain.method", "pretrain.workers")]
    extra = f" ({', '.join(extra)})" if extra else ""
    return (f"{label}: {cfg['model.arch']} width {cfg['model.width']}, {cfg['data.dataset']}, "
            f"{cfg['pretrain.epochs']} pretraining epochs{extra}", f"{label}{extra}")


def repeats(group: list[dict]) -> list[list[dict]]:
    """A configuration's runs as sets of distinct seeds: a run whose seed is already in a set
    (a repeat: another launch of the same experiment) starts or joins the next one."""
    sets: list[list[dict]] = []
    for run in group:
        free = next((s for s in sets if run["seed"] not in {r["seed"] for r in s}), None)
        if free is None:
            sets.append([run])
        else:
            free.append(run)
    return sets


def emergence(run: dict, key: str) -> str:
    """An epoch of distance/summary.json; '—' where 02 has not run."""
    if run["distance"] is None:
        return "— (no 02)"
    return "not reached" if run["distance"].get(key) is None else str(run["distance"][key])


RUN_COLUMNS = ["run", "seed", "unpruned acc. (%)", "pretraining FLOPs", "comm. bytes", "filter emergence epoch",
               "early-bird epoch"]


def run_rows(group: list[dict]) -> list[str]:
    """One row per run: its unpruned reference (the last pretraining epoch) and what 02 found."""
    lines = ["| " + " | ".join(RUN_COLUMNS) + " |", "|---|---:|" + "---:|" * (len(RUN_COLUMNS) - 2)]
    for r in group:
        epoch = f" (epoch {r['pretrain epoch']})" if r["pretrain epoch"] else ""
        lines.append(f"| {r['folder']} | {r['seed']} | {mean_std([r['pretrain acc']])}{epoch} | "
                     f"{counts([r['pretrain flops']])} | {counts([r['comm bytes']])} | "
                     f"{emergence(r, 'filter_emergence_epoch')} | {emergence(r, 'early_bird_epoch')} |")
    return lines + [""]


def apart_rows(group: list[dict]) -> list[str]:
    """The results of another lineage, each on its own row, marked; never pooled, not plotted."""
    apart = [(r, a) for r in group for a in r["apart"]]
    if not apart:
        return []
    lines = ["Not this run's lineage (listed apart, not pooled, not plotted):", "",
             "| run | ticket × mode | lineage | best acc. (%) | final acc. (%) | training FLOPs |",
             "|---|---|---|---:|---:|---:|"]
    for r, a in apart:
        lines.append(f"| {r['folder']} | {a['name']} | {a['mark']} | {mean_std([a['best acc. (%)']])} | "
                     f"{mean_std([a['final acc. (%)']])} | {counts([a['training FLOPs']])} |")
    return lines + [""]


def report(root: Path) -> tuple[str, list[dict]]:
    """The Markdown text and the plot's points: one per run and ticket × mode, one per run's unpruned model."""
    runs = [read_run(p.parent.parent) for p in sorted(root.rglob("pretrain/config.yaml"))]
    if not runs:
        raise SystemExit(f"error: {root}: no runs (folders holding pretrain/config.yaml)")
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(configuration(run["config"]), []).append(run)
    keys = sorted({k for g in groups for k, _ in g})
    differing = [k for k in keys if len({dict(g).get(k) for g in groups}) > 1]
    lines, points = [f"# Runs under {root}", ""], []
    for group in groups.values():
        name, short = title(group[0]["config"], differing)
        sets = repeats(group)
        for i, distinct in enumerate(sets):
            repeat = (i + 1, len(sets)) if len(sets) > 1 else None
            text, dots = seeds_section(distinct, name, short, repeat)
            lines += text
            points += dots
    return "\n".join(lines), points


def seeds_section(group: list[dict], name: str, short: str, repeat: tuple[int, int] | None):
    """Runs of one configuration with distinct seeds (`repeat`: the i-th of n sets that share seeds):
    the pretraining over seeds, each run's row, the fine-tuned tickets (mean ± std over seeds), the
    results of another lineage apart. Returns the Markdown lines and the plot's points."""
    seeds, cfg = sorted(r["seed"] for r in group), group[0]["config"]
    note = []
    if repeat:
        name, short = f"{name} (repeat {repeat[0]} of {repeat[1]})", f"{short} repeat {repeat[0]}"
        note = [f"The runs of this configuration share seeds: {repeat[1]} repeats, each reported on its own "
                "(a repeat is not another seed).", ""]
    lines = [f"## {name}", "", *note,
             f"Seeds {seeds} ({len(seeds)} run{'s' if len(seeds) > 1 else ''}: "
             f"{', '.join(str(r['folder']) for r in group)}); pretraining test accuracy "
             f"{mean_std([r['pretrain acc'] for r in group])} %"
             + (f", lossless {mean_std([r['pretrain lossless'] for r in group])} %"
                if any(r["pretrain lossless"] is not None for r in group) else "") + ". "
             + pretraining_cost(cfg, [r["flops ratio"] for r in group]), "", *run_rows(group)]
    points = [{"label": f"{short} unpruned", "acc": r["pretrain acc"], "flops": r["pretrain flops"]} for r in group]
    rows = sorted({row for r in group for row in r["tickets"]})
    if not rows:
        lines += ["(no fine-tuned tickets of this lineage yet)", ""]
    else:
        lines += ["| ticket × mode | seeds | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
        for row in rows:
            have = [r["tickets"][row] for r in group if row in r["tickets"]]
            cells = [(mean_std if "acc." in c else counts)([h[c] for h in have]) for c in COLUMNS]
            lines.append(f"| {row} | {len(have)} | " + " | ".join(cells) + " |")
            points += [{"label": f"{short} {row}", "acc": h["final acc. (%)"], "flops": h["training FLOPs"]}
                       for h in have]
        lines.append("")
    return lines + apart_rows(group), points


def figure(points: list[dict], root: Path):
    """Final test accuracy against training FLOPs: one point per run (so per seed) and ticket × mode,
    one colour per row of the report; the unpruned models as crosses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(p["label"] for p in points if p["acc"] is not None and p["flops"]))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for i, label in enumerate(labels):
        mine = [p for p in points if p["label"] == label and p["acc"] is not None and p["flops"]]
        ax.scatter([p["flops"] for p in mine], [p["acc"] for p in mine], color=colours(i % colours.N),
                   marker="x" if label.endswith(" unpruned") else "o", label=f"{label} ({len(mine)} run"
                   f"{'s' if len(mine) > 1 else ''})")
    ax.set_xscale("log")
    ax.set_title(f"Ticket accuracy against training FLOPs, {root}\n(one point per run and seed; x: the unpruned "
                 "pretrained model)", fontsize=10)
    ax.set_xlabel("training FLOPs (ticket: pretraining up to its weights + its own training; unpruned: pretraining)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    if labels:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="a folder of runs, e.g. runs/")
    p.add_argument("--out", default=None, help="OUT.md and OUT.png (default: ROOT/report)")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"error: {root}: no such folder")
    text, points = report(root)
    out = Path(args.out) if args.out else root / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    fig = figure(points, root)
    fig.savefig(out.with_suffix(".png"), dpi=90)
    import matplotlib.pyplot as plt  # figure() chose the Agg backend
    plt.close(fig)
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
