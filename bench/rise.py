"""The RISE paper's comparison at CPU scale: I-LOT (losers held at 0) vs RISE (losers locked at
their epoch-k values), keep R = 10 % and 50 %, accuracy vs training FLOPs.

    python bench/rise.py                          # yaml/rise_bench_c10.yaml (ResNet-20), 2 seeds
    python bench/rise.py --smoke --out /tmp/rise  # tiny sizes, one seed (the suite runs it)

Per seed: 01 (dense pretraining, the epoch-k checkpoint is the rewind point) → 03 (global
magnitude mask from the final epoch) → 04 with finetune.mode=rewind (I-LOT) and =rise, for each R.
Writes OUT/rise.md (final accuracy mean ± std, also on the lossless test images; training complexity
as the RISE paper plots it: pretraining to the rewind epoch k + the ticket's training with a
backward over the winners only; beside it, the pretraining after k that only found the mask) and
OUT/rise.png (test accuracy after each ticket-training epoch against that training complexity).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from lib import bench_args, machine, mean_std, pretrain, prune_and_finetune, stage

KEEP = (0.1, 0.5)
MODES = {"rewind": "I-LOT (losers at 0)", "rise": "RISE (losers at epoch k)"}
SMOKE = {"data.train_subset": 640, "data.test_subset": 200, "data.eval_batch_size": 200, "pretrain.epochs": 2,
         "pretrain.batch_size": 32, "pretrain.bn_recal_batches": 2, "finetune.epochs": 1,
         "finetune.batch_size": 32, "dist.threads_per_rank": 1}


def curve(out_dir: Path, result: dict) -> tuple[list[float], list[float]]:
    """(cumulative training FLOPs, test accuracy) after each ticket-training epoch."""
    rows = list(csv.DictReader(open(out_dir / "metrics.csv")))
    before, ft = result["train_flops_parts"]["before_this_stage"], result["train_flops_parts"]["finetune"]
    return ([before + ft * (i + 1) / len(rows) for i in range(len(rows))], [float(r["test_acc"]) for r in rows])


def main(argv=None):
    args, extra, seeds, runs, out = bench_args(__doc__, "rise", "yaml/rise_bench_c10.yaml", SMOKE, argv)
    cfg = stage("common.config").load_config(args.config, [f"{k}={v}" for k, v in extra.items()])
    rows, curves = [], {}
    for seed in seeds:
        run_dir = runs / f"seed{seed}"
        sets = {**extra, "seed": seed, "pretrain.method": "dense"}
        pretrain(args.config, run_dir, sets, cfg.pretrain.epochs)
        for keep in KEEP:
            tag = f"mag_r{round(100 * keep)}"
            for mode in MODES:
                res = prune_and_finetune(args.config, run_dir, {**sets, "prune.kind": "magnitude",
                                                                "prune.ratio": round(1 - keep, 6),
                                                                "finetune.mode": mode}, tag)
                rows.append({"seed": seed, "keep": keep, "mode": mode, "acc": res["final_test_acc"],
                             "acc_lossless": res.get("final_test_acc_lossless"),
                             "train_flops": res["train_flops"], "mask_search_flops": res["mask_search_flops"]})
                curves.setdefault((keep, mode), []).append(curve(run_dir / f"finetune_{tag}_{mode}", res))
    lines = [f"Config {Path(args.config).name}{' (smoke sizes)' if args.smoke else ''}: {cfg.model.arch}, rewind "
             f"epoch k = {cfg.finetune.rewind_epoch}, seeds {seeds}; {machine()}.", "",
             "| keep R | I-LOT acc. (%) | RISE acc. (%) | RISE − I-LOT (pt) | lossless: I-LOT / RISE (%) "
             "| training complexity | mask search (beside) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for keep in KEEP:
        pick = lambda m, k="acc": [r[k] for r in rows if r["keep"] == keep and r["mode"] == m]  # noqa: E731
        acc = {m: pick(m) for m in MODES}
        diff = sum(acc["rise"]) / len(acc["rise"]) - sum(acc["rewind"]) / len(acc["rewind"])
        lossless = " / ".join(mean_std(pick(m, "acc_lossless")) if None not in pick(m, "acc_lossless") else "—"
                              for m in MODES)
        first = next(r for r in rows if r["keep"] == keep)
        lines.append(f"| {int(keep * 100)} % | {mean_std(acc['rewind'])} | {mean_std(acc['rise'])} | {diff:+.2f} | "
                     f"{lossless} | {first['train_flops'] / 1e12:.3f} TFLOP | {first['mask_search_flops'] / 1e12:.3f} TFLOP |")
    (out / "rise.md").write_text("\n".join(lines) + "\n")
    (out / "rise.json").write_text(json.dumps(rows, indent=1))
    plot(curves, out / "rise.png")
    print("\n".join(lines))


def plot(curves: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (keep, mode), runs in sorted(curves.items()):
        xs, ys = runs[0][0], [sum(r[1][i] for r in runs) / len(runs) for i in range(len(runs[0][1]))]
        ax.plot([x / 1e12 for x in xs], ys, marker="o", ls="-" if mode == "rise" else "--",
                label=f"R = {int(keep * 100)} %, {MODES[mode]}")
    ax.set_xlabel("training complexity (TFLOP: dense pretraining to epoch k + ticket training, winners' backward)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ticket training: I-LOT vs RISE (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
