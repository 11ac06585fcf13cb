"""The paper's Fig. 4 at CPU scale: filter distance to the final epoch, LoFT vs dense, same runs as table1.

    python bench/table1.py && python bench/fig4.py          # reads runs/bench_table1/seed0/*
    python bench/fig4.py --smoke --out /tmp/t1              # after table1 --smoke

Runs 02 on every pretraining run of one seed (LoFT-2/4, Local SGD-2/4, dense) with `--compare`, copies
the comparison plot to OUT/fig4.png and writes OUT/fig4.md with the epoch each emergence rule fires.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lib import REPO, read_json, run_stage
from table1 import METHODS, SMOKE


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "yaml/bench_c10.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    p.add_argument("--runs", default=None)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    runs = Path(args.runs or REPO / ("runs/bench_table1_smoke" if args.smoke else "runs/bench_table1")) / f"seed{args.seed}"
    sets = {**(SMOKE if args.smoke else {}), "seed": args.seed, **({"data.root": args.data_root} if args.data_root else {})}
    methods = [m for m in METHODS if not m.endswith("bf16") and not m.startswith("gpipe")]
    for m in methods:
        others = [str(runs / o) for o in methods if o != m] if m == "loft-4" else []
        run_stage("02_filter_distance", args.config, runs / m, {**sets, **METHODS[m]},
                  *(["--compare", *others] if others else []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs / "loft-4/distance/compare.png", out / "fig4.png")
    lines = ["| pretraining | filter-distance emergence epoch | early-bird epoch | F(final, 0) | F(final, E/2) |",
             "|---|---:|---:|---:|---:|"]
    for m in methods:
        s = read_json(runs / m / "distance/summary.json")
        fmt = lambda v: "not reached" if v is None else str(v)  # noqa: E731
        half = str(s["epochs"][-1] // 2)
        lines.append(f"| {m} | {fmt(s['filter_emergence_epoch'])} | {fmt(s['early_bird_epoch'])} | "
                     f"{s['distance_to_final']['0']:.3f} | {s['distance_to_final'][half]:.3f} |")
    rule = read_json(runs / "loft-4/distance/summary.json")["filter_emergence_rule"]
    (out / "fig4.md").write_text("\n".join(lines) + f"\n\nFilter-distance rule: {rule}.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
