"""Stage 3 — prune a pretrained model (or a fine-tuned ticket) into a ticket.

    python 03_prune.py --config yaml/quick_c10.yaml                               # L1 filters, p = prune.ratio
    python 03_prune.py --config yaml/preresnet18_c10.yaml --set prune.ratio=0.8   # LoFT's 80 % setting
    python 03_prune.py --config yaml/quick_c10.yaml --set prune.kind=magnitude --set prune.ratio=0.2
    python 03_prune.py --config yaml/quick_c10.yaml --set prune.kind=magnitude --set prune.ratio=0.2 \\
        --from runs/quick_c10/finetune_mag_r80_rewind_k1/final.pt --tag mag_r64_it2  # I-LOT-R, round 2

Reads runs/NAME/pretrain/epoch_EEE.pt (the last epoch present) unless --from names another
checkpoint or a fine-tuned ticket (iterative pruning). Writes runs/NAME/prune_TAG/ticket.pt and
config.yaml, TAG = l1_pNN (structured, NN % of filters removed) or mag_rNN (NN % of weights
remain). The ticket records the content hash of its source and of every pretraining epoch, so 04
refuses to rewind it onto a pretraining run that has since been redone. Next: 04_finetune.py.
"""
from pathlib import Path

from common.checkpoint import FinetunedTicket, PretrainEpoch, Ticket, load, save
from common.cli import run_stage, stage_command
from common.config import load_config, run_dir_of, stage_parser
from common.errors import UserError
from common.lineage import epoch_files, pretrain_hashes, record
from common.runs import check_writable, finished, lock_stage_dir, save_config, unlocks_at_end
from common.tb import Scalars

# torch, DeepSpeed and the modules built on them take seconds to load: each function imports them
# where it needs them, so a config error is one line before any of that


@unlocks_at_end
def main(argv=None):
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", default=None,
                   help="checkpoint, fine-tuned ticket, or a plain state_dict of the config's model trained "
                        "elsewhere (torch.save(model.state_dict())) to prune (default: the last pretraining epoch)")
    p.add_argument("--tag", default=None, help="output folder prune_TAG (default: l1_pNN or mag_rNN)")
    p.add_argument("--force", action="store_true", help="overwrite an existing ticket")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    # the config is valid: only now load torch, DeepSpeed and the training modules
    from common.importance import is_structured
    from common.models import build_model, check_weights
    from common.prune import check_tag, default_tag, format_table, format_totals, prune_filters, prune_magnitude
    pc, run = cfg.prune, run_dir_of(args, cfg)
    out = run / f"prune_{check_tag(args.tag) if args.tag else default_tag(pc.kind, pc.ratio)}"
    lock_stage_dir(out)  # one writer: a second run into this folder is refused, naming this one
    if (out / "ticket.pt").exists() and not args.force:
        raise UserError(f"{out / 'ticket.pt'} already exists; pass --force to overwrite it or --tag to write beside it")
    check_writable(out)

    made_by = None if args.source else stage_command("01_pretrain_loft.py", args, cfg)
    src_path = Path(args.source) if args.source else last_epoch(run / "pretrain", made_by)
    src = load_source(src_path, cfg, made_by)
    model = build_model(src.arch, cfg.importable)
    check_weights(model, src.model, src_path)
    model.load_state_dict(src.model)
    old_mask, old_kept = (None, None) if isinstance(src, PretrainEpoch) else (src.mask, src.kept)
    print(f"source {src_path}: {arch_text(src.arch)}, epoch {src.epoch}"
          f"{', narrowed' if 'mids' in src.arch else ''}{', masked' if old_mask else ''}")

    if is_structured(pc.kind):
        if old_mask:
            raise UserError(f"{src_path} is a magnitude-masked ticket; structured (prune.kind=l1) pruning "
                            "of a masked ticket is not supported (use prune.kind=magnitude)")
        pruned = prune_filters(model, src.arch, pc.ratio, old_kept, pc.kind)
    else:
        pruned = prune_magnitude(model, src.arch, pc.ratio, pc.scope, old_mask, pc.kind)

    ticket = make_ticket(src, src_path, model, pruned, cfg)
    print(format_table(pruned, pc.kind))
    before = {"params": ticket.params_before, "flops": ticket.flops_before}
    after = {"params": ticket.params_after, "flops": ticket.flops_after}
    if not is_structured(pc.kind):
        before["flops_sparse"], after["flops_sparse"] = ticket.flops_before_sparse, ticket.flops_after_sparse
    print(format_totals(before, after))
    save_config(cfg.to_dict(), out / "config.yaml")
    save(ticket, out / "ticket.pt")
    tb = Scalars(out, True)
    tb.add({k: getattr(ticket, k) for k in ("params_before", "params_after", "flops_before", "flops_after")}, 0)
    tb.close()
    print(f"wrote {out / 'ticket.pt'}")
    finished(out, stage_command("04_finetune.py", args, cfg, "--ticket", str(out / "ticket.pt")))


def last_epoch(folder: Path, made_by: str) -> Path:
    """The pretraining checkpoint of the highest epoch in `folder`."""
    epochs = epoch_files(folder)
    if not epochs:
        raise UserError(f"{folder}: no pretraining checkpoints epoch_EEE.pt (run: {made_by})")
    return epochs[max(epochs)]


def load_source(path: Path, cfg, made_by: str | None) -> PretrainEpoch | Ticket:
    """A pretraining epoch checkpoint, a (fine-tuned) ticket, or a plain state_dict of the config's
    model trained elsewhere (taken as its epoch 0); its model must be the config's."""
    from common.models import arch_of
    src = load(path, (PretrainEpoch, Ticket, FinetunedTicket), made_by=made_by, plain_arch=arch_of(cfg.model, cfg.data))
    check_same_model(path, src.arch, cfg)
    return src


def check_same_model(path: Path, arch: dict, cfg):
    """The source must hold the model the config describes: the same name, width and, for a
    brought model, kwargs (its `mids`, a narrowing, are the pruning's own)."""
    from common.models import arch_of
    wanted = arch_of(cfg.model, cfg.data)
    if any(arch.get(k) != wanted.get(k) for k in ("name", "width", "kwargs")):  # kwargs: brought models only
        said = f"model.arch={cfg.model.arch}, model.width={cfg.model.width}"
        raise UserError(f"{path} holds {arch_text(arch)}, but the config says {said}"
                        f"{f', model.kwargs={dict(cfg.model.kwargs)}' if 'kwargs' in wanted else ''}")


def arch_text(arch: dict) -> str:
    kwargs = f" {arch['kwargs']}" if "kwargs" in arch else ""
    return f"a {arch['name']}{kwargs} of width {arch['width']}"


def make_ticket(src: PretrainEpoch | Ticket, src_path: Path, model, pruned, cfg) -> Ticket:
    """The ticket of `pruned` (made from `model`, the weights of `src`). A pretraining checkpoint
    starts a lineage; a ticket passes its origin on (pretraining folder and hashes, kept channels,
    the training its lineage spent)."""
    from common.costs import flops_per_sample
    from common.data import input_shape
    from common.importance import is_structured
    from common.prune import nonzero_params, sparse_flops
    pc, shape = cfg.prune, input_shape(cfg.data)
    if isinstance(src, PretrainEpoch):   # a lineage starts here
        pretrain_dir, old_mask, old_kept, lineage_flops = str(src_path.parent), None, None, src.train_flops
        hashes = None
    else:                                # a ticket passes its origin on
        pretrain_dir, old_mask, old_kept, lineage_flops = src.pretrain_dir, src.mask, src.kept, src.lineage_flops
        hashes = src.pretrain_sha256
    structured = is_structured(pc.kind)
    flops_before = flops_per_sample(model, shape)
    return Ticket(
        model={k: v.detach().clone() for k, v in pruned.model.state_dict().items()},
        arch=pruned.arch, epoch=src.epoch, prune_kind=pc.kind, ratio=pc.ratio, scope=pc.scope,
        source=str(src_path), source_kind=src.KIND, source_epoch=src.epoch, pretrain_dir=pretrain_dir,
        params_before=nonzero_params(model, old_mask), params_after=nonzero_params(pruned.model, pruned.mask),
        flops_before=flops_before, flops_after=flops_per_sample(pruned.model, shape),
        flops_before_sparse=None if structured else sparse_flops(model, old_mask, shape) if old_mask else flops_before,
        flops_after_sparse=None if structured else sparse_flops(pruned.model, pruned.mask, shape),
        # structured: the kept channels of the pretrained model; a mask keeps a structured lineage's for rewinding
        kept=pruned.kept if structured else old_kept,
        mask=None if structured else pruned.mask,
        # the training complexity of the weights the ticket holds, and all the lineage spent so far
        train_flops=src.train_flops, lineage_flops=lineage_flops,
        config=cfg.to_dict(),
        lineage={"source": record(src_path)},
        # what a rewind may use: the pretraining epochs as they are now, unless a ticket passes its own on
        pretrain_sha256=hashes or pretrain_hashes(Path(pretrain_dir)),
    )


if __name__ == "__main__":
    run_stage(main)
