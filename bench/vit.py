"""LoFT beyond CNNs: dense vs LoFT-2 and LoFT-4 at equal samples on a small ViT (yaml/vit_c10.yaml,
real CIFAR-10), its MLP hidden neurons partitioned and pruned.

    python bench/vit.py                      # writes bench/results/vit.md and vit.json
    python bench/vit.py --epochs 2 --finetune-epochs 1 --out /tmp/v   # a quick look

Each run: 01 (dense, or LoFT-S with pretrain.data=shard: every image seen as often as by dense),
02 (filter distance of the MLP neurons' L1 rankings to the final epoch), 03 (L1, 50 % of every
MLP hidden layer), 04 (fine-tune the ticket). Bytes per round: LoFT's measured (comm.json) and the
paper's parameter-server count, against Local SGD's over the same real aggregation code path
(`lib.measured_round_bytes` with no partitioned group: the trainers' own exchange). Per-worker
memory: the parameters a worker holds (fp32). The table reads the stages' files; nothing here trains by itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib import (REPO, add_run_args, distance_stage, measured_round_bytes, pretrain_stage, prune_and_finetune,
                 read_json, run_stage, write_results)

CONFIG = REPO / "yaml/vit_c10.yaml"
METHODS = {"dense": {"pretrain.method": "dense"},
           "LoFT-2": {"pretrain.method": "loft", "pretrain.workers": 2, "pretrain.data": "shard"},
           "LoFT-4": {"pretrain.method": "loft", "pretrain.workers": 4, "pretrain.data": "shard"}}


def localsgd_round_bytes(arch: dict, workers: int) -> int:
    """Bytes one Local SGD round hands to the collectives: every worker's full state, through the
    same aggregation code LoFT uses (measured by its Comm, one process)."""
    from common.models import build_model
    return measured_round_bytes(build_model(arch).state_dict(), [], workers)


def worker_params(arch: dict, workers: int, method: str) -> int:
    from common.loft import draw_partition, worker_arch
    from common.models import build_model
    from common.selection import partitioned_blocks
    model = build_model(arch)
    if method == "dense":
        return sum(p.numel() for p in model.parameters())
    part = draw_partition(partitioned_blocks(model, arch=arch), workers, 0, 0)
    return sum(p.numel() for p in build_model(worker_arch(arch, part, 0)).parameters())


def one_run(root: Path, data_root: str, label: str, epochs: int, finetune_epochs: int) -> dict:
    run = root / label.lower().replace("-", "")
    sets = {"data.root": data_root, "pretrain.epochs": epochs, "finetune.epochs": finetune_epochs, **METHODS[label]}
    run_stage(pretrain_stage(CONFIG, run, sets))
    run_stage(distance_stage(CONFIG, run, sets))
    result = prune_and_finetune(CONFIG, run, sets, "l1_p50")
    comm = read_json(run / "pretrain/comm.json")
    summary = read_json(run / "distance/summary.json")
    import torch
    ck = torch.load(run / f"pretrain/epoch_{epochs:03d}.pt", weights_only=True)
    S = int(sets.get("pretrain.workers", 1))
    rounds = comm["analytic_ps_bytes"]["rounds"]
    row = {"method": label, "pretrained_acc": ck["test_acc"], "ticket_acc": result["final_test_acc"],
           "train_flops": ck["train_flops"], "train_flops_ratio_to_dense": comm["train_flops_ratio_to_dense"],
           "worker_param_MB": worker_params(ck["arch"], S, sets["pretrain.method"]) * 4 / 1e6,
           "distance_to_final": summary["distance_to_final"]}
    if label != "dense":
        row.update(rounds=rounds, measured_round_MB=comm["measured_payload_bytes"] / rounds / 1e6,
                   analytic_round_MB=comm["analytic_ps_bytes"]["loft"] / rounds / 1e6,
                   localsgd_measured_round_MB=localsgd_round_bytes(ck["arch"], S) / 1e6,
                   localsgd_analytic_round_MB=comm["analytic_ps_bytes"]["localsgd"] / rounds / 1e6)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap, epochs=10, finetune_epochs=3, runs="runs/bench_vit")
    args = ap.parse_args(argv)
    rows = [one_run(Path(args.runs), args.data_root, m, args.epochs, args.finetune_epochs) for m in METHODS]
    table = ["| method | pretrained acc % | 50 % ticket acc % | train FLOPs / dense | per-worker params MB | "
             "bytes/round measured MB (Local SGD) | bytes/round analytic MB (Local SGD) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        comm = ("—", "—") if r["method"] == "dense" else (
            f"{r['measured_round_MB']:.2f} ({r['localsgd_measured_round_MB']:.2f})",
            f"{r['analytic_round_MB']:.2f} ({r['localsgd_analytic_round_MB']:.2f})")
        table.append(f"| {r['method']} | {r['pretrained_acc']:.2f} | {r['ticket_acc']:.2f} | "
                     f"{r['train_flops_ratio_to_dense']:.3f} | {r['worker_param_MB']:.2f} | {comm[0]} | {comm[1]} |")
    epochs = list(rows[0]["distance_to_final"])
    table += ["", "Filter distance to the final epoch (network mean, normalised top-k, 02's distance_to_final):", "",
              "| method | " + " | ".join(f"e{e}" for e in epochs) + " |", "|---|" + "---:|" * len(epochs)]
    for r in rows:
        table.append(f"| {r['method']} | " + " | ".join(f"{r['distance_to_final'][e]:.3f}" for e in epochs) + " |")
    write_results(args.out, "vit", f"ViT-CIFAR (yaml/vit_c10.yaml): dense vs LoFT over the MLP hidden neurons, equal "
                  f"samples, {args.epochs} epochs + {args.finetune_epochs} fine-tuning epochs of the 50 % L1 ticket",
                  "bench/vit.py", argv, table, rows)

if __name__ == "__main__":
    main()
