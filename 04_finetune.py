"""Stage 4 — train a ticket: finetune, rewind, scratch or RISE (docs/method.md).

    python 04_finetune.py --config yaml/quick_c10.yaml                                  # ticket of prune.* settings
    python 04_finetune.py --config yaml/quick_c10.yaml --set finetune.mode=rewind --set finetune.rewind_epoch=1
    python 04_finetune.py --config yaml/quick_c10.yaml --ticket runs/quick_c10/prune_mag_r20/ticket.pt \\
        --set finetune.mode=rise --set finetune.rewind_epoch=1
    deepspeed --num_gpus 2 04_finetune.py --config yaml/r18_c10.yaml                   # data parallel

Reads runs/NAME/prune_TAG/ticket.pt (TAG from prune.kind/prune.ratio unless --ticket), writes
runs/NAME/finetune_TAG_MODE[_kK]/ (_kK: the rewind epoch of rewind/rise; --tag names it instead):
config.yaml, metrics.csv, last.pt, final.pt (a ticket that 03 can prune again: iterative pruning),
result.json (accuracy, size, training FLOPs of the lineage, hashes of the files it came from).
Formulas and the file contract: docs/method.md, docs/files.md.
"""
import json
from pathlib import Path

from common.checkpoint import FinetunedTicket, PretrainEpoch, ResumeState, field_values, save, write_text_atomic
from common.cli import python_command, run_stage, stage_command
from common.config import load_config, run_dir_of, stage_parser
from common.errors import UserError
from common.runs import (check_stage_dir, clear_stage_dir, finished, finished_before, lock_stage_dir, resume_point,
                         save_config, unlocks_at_end, write_csv)
from common.tb import Scalars, epoch_lr

# torch, DeepSpeed and the modules built on them take seconds to load: each function imports them
# where it needs them, so a config error is one line before any of that


@unlocks_at_end
def main(argv=None):
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--ticket", default=None, help="ticket.pt or a fine-tuned final.pt (default: from prune.*)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument("--force", action="store_true", help="start over in a folder that holds a run")
    p.add_argument("--tag", default=None, help="output folder finetune_TAG (default: finetune_<ticket>_<mode>[_k<K>])")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    # the config is valid: only now load torch, DeepSpeed and the training modules
    import torch
    from common.data import input_shape
    from common.dist import Comm, agreed, on_main, setup_from_config, teardown
    from common.evaluation import accuracies, load_splits
    from common.finetune import (FINETUNE_STREAM, LockedUpdate, check_lineage, load_ticket, ticket_schedule,
                                 ticket_weights, training_complexity)
    from common.pretrain import Dense
    from common.prune import check_tag, default_tag
    fc, run = cfg.finetune, run_dir_of(args, cfg)
    ticket_path = Path(args.ticket) if args.ticket else \
        run / f"prune_{default_tag(cfg.prune.kind, cfg.prune.ratio)}" / "ticket.pt"
    make_ticket = stage_command("03_prune.py", args, cfg)
    ticket = load_ticket(ticket_path, make_ticket)
    remake = remake_command(ticket, ticket_path, args, cfg)
    lineage = check_lineage(ticket, ticket_path, fc.mode, fc.rewind_epoch, remake)
    out = run / f"finetune_{check_tag(args.tag) if args.tag else default_folder(ticket_path, fc)}"
    weights = ticket_weights(ticket, fc.mode, fc.rewind_epoch, cfg.seed, cfg.importable)
    complexity = training_complexity(ticket, fc, input_shape(cfg.data), cfg.importable)
    env = setup_from_config(cfg.dist)
    lock_stage_dir(out, env)  # one writer: a second run into this folder is refused, naming this one
    resuming = on_main(env, f"checking {out}", check_stage_dir, out, args.resume, args.force)  # rank 0's folder
    train_set, test_set, lossless = load_splits(cfg, env)
    epochs, schedule, schedule_note = ticket_schedule(ticket, fc, len(train_set))
    hook = LockedUpdate(ticket.mask, fc.weight_decay) if ticket.mask else None
    comm = Comm(env)
    trainer = Dense(cfg, ticket.arch, weights, train_set, env, comm, tcfg=fc,
                    stream_id=FINETUNE_STREAM, grad_hook=hook, schedule=schedule)
    start, rows = 1, []
    if resuming:
        ck, start, rows = resume_point(out, trainer, cfg, "finetune")
        if ck.lineage is not None and hashes(ck.lineage) != hashes(lineage):  # None: a last.pt older than lineage
            raise UserError(f"--resume: {ticket_path} or its rewind checkpoint changed since {out} was "
                            "started (content hash differs); use --force to start over")
        if start > epochs and on_main(env, f"checking {out}", finished_before, out, "result.json"):
            teardown(env)  # a finished run: every file of it stays as it is
            return
    else:
        with agreed(env, f"writing {out}"):
            if env.is_main:
                clear_stage_dir(out)  # --force: only now that ticket, lineage, data and trainer have been checked
                save_config(cfg.to_dict(), out / "config.yaml")
                print(f"ticket {ticket_path}: {ticket.prune_kind}, {ticket.params_after} params; "
                      f"mode {fc.mode}; lr: {schedule_note}")
    tb = Scalars(out, env.is_main, first_step=start)
    for epoch in range(start, epochs + 1):
        loss = trainer.train_epoch(epoch)
        comm_total = int(comm.sum_metric(torch.tensor([comm.bytes_sent], dtype=torch.float64)).item())
        with agreed(env, f"saving epoch {epoch}"):  # the barrier after rank 0's writes, carrying its status
            if env.is_main:
                accs = accuracies(trainer.model, test_set, cfg.data.eval_batch_size, env.device, lossless)
                acc = accs["test_acc"]
                rows.append({"epoch": epoch, "train_loss": round(loss, 5), **{k: round(v, 3) for k, v in accs.items()}})
                write_csv(rows, out / "metrics.csv")
                tb.add({**rows[-1], "lr": epoch_lr(trainer, fc), "comm_bytes": comm_total,
                        "train_flops": complexity.after(trainer.steps_done)}, epoch)
                save(ResumeState(model={k: v.cpu() for k, v in trainer.global_state().items()}, arch=ticket.arch,
                                 epoch=epoch, trainer=trainer.state_dict(), rows=rows, config=cfg.to_dict(),
                                 lineage=lineage), out / "last.pt")
                print(f"epoch {epoch}: loss {loss:.4f}  test acc {acc:.2f}%")
    tb.close()
    with agreed(env, f"writing {out / 'final.pt'}"):
        if env.is_main:
            save_result(ticket, ticket_path, trainer, rows, cfg, out, lineage, complexity)
            finished(out, f"{python_command()} bench/report.py {run.parent}")
    teardown(env)  # after an error none: a barrier would wait for a peer that may be gone


def remake_command(ticket, ticket_path: Path, args, cfg) -> str:
    """The 03 command that makes this ticket again from the files as they are now: from the last
    pretraining epoch, or (iterative pruning) from the ticket it was pruned from."""
    from_pretraining = ticket.source_kind == PretrainEpoch.KIND  # None: made before it was recorded
    again_from = [] if from_pretraining else ["--from", ticket.source]
    return stage_command("03_prune.py", args, cfg, *again_from, "--tag", ticket_path.parent.name.removeprefix("prune_"),
                         "--force")


def hashes(lineage: dict) -> dict:
    """The content part of a lineage record: the same file under another path name is the same file."""
    return {k: v and v["sha256"] for k, v in lineage.items()}


def default_folder(ticket_path: Path, fc) -> str:
    """TAG_MODE, and the rewind epoch for the modes that rewind: runs differing in k get their own folders."""
    name = f"{ticket_path.parent.name.removeprefix('prune_')}_{fc.mode}"
    return f"{name}_k{fc.rewind_epoch}" if fc.mode in ("rewind", "rise") else name


def save_result(ticket, ticket_path, trainer, rows, cfg, out, lineage, complexity):
    """final.pt (the trained ticket, with its lineage) and result.json.

    Training complexity (docs/stages.md, "Training complexity"): train_flops = base + ticket, base = the
    training already in the starting weights (P(k) for rewind/rise, the ticket's own complexity
    for finetune, 0 for scratch), ticket = steps x batch x the masked per-sample cost. Whatever
    else the lineage spent (pretraining past k, earlier rounds) only found the mask in hindsight:
    `mask_search_flops`, beside it."""
    from common.finetune import param_counts
    fc = cfg.finetune
    ticket_flops = complexity.this_stage(trainer.steps_done)
    train_flops = complexity.after(trainer.steps_done)
    spent_before = ticket.lineage_flops
    last = rows[-1]
    trained = {k: v.cpu() for k, v in trainer.global_state().items()}
    # the ticket's fields (a fine-tuned ticket's too: 04 may train one again), the training's over them
    final = FinetunedTicket(**{**field_values(ticket), "model": trained, "epoch": last["epoch"],
                               "train_flops": train_flops, "lineage_flops": spent_before + ticket_flops,
                               "test_acc": last["test_acc"], "test_acc_lossless": last.get("test_acc_lossless"),
                               "finetune_mode": fc.mode, "ticket": str(ticket_path), "config": cfg.to_dict(),
                               "finetune_lineage": lineage})
    save(final, out / "final.pt")
    result = {
        "mode": fc.mode, "ticket": str(ticket_path), "kind": ticket.prune_kind, "ratio": ticket.ratio,
        "best_test_acc": max(r["test_acc"] for r in rows), "final_test_acc": last["test_acc"],
        **({"best_test_acc_lossless": max(r["test_acc_lossless"] for r in rows),
            "final_test_acc_lossless": last["test_acc_lossless"]} if "test_acc_lossless" in last else {}),
        **param_counts(trainer.model, ticket.mask), "flops_per_sample": ticket.flops_after,
        "flops_per_sample_sparse": ticket.flops_after_sparse,
        "train_flops": train_flops,
        "train_flops_parts": {"before_this_stage": complexity.base, "pruning": 0, "finetune": ticket_flops},
        "train_flops_per_sample": complexity.per_sample,
        "mask_search_flops": spent_before - complexity.base,
        "lineage_flops": spent_before + ticket_flops,
        "finetune_epochs": last["epoch"], "rewind_epoch": fc.rewind_epoch,
        "lineage": lineage,
    }
    write_text_atomic(json.dumps(result, indent=1), out / "result.json")
    print(summary(result, out / "result.json"))


def summary(result: dict, path: Path) -> str:
    """A few lines a researcher reads at the end of 04: accuracy, size, training cost, and where the rest is."""
    lossless = (f"; lossless images: best {result['best_test_acc_lossless']:.2f} %, final "
                f"{result['final_test_acc_lossless']:.2f} %" if "best_test_acc_lossless" in result else "")
    sparse = result["flops_per_sample_sparse"]
    parts = result["train_flops_parts"]
    return "\n".join([
        f"test accuracy: best {result['best_test_acc']:.2f} %, final {result['final_test_acc']:.2f} % after "
        f"{result['finetune_epochs']} epochs ({result['mode']}){lossless}",
        f"parameters: {result['params_trainable']:,} trainable, {result['params_nonzero']:,} nonzero of "
        f"{result['params_total']:,}; {sparse or result['flops_per_sample']:,} FLOPs per sample"
        f"{' (sparse count)' if sparse else ''}",
        f"training FLOPs: {result['train_flops']:.3g} ({parts['before_this_stage']:.3g} in the starting weights + "
        f"{parts['finetune']:.3g} here); mask search {result['mask_search_flops']:.3g}",
        f"all of it: {path}"])


if __name__ == "__main__":
    run_stage(main)
