"""pretrain.overlap on a Bottleneck ResNet: IST's block-diagonal split against partitioning only
non-adjacent groups, measured on one CPU-scale run each (yaml/resnet50_c10.yaml, real CIFAR-10).

    python bench/overlap.py                          # S = 2 and 4, both modes; writes bench/results/overlap.md
    python bench/overlap.py --workers 2 --epochs 1 --out /tmp/o   # a quick look

A Bottleneck's 3x3 conv2 lies on two groups (its inputs are conv1's channels, its outputs its
own). block_diagonal partitions both: worker w trains conv2's block [its outputs x its inputs]
(1/S² of it) and the off-diagonal blocks rest that round. non_adjacent partitions conv1's group
only: conv2 is cut along its inputs (1/S each) and its outputs, bn2 and conv3's inputs are shared.
Each run: 01 (LoFT), 03 (L1, 50 %), 04 (fine-tune); the table reads their files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib import REPO, add_run_args, pretrain_stage, prune_and_finetune, read_json, run_stage, write_results

CONFIG = REPO / "yaml/resnet50_c10.yaml"


def one_run(root: Path, data_root: str, workers: int, overlap: str, epochs: int, finetune_epochs: int) -> dict:
    run = root / f"s{workers}_{overlap}"
    sets = {"data.root": data_root, "pretrain.workers": workers, "pretrain.overlap": overlap,
            "pretrain.epochs": epochs, "finetune.epochs": finetune_epochs}
    run_stage(pretrain_stage(CONFIG, run, sets))
    result = prune_and_finetune(CONFIG, run, sets, "l1_p50")
    last = read_json(run / "pretrain/comm.json")
    ck = __import__("torch").load(run / f"pretrain/epoch_{epochs:03d}.pt", weights_only=True)
    return {"workers": workers, "overlap": overlap, "pretrained_acc": ck["test_acc"],
            "ticket_acc": result["final_test_acc"], "measured_MB": last["measured_payload_bytes"] / 1e6,
            "analytic_MB": last["analytic_ps_bytes"]["loft"] / 1e6,
            "train_flops_ratio_to_dense": last["train_flops_ratio_to_dense"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    add_run_args(ap, epochs=5, finetune_epochs=2, runs="runs/bench_overlap")
    args = ap.parse_args(argv)
    rows = [one_run(Path(args.runs), args.data_root, s, mode, args.epochs, args.finetune_epochs)
            for s in args.workers for mode in ("block_diagonal", "non_adjacent")]
    table = ["| S | overlap | pretrained acc % | 50 % ticket acc % | measured MB | analytic MB (PS) | "
             "train FLOPs / dense |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['workers']} | {r['overlap']} | {r['pretrained_acc']:.2f} | {r['ticket_acc']:.2f} | "
                     f"{r['measured_MB']:.1f} | {r['analytic_MB']:.1f} | {r['train_flops_ratio_to_dense']:.3f} |")
    write_results(args.out, "overlap", f"pretrain.overlap on ResNet-50 (yaml/resnet50_c10.yaml), {args.epochs} LoFT "
                  f"epochs + {args.finetune_epochs} fine-tuning epochs of the 50 % L1 ticket", "bench/overlap.py", argv,
                  table, rows)

if __name__ == "__main__":
    main()
