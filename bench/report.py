"""Summarise a tree of runs: one Markdown table per configuration, mean ± std over seeds, and a
plot of ticket accuracy against the training FLOPs of its lineage.

    python bench/report.py runs/                      # writes runs/report.md and runs/report.png
    python bench/report.py runs/ --out /tmp/summary   # writes /tmp/summary.md and /tmp/summary.png

A run is any folder holding pretrain/config.yaml (what 01 writes), found at any depth. Runs whose
resolved configs agree on everything but the seed (and the machine: dist.*, data.root, name) form
one configuration; each of their finetune_*/result.json folders is a row (ticket × mode, the
folder name), averaged over the seeds that have it. Only files the stages write are read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml

from lib import last_row, mean_std, read_json, si  # lib also puts the repository on sys.path
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
    """One run's pretraining summary and its fine-tuned tickets, from the files the stages wrote."""
    cfg = flat(yaml.safe_load((folder / "pretrain/config.yaml").read_text()))
    pre = last_row(folder / "pretrain/metrics.csv")
    comm = read_json(folder / "pretrain/comm.json") or {}
    tickets = {}
    for result_file in sorted(folder.glob("finetune_*/result.json")):
        res = read_json(result_file)
        final = last_row(result_file.parent / "metrics.csv")
        tickets[result_file.parent.name.removeprefix("finetune_")] = {
            "best acc. (%)": res.get("best_test_acc"), "final acc. (%)": res.get("final_test_acc"),
            "lossless acc. (%)": number(final.get("test_acc_lossless")),
            "trainable params": res.get("params_trainable", res.get("params")),
            "nonzero params": res.get("params_nonzero"),
            "FLOPs/sample": res.get("flops_per_sample_sparse") or res.get("flops_per_sample"),
            "comm. bytes": comm.get("measured_payload_bytes"), "training FLOPs": res.get("train_flops")}
    return {"folder": folder, "config": cfg, "seed": cfg.get("seed"), "tickets": tickets,
            "pretrain acc": number(pre.get("test_acc")), "pretrain lossless": number(pre.get("test_acc_lossless")),
            "flops ratio": comm.get("train_flops_ratio_to_dense")}


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


def title(cfg: dict, differing: list[str]) -> str:
    method = cfg["pretrain.method"]
    label = method if method == "dense" else f"{method}-{cfg['pretrain.workers']}"
    extra = [f"{k}={cfg.get(k)}" for k in differing if k not in ("pretrain.method", "pretrain.workers")]
    return (f"{label}: {cfg['model.arch']} width {cfg['model.width']}, {cfg['data.dataset']}, "
            f"{cfg['pretrain.epochs']} pretraining epochs" + (f" ({', '.join(extra)})" if extra else ""))


def report(root: Path) -> tuple[str, list[dict]]:
    """The Markdown text and one point per (configuration, ticket × mode) for the plot."""
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
        cfg = group[0]["config"]
        seeds = sorted(r["seed"] for r in group)
        lines += [f"## {title(cfg, differing)}", "",
                  f"Seeds {seeds} ({len(seeds)} run{'s' if len(seeds) > 1 else ''}: "
                  f"{', '.join(str(r['folder']) for r in group)}); pretraining test accuracy "
                  f"{mean_std([r['pretrain acc'] for r in group])} %"
                  + (f", lossless {mean_std([r['pretrain lossless'] for r in group])} %"
                     if any(r["pretrain lossless"] is not None for r in group) else "") + ". "
                  + pretraining_cost(cfg, [r["flops ratio"] for r in group]), ""]
        rows = sorted({name for r in group for name in r["tickets"]})
        if not rows:
            lines += ["(no fine-tuned tickets yet)", ""]
            continue
        lines += ["| ticket × mode | seeds | " + " | ".join(COLUMNS) + " |",
                  "|---|---:|" + "---:|" * len(COLUMNS)]
        for name in rows:
            have = [r["tickets"][name] for r in group if name in r["tickets"]]
            cells = [(mean_std if "acc." in c else counts)([h[c] for h in have]) for c in COLUMNS]
            lines.append(f"| {name} | {len(have)} | " + " | ".join(cells) + " |")
            points.append({"configuration": title(cfg, differing), "row": name,
                           "acc": [h["final acc. (%)"] for h in have], "flops": [h["training FLOPs"] for h in have]})
        lines.append("")
    return "\n".join(lines), points


def plot(points: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        acc = [a for a in p["acc"] if a is not None]
        flops = [f for f in p["flops"] if f is not None]
        if not acc or not flops:
            continue
        ax.errorbar(statistics.mean(flops), statistics.mean(acc), yerr=statistics.stdev(acc) if len(acc) > 1 else 0,
                    marker="o", capsize=3, label=f"{p['configuration'].split(':')[0]} {p['row']}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs of the lineage (pretraining + ticket training)")
    ax.set_ylabel("final test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    plot(points, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
