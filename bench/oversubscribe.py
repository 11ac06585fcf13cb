"""Load check (issue: reliability): 4 DeepSpeed ranks on a 2-core machine finish a quick LoFT run
with the same weights as one process — oversubscription must not change results.

    python bench/oversubscribe.py [--ranks 4] [--epochs 2]

Runs 01 on yaml/quick_c10.yaml with S = ranks, once in one process and once under
`deepspeed --num_gpus RANKS`, one torch thread per rank in both, and prints the max abs weight
difference of every epoch checkpoint, the measured bytes of both runs and the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from lib import REPO


def run(cmd, env) -> float:
    """Wall seconds of one run of `cmd`. Not lib.run_stage: both runs are timed and compared, so
    each starts over (--force) rather than being skipped, and one goes through the deepspeed launcher."""
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--runs", default=str(REPO / "runs/bench_oversubscribe"))
    args = p.parse_args(argv)
    runs = Path(args.runs)
    sets = ["--set", f"pretrain.workers={args.ranks}", "--set", f"pretrain.epochs={args.epochs}",
            "--set", "dist.threads_per_rank=1", "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    base = ["01_pretrain_loft.py", "--config", "yaml/quick_c10.yaml"]
    t1 = run([sys.executable, *base, "--run-dir", str(runs / "one"), *sets], env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(args.ranks), "--master_port", str(port)]
    tn = run([*launcher, *base, "--run-dir", str(runs / "ranks"), *sets], env)
    print(f"{os.cpu_count()} cores; one process {t1:.0f} s, {args.ranks} ranks {tn:.0f} s")
    for e in range(args.epochs + 1):
        a, b = (torch.load(runs / d / f"pretrain/epoch_{e:03d}.pt", weights_only=True)["model"] for d in ("one", "ranks"))
        print(f"epoch {e}: max |one process - {args.ranks} ranks| = "
              f"{max((a[k].double() - b[k].double()).abs().max().item() for k in a):.3g}")
    c1, cn = (json.loads((runs / d / "pretrain/comm.json").read_text())["measured_payload_bytes"] for d in ("one", "ranks"))
    print(f"measured bytes: one process {c1}, {args.ranks} ranks {cn}")


if __name__ == "__main__":
    main()
