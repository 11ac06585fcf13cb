"""Stage 1 — pretrain a CNN with LoFT (or a baseline) and save the global model every epoch.

    python 01_pretrain_loft.py --config yaml/quick_c10.yaml                       # S workers in turn
    deepspeed --num_gpus 2 01_pretrain_loft.py --config yaml/quick_c10.yaml       # 2 ranks, S/2 workers each
    python 01_pretrain_loft.py --config yaml/preresnet18_c10.yaml --dry-run       # groups, sizes, FLOPs, bytes

Writes runs/NAME/pretrain/: config.yaml, epoch_000.pt … epoch_EEE.pt (BN-recalibrated global
model), last.pt (resume state), metrics.csv, comm.json. Next: 02_filter_distance.py, 03_prune.py.
"""
import json
import sys

from common.checkpoint import PretrainEpoch, ResumeState, save, write_text_atomic
from common.cli import run_stage, stage_command
from common.config import load_config, run_dir_of, stage_parser
from common.runs import (check_stage_dir, clear_stage_dir, finished, finished_before, lock_stage_dir, resume_point,
                         save_config, unlocks_at_end, write_csv)
from common.tb import Scalars, epoch_lr

# torch, DeepSpeed and the modules built on them take seconds to load: each function imports them
# where it needs them, so a config error is one line before any of that


@unlocks_at_end
def main(argv=None):
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="print the channel groups (stderr) and sizes, FLOPs, analytic bytes as JSON; no training")
    p.add_argument("--table", action="store_true", help="with --dry-run: Markdown table of analytic bytes, S = 2 and 4")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument("--force", action="store_true", help="start over in a folder that holds a run")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    # the config is valid: only now load torch, DeepSpeed and the training modules
    import torch
    from common.dist import Comm, agreed, on_main, setup_from_config, teardown
    from common.emergence import EmergenceWatch
    from common.evaluation import load_splits
    from common.models import arch_of, build_model
    from common.selection import prunable_blocks
    from common.pretrain import METHODS
    arch = arch_of(cfg.model, cfg.data)
    if args.dry_run:
        print(group_table(cfg, arch), file=sys.stderr)   # stdout stays the JSON (or Markdown) report
        print(comm_table(cfg, arch) if args.table else json.dumps(dry_run_report(cfg, arch), indent=1))
        return
    out = run_dir_of(args, cfg) / "pretrain"
    env = setup_from_config(cfg.dist)
    lock_stage_dir(out, env)  # one writer: a second run into this folder is refused, naming this one
    resuming = on_main(env, f"checking {out}", check_stage_dir, out, args.resume, args.force)  # rank 0's folder
    train_set, test_set, lossless = load_splits(cfg, env)
    torch.manual_seed(cfg.seed)
    init = build_model(arch, cfg.importable).state_dict()
    comm = Comm(env, cfg.comm.wire_dtype)
    method = METHODS[cfg.pretrain.method](cfg, arch, init, train_set, env, comm)
    start, rows, comm_total, watch = 1, [], 0, None
    if cfg.pretrain.stop_on_emergence:
        watch = EmergenceWatch(prunable_blocks(build_model(arch, cfg.importable), arch), cfg.prune.ratio,
                               cfg.distance.emergence_eps, cfg.distance.emergence_window, kind=cfg.prune.kind)
        watch.start(init)
    if resuming:
        start, rows, comm_total, done = resume(method, out, cfg, comm, watch)
        if done and on_main(env, f"checking {out}", finished_before, out, "comm.json"):
            teardown(env)  # a finished run: every file of it stays as it is
            return
    else:
        with agreed(env, f"writing {out}"):
            if env.is_main:
                clear_stage_dir(out)  # --force: only now that config, data and method have been checked
                save_config(cfg.to_dict(), out / "config.yaml")
                save_epoch(init, arch, 0, cfg, train_set, (test_set, lossless), env, out, train_flops=0)
    epochs_run = start - 1
    tb = Scalars(out, env.is_main, first_step=start)
    for epoch in range(start, cfg.pretrain.epochs + 1):
        loss = method.train_epoch(epoch)
        state = {k: v.detach().cpu() for k, v in method.global_state().items()}  # a collective for gpipe
        comm_total = int(comm.sum_metric(torch.tensor([comm.bytes_sent], dtype=torch.float64)).item())
        train_flops = method.steps_done * method.train_flops_per_step
        emerged = watch.update(state) if watch else None  # same weights on every rank: same decision
        epochs_run = epoch
        with agreed(env, f"saving epoch {epoch}"):  # the barrier after rank 0's writes, carrying its status
            if env.is_main:
                accs = save_epoch(state, arch, epoch, cfg, train_set, (test_set, lossless), env, out, train_flops)
                acc = accs["test_acc"]
                rows.append({"epoch": epoch, "rounds": getattr(method, "round", ""), "train_loss": round(loss, 5),
                             **{k: round(v, 3) for k, v in accs.items()}, "comm_bytes": comm_total,
                             "train_flops": train_flops,
                             **({"emerged_at": "" if emerged is None else emerged} if watch else {})})
                write_csv(rows, out / "metrics.csv")
                tb.add({**rows[-1], "lr": epoch_lr(method, cfg.pretrain)}, epoch)
                save(ResumeState(model=state, arch=arch, epoch=epoch, trainer=method.state_dict(), rows=rows,
                                 config=cfg.to_dict(), comm_bytes=comm_total,
                                 consecutive=watch.consecutive if watch else []), out / "last.pt")
                print(f"epoch {epoch}: loss {loss:.4f}  test acc {acc:.2f}%  comm {comm_total / 1e6:.2f} MB")
        if emerged is not None:
            if env.is_main:
                print(f"ticket emerged at epoch {emerged} (filter-distance rule); stopping after epoch {epoch}")
            break
    tb.close()
    with agreed(env, f"writing {out / 'comm.json'}"):
        if env.is_main:
            write_comm_json(cfg, arch, len(train_set), comm_total, out, epochs_run)
            finished(out, stage_command("02_filter_distance.py", args, cfg), stage_command("03_prune.py", args, cfg))
    teardown(env)  # after an error none: a barrier would wait for a peer that may be gone


def save_epoch(state, arch, epoch, cfg, train_set, test, env, out, train_flops: int) -> dict:
    """BN-recalibrate a copy of the global model, test it, save it; returns its accuracies.
    LoFT needs this (statistics from narrow subnetworks don't describe the full net); the other
    methods get it too, so every method's checkpoints are made alike (and data-parallel ranks
    agree on them). `test` = (test set, positions of its lossless images or None)."""
    from common.evaluation import accuracies
    from common.models import build_model
    from common.pretrain import recal_stream
    from common.train import recalibrate_bn
    model = build_model(arch, cfg.importable).to(env.device)
    model.load_state_dict(state)
    if epoch > 0:
        recalibrate_bn(model, recal_stream(train_set, cfg), cfg.pretrain.bn_recal_batches, env.device)
    accs = accuracies(model, test[0], cfg.data.eval_batch_size, env.device, test[1])
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save(PretrainEpoch(model=weights, arch=arch, epoch=epoch, method=cfg.pretrain.method, train_flops=train_flops,
                       **accs), out / f"epoch_{epoch:03d}.pt")
    return accs


def resume(method, out, cfg, comm, watch):
    """(epoch to continue with, metrics rows, bytes sent so far, whether no epoch is left: the
    last one ran or the ticket emerged)."""
    ck, start, rows = resume_point(out, method, cfg, "pretrain")
    if watch:
        watch.consecutive = list(ck.consecutive)
        watch.start(ck.model)
    comm.bytes_sent = ck.comm_bytes if comm.env.is_main else 0  # the total lives on rank 0
    # with a watch every row has emerged_at ("" until the ticket emerged); a resume keeps the config
    done = start > cfg.pretrain.epochs or (watch is not None and rows and rows[-1]["emerged_at"] != "")
    if comm.env.is_main and not done:
        print(f"resuming after epoch {ck.epoch}")
    return start, rows, comm.bytes_sent, done


def group_table(cfg, arch) -> str:
    """Every channel group traced in the model (name, width, producers, consumers), whether the
    config's choice (model.group_*, pretrain.overlap) partitions or prunes it and why not, and the
    places that are no group."""
    from common.data import input_shape
    from common.errors import UserError
    from common.groups import discovered
    from common.models import build_model
    from common.selection import format_groups, group_selection
    model = build_model(arch, cfg.importable)
    try:
        found = discovered(model, tuple(arch.get("input_shape") or input_shape(cfg.data)))
    except UserError as e:   # e.g. Torch-Pruning fails on the graph: the message says what still runs
        return f"no channel groups: {e}"
    try:
        _, chosen = group_selection(model, arch, cfg.pretrain.partition_stage1, cfg.pretrain.overlap)
    except UserError as e:   # nothing chosen: the table still lists what was found
        return f"{format_groups(found)}\nnone chosen: {e}"
    return format_groups(found, chosen)


def loft_blocks(model, cfg, arch) -> list:
    """The groups LoFT would split; none for a model that is not partitionable (e.g. MobileNetV3)."""
    from common.selection import is_partitionable, partitioned_blocks
    return (partitioned_blocks(model, cfg.pretrain.partition_stage1, arch, cfg.pretrain.overlap)
            if is_partitionable(model, arch) else [])


DATA_NOTE = {"full": "full: every worker walks the whole training set each epoch",
             "shard": "shard: equal samples (each worker walks 1/S of each pass), not equal training FLOPs"}


def dry_run_report(cfg, arch) -> dict:
    from common.costs import analytic_bytes, flops_per_sample, split_params, train_flops_ratio_to_dense
    from common.data import TRAIN_SIZE, input_shape
    from common.loft import draw_partition, worker_arch
    from common.models import build_model
    pc, shape = cfg.pretrain, input_shape(cfg.data)
    model = build_model(arch, cfg.importable)
    blocks = loft_blocks(model, cfg, arch)
    shared, part = split_params(model, blocks)
    n_train = cfg.data.train_subset or TRAIN_SIZE[cfg.data.dataset]
    sub = build_model(worker_arch(arch, draw_partition(blocks, pc.workers, cfg.seed, 0), 0), cfg.importable)
    return {
        "arch": arch, "workers": pc.workers,
        "params_total": shared + part, "params_partitioned": part,
        "partitioned_fraction": round(part / (shared + part), 5),
        "params_per_worker": sum(p.numel() for p in sub.parameters()),
        "flops_per_sample_dense": flops_per_sample(model, shape), "flops_per_sample_subnet": flops_per_sample(sub, shape),
        "analytic_bytes": analytic_bytes(model, blocks, pc.workers, pc.epochs, n_train, pc.batch_size,
                                         pc.local_iters, shape, shard=pc.data == "shard"),
        "pretrain_data": DATA_NOTE[pc.data],
        "train_flops_ratio_to_dense": {  # at this pretrain.data: shard equalises samples, not FLOPs
            m: None if m == "loft" and not blocks else round(train_flops_ratio_to_dense(
                arch, blocks, m, pc.workers, pc.epochs, n_train, pc.batch_size, pc.local_iters, shape,
                shard=pc.data == "shard", importable=cfg.importable), 4) for m in ("loft", "localsgd")},
    }


def comm_table(cfg, arch) -> str:
    """The paper's Table 1 cost columns for this config: G = 1e9 bytes, ratio to LoFT-S."""
    from common.costs import analytic_bytes
    from common.data import TRAIN_SIZE, input_shape
    from common.models import build_model
    pc, model, shape = cfg.pretrain, build_model(arch, cfg.importable), input_shape(cfg.data)
    blocks = loft_blocks(model, cfg, arch)
    n_train = cfg.data.train_subset or TRAIN_SIZE[cfg.data.dataset]
    lines = [f"{arch['name']} (width {arch['width']}), {pc.epochs} epochs, {n_train} images, batch {pc.batch_size}, "
             f"K={pc.local_iters}, fp32", "", "| method | comm. cost | ratio to LoFT |", "|---|---:|---:|"]
    for S in (2, 4):
        b = analytic_bytes(model, blocks, S, pc.epochs, n_train, pc.batch_size, pc.local_iters, shape)
        for name, key in (("GPipe", "gpipe_fwd"), ("GPipe fwd+bwd", "gpipe_fwd_bwd"), ("Local SGD", "localsgd"),
                          ("LoFT", "loft")):
            if b[key] is not None:
                ratio = f"{b[key] / b['loft']:.2f}x" if b["loft"] else "—"
                lines.append(f"| {name}-{S} | {b[key] / 1e9:.2f}G | {ratio} |")
    return "\n".join(lines)


def write_comm_json(cfg, arch, n_train, measured_total, out, epochs_run: int):
    """Measured and analytic bytes of the epochs that ran (fewer than configured after
    stop_on_emergence)."""
    from common.costs import analytic_bytes, train_flops_ratio_to_dense
    from common.data import input_shape
    from common.models import build_model
    pc = cfg.pretrain
    model = build_model(arch, cfg.importable)
    analytic = analytic_bytes(model, loft_blocks(model, cfg, arch), pc.workers, epochs_run, n_train, pc.batch_size,
                              pc.local_iters, input_shape(cfg.data), shard=pc.data == "shard")
    blocks = loft_blocks(model, cfg, arch) if pc.method == "loft" else []
    ratio = train_flops_ratio_to_dense(arch, blocks, pc.method, pc.workers, epochs_run, n_train, pc.batch_size,
                                       pc.local_iters, input_shape(cfg.data), shard=pc.data == "shard",
                                       importable=cfg.importable)
    report = {
        "method": pc.method, "workers": pc.workers, "wire_dtype": cfg.comm.wire_dtype,
        "pretrain_data": DATA_NOTE[pc.data], "train_flops_ratio_to_dense": round(ratio, 4),
        "epochs_run": epochs_run, "epochs_configured": pc.epochs,
        "measured_payload_bytes": measured_total,
        "measured_note": "bytes handed to collectives, summed over ranks (one process: over workers); "
                         "a push of each worker's subnetwork per round, so the paper's pull+push count is 2x",
        "analytic_ps_bytes": analytic,
        "analytic_note": "the paper's parameter-server convention, fp32, parameters only (docs/method.md)",
    }
    write_text_atomic(json.dumps(report, indent=1), out / "comm.json")


if __name__ == "__main__":
    run_stage(main)
