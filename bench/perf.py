"""Per-worker speed, memory, traffic and data loading of LoFT vs dense, measured in one process.

    python bench/perf.py                                  # yaml/bench_c10.yaml's model, batch 64
    python bench/perf.py --width 1.0 --batch 128          # the paper's PreActResNet-18

(a) time of one LoFT-S worker's training step vs one dense step on the same batch, next to the
    subnetwork's share of the dense FLOPs (FlopCounterMode) — the physical limit, for S = 2, 4;
(b) peak training memory of a worker: weights + gradients + momentum + the activations autograd
    saves for backward, each measured from the live tensors of a real step (saved tensors through
    torch.autograd.graph.saved_tensors_hooks, counted once per storage);
(c) bytes one round hands to the collectives with comm.wire_dtype fp32 vs bf16 (the real
    aggregate() on real subnetwork states), and the ticket accuracy cost of bf16 from
    bench/results/table1.json when table1 has run;
(d) the data loader alone (augmented batches per second) vs the training step rate.
Writes OUT/perf.md. Run it on an otherwise idle machine: the timings are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lib import REPO, machine
from common.config import load_config
from common.costs import flops_per_sample
from common.data import Stream, load_dataset
from common.dist import Comm, DistEnv
from common.loft import SlicePlan, aggregate, draw_partition, extract, worker_arch
from common.models import build_model, partitioned_blocks
from common.train import make_sgd


def timed_steps(model, batches, repeats: int) -> float:
    """Median seconds of one SGD step (forward, backward, update) after two warm-up steps."""
    opt = make_sgd(model, 0.01, 0.9, 5e-4)
    model.train()
    times = []
    for i in range(repeats + 2):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def training_memory(model, x, y) -> dict:
    """Bytes of weights, gradients, momentum and saved activations of one real step."""
    opt = make_sgd(model, 0.01, 0.9, 5e-4)
    model.train()
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params = list(model.parameters())
    mem = {"weights": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
           "momentum": nbytes(opt.state[p]["momentum_buffer"] for p in params if p in opt.state),
           "activations": sum(seen.values())}
    mem["total"] = sum(mem.values())
    return mem


def round_bytes(arch, blocks, state, S, wire) -> int:
    """Payload of one LoFT aggregation (all S workers) through the real code path."""
    part = draw_partition(blocks, S, 0, 0)
    plan = SlicePlan.of(blocks, state)
    comm = Comm(DistEnv(), wire)
    aggregate(state, plan, part, {w: extract(state, plan, part, w) for w in range(S)}, comm, S)
    return comm.bytes_sent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "yaml/bench_c10.yaml"))
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.width={args.width}"] if args.width else [])
    arch = {"name": cfg.model.arch, "num_classes": 10, "width": cfg.model.width}
    train = load_dataset(cfg.data, train=True)
    stream = Stream(train, args.batch, 0, 0)
    batches = [stream.batch(t) for t in range(4)]
    torch.manual_seed(0)
    dense = build_model(arch)
    blocks = partitioned_blocks(dense, cfg.pretrain.partition_stage1)
    state = dense.state_dict()
    rows, dense_flops = [], flops_per_sample(dense, backward=True)
    t_dense = timed_steps(dense, batches, args.repeats)
    m_dense = training_memory(build_model(arch), *batches[0])
    for S in (2, 4):
        sub = build_model(worker_arch(arch, draw_partition(blocks, S, 0, 0), 0))
        share = flops_per_sample(sub, backward=True) / dense_flops
        t = timed_steps(sub, batches, args.repeats)
        m = training_memory(build_model(worker_arch(arch, draw_partition(blocks, S, 0, 0), 0)), *batches[0])
        b32, b16 = (round_bytes(arch, blocks, state, S, w) for w in ("fp32", "bf16"))
        rows.append({"S": S, "flop_share": share, "time_ratio": t / t_dense, "time_over_share": (t / t_dense) / share,
                     "mem_ratio": m["total"] / m_dense["total"], "mem": m, "bytes_fp32": b32, "bytes_bf16": b16})
    t0 = time.perf_counter()
    n = 30
    for t in range(n):
        stream.batch(100 + t)
    loader_rate = n * args.batch / (time.perf_counter() - t0)
    train_rate = args.batch / t_dense

    lines = [f"{arch['name']} width {arch['width']}, batch {args.batch}, {torch.get_num_threads()} threads; {machine()}", "",
             "| S | FLOP share of a worker step | time of a worker step / dense step | time ÷ FLOP share | "
             "peak memory / dense | bytes per round fp32 | bf16 | bf16 / fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['S']} | {r['flop_share']:.3f} | {r['time_ratio']:.3f} | {r['time_over_share']:.2f} | "
                     f"{r['mem_ratio']:.3f} | {r['bytes_fp32'] / 1e6:.2f} MB | {r['bytes_bf16'] / 1e6:.2f} MB | "
                     f"{r['bytes_bf16'] / r['bytes_fp32']:.3f} |")
    lines += ["", f"dense step {t_dense * 1e3:.1f} ms; memory (MB) dense "
              + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in m_dense.items())]
    for r in rows:
        lines.append(f"LoFT-{r['S']} worker memory (MB): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in r["mem"].items()))
    lines.append(f"\ndata loader alone: {loader_rate:.0f} images/s; dense training: {train_rate:.0f} images/s "
                 f"(loader / training = {loader_rate / train_rate:.1f}x)")
    table1 = Path(args.out) / "table1.json"
    if table1.exists():
        res = json.loads(table1.read_text())
        acc = lambda m: statistics.mean(x["acc"] for x in res if x["method"] == m and x["ratio"] == 0.5)  # noqa: E731
        lines.append(f"ticket accuracy at 50 % (table1.json): loft-4 fp32 {acc('loft-4'):.2f} %, "
                     f"bf16 wire {acc('loft-4-bf16'):.2f} % (difference {acc('loft-4-bf16') - acc('loft-4'):+.2f} pt)")
    text = "\n".join(lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "perf.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
