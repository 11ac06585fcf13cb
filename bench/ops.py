"""Operators dispatched per LoFT-4 round and per RISE fine-tuning step, on yaml/bench_c10.yaml's
model: what a step and a round cost in launches. Every aten operator is one dispatch; on a GPU each
one that is not a view is (at least) one kernel launch. Counting is deterministic, so the load of
the machine does not change it (timings: bench/perf.py).

    python bench/ops.py --data-root $LOFT_DATA                   # this checkout: prints the counts
    python bench/ops.py --data-root $LOFT_DATA --base /tmp/base  # also a base checkout's (its own code,
                                                                 # this counter): bench/results/ops.md

Counted, in steady state (after one warm-up round or step, so one-time set-up is not counted):
- a LoFT-4 round (`Loft.run_round`: partition, loading the workers' slices, S·K training steps,
  aggregation), the workers in turn and fused; its training steps (`workers.train`) apart, so the
  rest is the round's own cost;
- one dense step (`Dense.train_step`) and one RISE fine-tuning step (`Dense.train_step` of the
  finetune section with `LockedUpdate`, the masks of a 90 % global magnitude ticket);
- the textbook loop's step (forward, cross-entropy, zero_grad, backward, `torch.optim.SGD` with
  its defaults) on the dense model and on a LoFT-4 worker's subnetwork: the floor to compare with.
`count_ops` is also called by bench/perf.py for its report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched inside the `with` block, by name; views apart (a
    dispatch, but no kernel). Operators a foreach or composite kernel runs internally are not
    seen: one `_foreach_add_` is one count, as it is one launch on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def counted(fn, *args) -> OpCounter:
    with OpCounter() as c:
        fn(*args)
    return c


def plain_loop(model, batches, device, bf16: bool = False, channels_last: bool = False):
    """The reference of bench/perf.py and of these counts: the textbook PyTorch step on pre-made
    device batches (torch.optim.SGD with its defaults, not the project's make_sgd: the reference
    does not move with the project); bf16 autocast applies on CUDA only."""
    import torch.nn.functional as F
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = [(x.contiguous(memory_format=fmt), y) for x, y in batches]

    def step(i):
        x, y = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def loft_round(cfg, arch, init, train, env) -> dict:
    """One steady-state round (round 1, after round 0): all, its training steps, the rest."""
    from common.dist import Comm
    from common.pretrain import Loft
    loft = Loft(cfg, arch, init, train, env, Comm(env))
    loft.run_round(0)
    inside = {}
    train_steps = loft.workers.train

    def counted_train(steps):
        with OpCounter() as c:
            out = train_steps(steps)
        inside["train"] = c
        return out

    loft.workers.train = counted_train
    whole = counted(loft.run_round, 1)
    steps = loft.S * loft.K
    return {"round": whole.total, "round_views": whole.views, "train": inside["train"].total,
            "per_step": inside["train"].total / steps, "rest": whole.total - inside["train"].total,
            "rest_views": whole.views - inside["train"].views, "steps": steps, "top": whole.ops.most_common(12)}


def dense_step(cfg, arch, init, train, env, tcfg=None, grad_hook=None) -> OpCounter:
    from common.dist import Comm
    from common.pretrain import Dense
    dense = Dense(cfg, arch, init, train, env, Comm(env), tcfg=tcfg, grad_hook=grad_hook)
    dense.model.train()
    dense.train_step(0)
    return counted(dense.train_step, 1)


def count_ops(config: str, sets: list[str], env=None) -> dict:
    """The counts of the module docstring for `config` (with `--set` overrides), on `env`'s device
    (default: the CPU)."""
    from common.config import load_config
    from common.data import Stream, input_shape, load_dataset, on_device
    from common.dist import DistEnv
    from common.finetune import LockedUpdate
    from common.loft import draw_partition, worker_arch
    from common.models import arch_of, build_model
    from common.selection import partitioned_blocks
    from common.prune import magnitude_mask, maskable_weights
    cfg = load_config(config, sets + ["pretrain.workers=4"])
    env = env or DistEnv()
    arch = arch_of(cfg.model, cfg.data)
    train = on_device(load_dataset(cfg.data, train=True), env)
    torch.manual_seed(0)
    model = build_model(arch)
    init = model.state_dict()
    res = {"config": str(config), "arch": f"{arch['name']} width {arch['width']}",
           "batch": cfg.pretrain.batch_size, "S": cfg.pretrain.workers, "K": cfg.pretrain.local_iters}
    res["loft4"] = loft_round(cfg, arch, init, train, env)
    res["loft4_fused"] = loft_round(load_config(config, sets + ["pretrain.workers=4", "pretrain.fused_workers=true"]),
                                    arch, init, train, env)
    res["dense_step"] = dense_step(cfg, arch, init, train, env).total
    names = maskable_weights(model)
    mask = magnitude_mask({k: init[k] for k in names}, 0.9, "global")
    rise = {k: v.clone() for k, v in init.items()}
    res["rise_step"] = dense_step(cfg, arch, rise, train, env, tcfg=cfg.finetune,
                                  grad_hook=LockedUpdate(mask, cfg.finetune.weight_decay)).total
    batch = Stream(train, cfg.pretrain.batch_size, 0, 99, device=env.device).batch(0)
    blocks = partitioned_blocks(model, cfg.pretrain.partition_stage1, arch, cfg.pretrain.overlap)
    sub = build_model(worker_arch(arch, draw_partition(blocks, 4, 0, 0), 0))
    for name, m in (("plain_dense_step", build_model(arch)), ("plain_loft4_worker_step", sub)):
        step = plain_loop(m, [batch], env.device)
        step(0)
        res[name] = counted(step, 1).total
    return res


def git_commit(repo: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


ROWS = [("LoFT-4 round, workers in turn: all operators", lambda r: r["loft4"]["round"]),
        ("  of which views", lambda r: r["loft4"]["round_views"]),
        ("  training steps (S·K = 40)", lambda r: r["loft4"]["train"]),
        ("  per training step", lambda r: r["loft4"]["per_step"]),
        ("  the round's own (partition, load, aggregate)", lambda r: r["loft4"]["rest"]),
        ("    of which views", lambda r: r["loft4"]["rest_views"]),
        ("LoFT-4 round, fused workers: all operators", lambda r: r["loft4_fused"]["round"]),
        ("  per fused step (all 4 workers)", lambda r: r["loft4_fused"]["train"] / r["K"]),
        ("  the round's own", lambda r: r["loft4_fused"]["rest"]),
        ("dense step", lambda r: r["dense_step"]),
        ("RISE fine-tuning step", lambda r: r["rise_step"]),
        ("plain loop step, dense model", lambda r: r["plain_dense_step"]),
        ("plain loop step, a LoFT-4 worker's subnetwork", lambda r: r["plain_loft4_worker_step"])]


def table(results: dict[str, dict]) -> str:
    heads = list(results)
    lines = ["| operators dispatched | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for label, get in ROWS:
        cells = [get(r) for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" if isinstance(c, float) and c % 1 else f"{int(c)}"
                                                   for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "yaml/bench_c10.yaml"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--repo", default=str(REPO), help="the checkout whose code is counted (default: this one)")
    p.add_argument("--base", default=None, help="also count this checkout's code (before), into OUT/ops.md")
    p.add_argument("--json", action="store_true", help="print the counts as JSON only")
    p.add_argument("--out", default=str(REPO / "bench/results"))
    args = p.parse_args(argv)
    sets = [f"data.root={args.data_root}"] if args.data_root else []
    if args.json:
        torch.set_num_threads(1)  # the counts do not depend on it; one thread disturbs other work less
        print(json.dumps(count_ops(args.config, sets)))
        return
    results, commands = {}, []
    for name, repo in ([("before", Path(args.base))] if args.base else []) + [("after", Path(args.repo))]:
        cmd = [sys.executable, str(HERE), "--json", "--repo", str(repo), "--config", args.config] + \
              (["--data-root", args.data_root] if args.data_root else [])
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo)})
        if done.returncode:
            sys.exit(f"counting {repo} failed:\n{done.stderr.strip().splitlines()[-1]}")
        results[f"{name}: {git_commit(repo)}"] = json.loads(done.stdout.splitlines()[-1])
        commands.append(f"cd {repo} && PYTHONPATH={repo} " + " ".join(cmd))
    first = next(iter(results.values()))
    text = "\n".join([f"# Operators dispatched per step and per round ({first['arch']}, batch {first['batch']}, "
                      f"S = {first['S']}, K = {first['K']}; CPU)", "",
                      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
                      "counted by bench/ops.py (a TorchDispatchMode; deterministic, independent of load)", "",
                      table(results), "", "Made by", "",
                      "    python bench/ops.py " + " ".join(sys.argv[1:] if argv is None else argv), "",
                      "which ran, per checkout (its own `common`, this counter):", "",
                      *[f"    {c}" for c in commands], ""])
    if args.base:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ops.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if "--repo" in sys.argv:  # count that checkout's `common`, not this one's
        sys.path.insert(0, sys.argv[sys.argv.index("--repo") + 1])
    else:
        sys.path.insert(0, str(REPO))
    main()
