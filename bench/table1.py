"""The paper's Table 1 at CPU scale on real CIFAR-10: ticket accuracy and communication per method.

    python bench/table1.py                      # full: yaml/bench_c10.yaml, 2 seeds (≈ 1 h on 2 cores)
    python bench/table1.py --smoke --out /tmp/t1   # a tiny version of the same pipeline (the suite runs it)

For each seed and method (dense, gpipe-2/4, localsgd-2/4, loft-2/4, loft-4 with a bf16 wire) it runs
01 (pretrain) → 03 (L1 filter pruning at 50 % and 80 %) → 04 (fine-tune, `finetune` mode), then
writes OUT/table1.md (accuracy mean ± std over seeds, on all test images and on the lossless ones,
measured and analytic bytes, ratio to LoFT), OUT/table1.json and OUT/table1.png. GPipe-S is trained
as itself: in one process, dense over S micro-batches (`pretrain.method=gpipe`), so its BN statistics
are those of B/S samples and its tickets are its own; its measured bytes are the activations and
gradients that would cross the S - 1 pipeline cuts. Runs live in RUNS/seedS/METHOD and are reused or
resumed when the script is run again.
"""
from __future__ import annotations

import json
from pathlib import Path

from lib import REPO, bench_args, machine, mean_std, pretrain, prune_and_finetune, read_json, stage

METHODS = {  # name → pretraining overrides
    "dense": {"pretrain.method": "dense"},
    "gpipe-2": {"pretrain.method": "gpipe", "pretrain.workers": 2},
    "gpipe-4": {"pretrain.method": "gpipe", "pretrain.workers": 4},
    "localsgd-2": {"pretrain.method": "localsgd", "pretrain.workers": 2},
    "localsgd-4": {"pretrain.method": "localsgd", "pretrain.workers": 4},
    "loft-2": {"pretrain.method": "loft", "pretrain.workers": 2},
    "loft-4": {"pretrain.method": "loft", "pretrain.workers": 4},
    "loft-4-bf16": {"pretrain.method": "loft", "pretrain.workers": 4, "comm.wire_dtype": "bf16"},
}
RATIOS = (0.5, 0.8)
SMOKE = {"data.train_subset": 640, "data.test_subset": 200, "data.eval_batch_size": 200, "pretrain.epochs": 1,
         "pretrain.batch_size": 32, "pretrain.local_iters": 5, "pretrain.bn_recal_batches": 2,
         "finetune.epochs": 1, "finetune.batch_size": 32, "dist.threads_per_rank": 1}


def run_all(config: Path, runs: Path, seeds: list[int], extra: dict) -> list[dict]:
    rows = []
    epochs = int(extra.get("pretrain.epochs") or stage("common.config").load_config(config).pretrain.epochs)
    for seed in seeds:
        for method, sets in METHODS.items():
            sets = {**sets, **extra, "seed": seed}
            run_dir = runs / f"seed{seed}" / method
            pretrain(config, run_dir, sets, epochs)
            comm = read_json(run_dir / "pretrain/comm.json")
            metrics = (run_dir / "pretrain/metrics.csv").read_text().splitlines()
            for ratio in RATIOS:
                tag = f"l1_p{round(100 * ratio)}"
                result = prune_and_finetune(config, run_dir, {**sets, "prune.ratio": ratio}, tag)
                rows.append({"seed": seed, "method": method, "ratio": ratio, "acc": result["final_test_acc"],
                             "acc_lossless": result.get("final_test_acc_lossless"),
                             "pretrain_acc": float(metrics[-1].split(",")[3]),
                             "measured": comm["measured_payload_bytes"], "analytic": comm["analytic_ps_bytes"],
                             "train_flops": result["train_flops"]})
    return rows


def table(rows: list[dict], config_note: str) -> str:
    by = lambda m, r, k="acc": [x[k] for x in rows if x["method"] == m and x["ratio"] == r]  # noqa: E731
    lossless = lambda m, r: mean_std(by(m, r, "acc_lossless")) if None not in by(m, r, "acc_lossless") else "—"  # noqa: E731
    first = {m: next(x for x in rows if x["method"] == m) for m in METHODS}
    lines = [config_note, "",
             "| method | acc. p=50 % | acc. p=80 % | lossless acc. p=50 % | p=80 % | measured bytes (pull+push = 2×) "
             "| analytic bytes | ratio to LoFT-S |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        S = 4 if m.endswith("4") or "-4-" in m else 2
        a = first[m]["analytic"]
        if m == "dense":
            meas, ana, ratio = f"{first[m]['measured'] / 1e9:.3f}G (1 process: 0)", "—", "—"
        elif m.startswith("gpipe"):
            meas = f"{first[m]['measured'] / 1e9:.3f}G (fwd+bwd)"
            ana = f"{a['gpipe_fwd'] / 1e9:.3f}G fwd, {a['gpipe_fwd_bwd'] / 1e9:.3f}G fwd+bwd"
            ratio = f"{a['gpipe_fwd'] / first[f'loft-{S}']['analytic']['loft']:.2f}x (fwd)"
        else:
            key = "loft" if m.startswith("loft") else "localsgd"
            meas = f"{2 * first[m]['measured'] / 1e9:.3f}G"
            loft_same_s = first[f"loft-{S}"]
            ana = f"{a[key] / 1e9:.3f}G"
            ratio = f"{(2 * first[m]['measured']) / (2 * loft_same_s['measured']):.2f}x"
        lines.append(f"| {m} | {mean_std(by(m, 0.5))} | {mean_std(by(m, 0.8))} | {lossless(m, 0.5)} | "
                     f"{lossless(m, 0.8)} | {meas} | {ana} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import statistics
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = list(METHODS)
    for i, r in enumerate(RATIOS):
        accs = [[x["acc"] for x in rows if x["method"] == m and x["ratio"] == r] for m in names]
        ax[0].bar([j + 0.4 * i for j in range(len(names))], [statistics.mean(a) for a in accs], 0.4,
                  yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accs], label=f"prune {int(r * 100)} %")
    ax[0].set_xticks([j + 0.2 for j in range(len(names))], names, rotation=30)
    ax[0].set_ylabel("ticket test accuracy after fine-tuning (%)")
    ax[0].legend()
    first = {m: next(x for x in rows if x["method"] == m) for m in names if m != "dense"}
    ax[1].bar(list(first), [(1 if m.startswith("gpipe") else 2) * x["measured"] / 1e6 for m, x in first.items()],
              color="tab:gray")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("measured bytes (MB; LoFT/Local SGD pull+push, GPipe fwd+bwd)")
    ax[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args, extra, seeds, runs, out = bench_args(__doc__, "table1", "yaml/bench_c10.yaml", SMOKE, argv)
    rows = run_all(Path(args.config), runs, seeds, extra)
    note = (f"Config {Path(args.config).name}{' (smoke sizes)' if args.smoke else ''}, seeds {seeds}, "
            f"fine-tune mode `finetune`; {machine()}.")
    md = table(rows, note)
    dry = stage("01_pretrain_loft").comm_table(stage("common.config").load_config(REPO / "yaml/preresnet18_c10.yaml"),
                                               {"name": "preresnet18", "num_classes": 10, "width": 1.0})
    (out / "table1.md").write_text(md + "\n\nPaper scale (analytic, `--dry-run --table`):\n\n" + dry + "\n")
    (out / "table1.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "table1.png")
    print(md)


if __name__ == "__main__":
    main()
