"""The project's training speed against a plain PyTorch loop, memory and traffic, in one run on
whatever device it finds (CUDA if visible, else the CPU).

    python bench/perf.py                                                    # CPU, yaml/bench_c10.yaml's model
    python bench/perf.py --width 1.0 --batch 128 --data-root $LOFT_DATA --out bench/results/gpu   # the paper's setting
    python bench/perf.py --config yaml/resnet50_c10.yaml --out bench/results/resnet50   # a brought model (torchvision ResNet-50)

(a) step time: a plain loop (batches already on the device, `F.cross_entropy`, SGD) against the
    project's own step over the same modules — dense (`Dense.train_step`, its batch made by
    its stream) and LoFT-S workers (`Loft.run_round` divided by its S·K steps, so partition,
    slice copies and aggregation are included), S = 2, 4, in fp32 and in bf16 autocast +
    channels_last (bf16 applies on CUDA only);
(b) peak memory of a LoFT-S worker vs dense: `torch.cuda.max_memory_allocated` on CUDA; on the
    CPU the live tensors of a step (weights, gradients, momentum, saved activations);
(c) bytes one round hands to the collectives, fp32 vs bf16 wire;
(d) fused workers (pretrain.fused_workers): a round with the S workers as one grouped module
    against the same round with the workers in turn, and its step (all S workers) against a
    dense step;
(e) epoch time of dense and LoFT-4 at the full 50,000 images (from the measured step and round
    times, plus a measured evaluation + BN recalibration) and the 20-epoch projection;
(f) on CUDA, the cost of dist.deterministic (deterministic kernels, no cuDNN autotuning);
(g) operators dispatched (launches) per step and per LoFT-4 round, and per RISE fine-tuning step,
    against the plain loop's (bench/ops.py; deterministic, unlike the times).
Writes OUT/perf.md and OUT/perf.json. Ratios come from one run; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lib import REPO, machine, measured_round_bytes
from ops import count_ops, plain_loop
from common.config import load_config
from common.costs import flops_per_sample
from common.data import TRAIN_SIZE, Stream, load_dataset, on_device
from common.dist import Comm, DistEnv, configure_kernels
from common.loft import draw_partition, worker_arch
from common.models import arch_of, build_model
from common.selection import partitioned_blocks
from common.pretrain import RECAL_STREAM, Dense, Loft
from common.train import correct_per_sample, make_sgd, recalibrate_bn

PRECISIONS = {"fp32": [], "bf16+channels_last": ["pretrain.bf16=true", "pretrain.channels_last=true"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, calls: int, device, warmup: int = 3) -> float:
    """Wall time of `calls` calls after `warmup` (cuDNN autotuning, allocator), device synced."""
    for i in range(warmup):
        fn(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(warmup + i)
    sync(device)
    return (time.perf_counter() - t0) / calls


def peak_memory(model_fn, batches, device) -> int:
    """Peak bytes of training a fresh `model_fn()` with the plain loop: weights, gradients,
    momentum and activations — the allocator's peak on CUDA (the batches, made before, not
    counted); on the CPU the live tensors of one step."""
    if device.type != "cuda":
        return cpu_training_memory(model_fn(), *batches[0])
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = plain_loop(model_fn(), batches, device)
    for i in range(3):
        step(i)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del step
    return peak


def cpu_training_memory(model, x, y) -> int:
    """Weights + gradients + momentum + the activations autograd saves (once per storage)."""
    opt = make_sgd(model, 0.01, 0.9, 5e-4)
    model.train()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    params = list(model.parameters())
    return 3 * sum(p.numel() * p.element_size() for p in params) + sum(seen.values())


def round_bytes(blocks, state, S, wire) -> int:
    """Payload of one LoFT aggregation (all S workers) through the real code path."""
    return measured_round_bytes(state, blocks, S, wire)


def project_dense(cfg, arch, init, train_set, env):
    dense = Dense(cfg, arch, init, train_set, env, Comm(env))
    dense.model.train()
    return dense.train_step


def project_loft(cfg, arch, init, train_set, env):
    loft = Loft(cfg, arch, init, train_set, env, Comm(env))
    return loft.run_round, loft.S * loft.K, loft


def measure(cfg, arch, init, train, env, args, precision: str) -> dict:
    """(a) and (b) at one precision."""
    dev = env.device
    bf16 = cl = precision != "fp32"
    batches = [Stream(train, args.batch, 0, 99, device=dev).batch(t) for t in range(4)]
    out = {}
    dense_model = build_model(arch)
    dense_model.load_state_dict(init)
    plain = plain_loop(dense_model, batches, dev, bf16, cl)
    out["dense_plain_s"] = seconds_per_call(plain, args.repeats, dev)
    out["dense_project_s"] = seconds_per_call(project_dense(cfg, arch, init, train, env), args.repeats, dev)
    out["dense_mem"] = peak_memory(lambda: build_model(arch), batches, dev)
    blocks = partitioned_blocks(build_model(arch), cfg.pretrain.partition_stage1, arch, cfg.pretrain.overlap)
    for S in (2, 4):
        cfg_s = load_config(args.config, base_sets(args) + PRECISIONS[precision] + [f"pretrain.workers={S}"])
        sub = build_model(worker_arch(arch, draw_partition(blocks, S, 0, 0), 0))
        plain_sub = plain_loop(sub, batches, dev, bf16, cl)
        out[f"loft{S}_plain_s"] = seconds_per_call(plain_sub, args.repeats, dev)
        run_round, steps_per_round, loft = project_loft(cfg_s, arch, init, train, env)
        rounds = max(1, args.repeats // steps_per_round)
        out[f"loft{S}_round_s"] = seconds_per_call(run_round, rounds, dev, warmup=1)
        out[f"loft{S}_project_s"] = out[f"loft{S}_round_s"] / steps_per_round
        cfg_f = load_config(args.config, base_sets(args) + PRECISIONS[precision]
                            + [f"pretrain.workers={S}", "pretrain.fused_workers=true"])
        run_fused, _, fused = project_loft(cfg_f, arch, init, train, env)
        out[f"loft{S}_fused_round_s"] = seconds_per_call(run_fused, rounds, dev, warmup=1)
        out[f"loft{S}_fused_step_s"] = out[f"loft{S}_fused_round_s"] / fused.K  # one step of all S workers
        del fused
        out[f"loft{S}_mem"] = peak_memory(lambda: build_model(worker_arch(arch, draw_partition(blocks, S, 0, 0), 0)),
                                          batches, dev)
        out[f"loft{S}_flop_share"] = (flops_per_sample(build_model(worker_arch(arch, draw_partition(blocks, S, 0, 0), 0)),
                                                       backward=True) / flops_per_sample(build_model(arch), backward=True))
        del loft
    return out


def base_sets(args) -> list[str]:
    sets = [f"pretrain.batch_size={args.batch}", "dist.threads_per_rank=0"]
    if args.width:
        sets.append(f"model.width={args.width}")
    if args.data_root:
        sets.append(f"data.root={args.data_root}")
    return sets


def eval_seconds(cfg, arch, train, test, env) -> float:
    """One epoch's checkpoint work at full size: BN recalibration + evaluation of 10,000 images."""
    model = build_model(arch).to(env.device)
    t0 = time.perf_counter()
    recalibrate_bn(model, Stream(train, min(cfg.data.eval_batch_size, len(train)), 0, RECAL_STREAM),
                   cfg.pretrain.bn_recal_batches, env.device)
    correct_per_sample(model, test, cfg.data.eval_batch_size, env.device)
    sync(env.device)
    return (time.perf_counter() - t0) * 10_000 / len(test)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "yaml/bench_c10.yaml"))
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per measurement (LoFT: whole rounds)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=20, help="epochs of the pretraining projection")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = DistEnv(device=dev)
    configure_kernels(dev, deterministic=False)
    cfg = load_config(args.config, base_sets(args))
    arch = arch_of(cfg.model, cfg.data)
    train = on_device(load_dataset(cfg.data, train=True), env)
    test = on_device(load_dataset(cfg.data, train=False), env)
    torch.manual_seed(0)
    init = build_model(arch).state_dict()
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "machine": machine(),
           "arch": arch, "batch": args.batch, "precisions": {}}
    for precision, sets in PRECISIONS.items():
        cfg_p = load_config(args.config, base_sets(args) + sets)
        res["precisions"][precision] = measure(cfg_p, arch, init, train, env, args, precision)
    if dev.type == "cuda":  # (f)
        configure_kernels(dev, deterministic=True)
        step = project_dense(cfg, arch, init, train, env)
        res["dense_project_deterministic_s"] = seconds_per_call(step, args.repeats, dev)
        torch.use_deterministic_algorithms(False)
        configure_kernels(dev, deterministic=False)
    blocks = partitioned_blocks(build_model(arch), cfg.pretrain.partition_stage1, arch, cfg.pretrain.overlap)
    state = build_model(arch).state_dict()
    res["bytes"] = {S: {w: round_bytes(blocks, state, S, w) for w in ("fp32", "bf16")} for S in (2, 4)}
    res["eval_s_per_epoch"] = eval_seconds(cfg, arch, train, test, env)
    res["ops"] = count_ops(args.config, base_sets(args), env)  # (g)
    steps_full = TRAIN_SIZE["cifar10"] // args.batch
    for precision, m in res["precisions"].items():
        m["dense_epoch_s"] = steps_full * m["dense_project_s"] + res["eval_s_per_epoch"]
        rounds_full = steps_full // cfg.pretrain.local_iters
        m["loft4_epoch_s"] = rounds_full * m["loft4_round_s"] + res["eval_s_per_epoch"]
        m["loft4_fused_epoch_s"] = rounds_full * m["loft4_fused_round_s"] + res["eval_s_per_epoch"]
    text = report(res, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.md").write_text(text + "\n")
    (out / "perf.json").write_text(json.dumps(res, indent=1))
    print(text)


def report(res: dict, args) -> str:
    a = res["arch"]
    lines = [f"{a['name']} width {a['width']}, batch {res['batch']} per worker; device {res['device']}; "
             f"{res['machine']}", "",
             "| precision | step | plain loop | project | project / plain | FLOP share | peak memory / dense |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for precision, m in res["precisions"].items():
        lines.append(f"| {precision} | dense | {m['dense_plain_s'] * 1e3:.1f} ms | {m['dense_project_s'] * 1e3:.1f} ms | "
                     f"{m['dense_project_s'] / m['dense_plain_s']:.2f}x | 1 | 1 |")
        for S in (2, 4):
            lines.append(f"| {precision} | LoFT-{S} worker (round included) | {m[f'loft{S}_plain_s'] * 1e3:.1f} ms | "
                         f"{m[f'loft{S}_project_s'] * 1e3:.1f} ms | "
                         f"{m[f'loft{S}_project_s'] / m[f'loft{S}_plain_s']:.2f}x | {m[f'loft{S}_flop_share']:.3f} | "
                         f"{m[f'loft{S}_mem'] / m['dense_mem']:.3f} |")
    lines += ["", f"peak memory of a step (MB, {'torch.cuda.max_memory_allocated' if res['device'] != 'cpu' else 'live tensors'}): "
              + ", ".join(f"{k.split('_')[0]} {v / 1e6:.1f}" for k, v in res["precisions"]["fp32"].items()
                          if k.endswith("_mem")), "",
              f"epoch at 50,000 images (evaluation + BN recalibration {res['eval_s_per_epoch']:.1f} s included), "
              f"and {args.epochs} epochs:", "", "| precision | dense epoch | LoFT-4 epoch (in turn) | LoFT-4 epoch (fused) | "
              f"dense {args.epochs} epochs | LoFT-4 {args.epochs} epochs (in turn) | (fused) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for precision, m in res["precisions"].items():
        lines.append(f"| {precision} | {m['dense_epoch_s']:.1f} s | {m['loft4_epoch_s']:.1f} s | "
                     f"{m['loft4_fused_epoch_s']:.1f} s | {m['dense_epoch_s'] * args.epochs / 60:.1f} min | "
                     f"{m['loft4_epoch_s'] * args.epochs / 60:.1f} min | {m['loft4_fused_epoch_s'] * args.epochs / 60:.1f} min |")
    lines += ["", "fused workers (one grouped module) vs the same workers in turn:", "",
              "| precision | S | round in turn | fused round | fused / in turn | fused step (all S) / dense step |",
              "|---|---|---:|---:|---:|---:|"]
    for precision, m in res["precisions"].items():
        for S in (2, 4):
            lines.append(f"| {precision} | {S} | {m[f'loft{S}_round_s'] * 1e3:.1f} ms | {m[f'loft{S}_fused_round_s'] * 1e3:.1f} ms | "
                         f"{m[f'loft{S}_fused_round_s'] / m[f'loft{S}_round_s']:.2f}x | "
                         f"{m[f'loft{S}_fused_step_s'] / m['dense_project_s']:.2f}x |")
    if "dense_project_deterministic_s" in res:
        det, fast = res["dense_project_deterministic_s"], res["precisions"]["fp32"]["dense_project_s"]
        lines += ["", f"dist.deterministic: dense step {det * 1e3:.1f} ms vs {fast * 1e3:.1f} ms ({det / fast:.2f}x)"]
    lines += ["", "| S | bytes per round fp32 | bf16 | bf16 / fp32 |", "|---|---:|---:|---:|"]
    for S, b in res["bytes"].items():
        lines.append(f"| {S} | {b['fp32'] / 1e6:.2f} MB | {b['bf16'] / 1e6:.2f} MB | {b['bf16'] / b['fp32']:.3f} |")
    ops = res["ops"]
    lines += ["", f"operators dispatched (bench/ops.py; fp32, batch {ops['batch']}, S = 4, K = {ops['K']}): a step's, "
              "against the plain loop's, and a LoFT-4 round's own (partition, loading, aggregation):", "",
              "| step | project | plain loop | project / plain | round's own (per round) |", "|---|---:|---:|---:|---:|",
              f"| dense | {ops['dense_step']} | {ops['plain_dense_step']} | "
              f"{ops['dense_step'] / ops['plain_dense_step']:.2f}x | |",
              f"| LoFT-4 worker | {ops['loft4']['per_step']:.0f} | {ops['plain_loft4_worker_step']} | "
              f"{ops['loft4']['per_step'] / ops['plain_loft4_worker_step']:.2f}x | {ops['loft4']['rest']} |",
              f"| LoFT-4 fused (all 4 workers) | {ops['loft4_fused']['train'] / ops['K']:.0f} | | | "
              f"{ops['loft4_fused']['rest']} |",
              f"| RISE fine-tuning | {ops['rise_step']} | {ops['plain_dense_step']} | "
              f"{ops['rise_step'] / ops['plain_dense_step']:.2f}x | |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
