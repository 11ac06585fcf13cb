"""The project's one checkpoint format: a typed record per kind of file, one writer, one reader.

    record            file                  written by
    PretrainEpoch     pretrain/epoch_EEE.pt 01, after every epoch (000: the initial weights)
    ResumeState       STAGE/last.pt         01 and 04, after every epoch (what --resume needs)
    Ticket            prune_TAG/ticket.pt   03
    FinetunedTicket   finetune_*/final.pt   04 (a ticket after training: 03 can prune it again)

`save(record, path)` writes a plain dict of tensors and plain values, the record's fields plus its
`kind`, so `torch.load(path, weights_only=True)` reads it anywhere; `load(path, wanted kinds,
made_by=...)` returns the typed record, and a file of another kind is one line naming the file,
what it is, what was wanted and the command that makes that. Files written before the kind was
recorded (up to commit 4da787e) are recognised by the keys their stage wrote, in `_old_file` and
nowhere else.

Saves are atomic (temp file in the same folder, fsync, rename), so no half-written file is
ever visible under its final name, and a failed write (full disk, no permission) leaves the
previous file as it was and is one error line. Files get the mode an ordinary `open` would give
(0666 minus the umask), not the temp file's private 0600. Loads use `weights_only=True`: a file
carrying pickled code is refused, and a truncated, damaged or foreign file is one error line
saying it is corrupt, naming it. A ticket stores its paths relative to its run folder and comes
back with paths this process can open (common/lineage.py). torch is imported by the functions
that need it, so a stage can check its config before paying for the import.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import tempfile
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from common.errors import UserError
from common.lineage import paths_relative_to_run, paths_resolved


# ------------------------------------------------------------------ the kinds of file
@dataclass(kw_only=True)
class PretrainEpoch:
    """epoch_EEE.pt (01): the BN-recalibrated global model after an epoch; 02 reads every one, 03
    prunes the last, 04 rewinds to one."""
    KIND: ClassVar[str] = "pretrain_epoch"
    WHAT: ClassVar[str] = "a pretraining checkpoint (epoch_EEE.pt)"
    THIS: ClassVar[str] = "a pretraining checkpoint (epoch {epoch})"   # what a loaded one is, in error lines
    MADE_FROM: ClassVar[tuple[str, ...]] = ()
    model: dict                              # state_dict with the architecture's own parameter names
    arch: dict                               # what common.models.build_model rebuilds the module from
    epoch: int                               # 0: the initial weights
    method: str = "unknown"                  # pretraining method (loft, dense, localsgd, gpipe)
    test_acc: float | None = None            # % of the test split, after BN recalibration
    test_acc_lossless: float | None = None   # % of its lossless images (data.lossless_test), else None
    train_flops: int = 0                     # pretraining FLOPs up to the end of this epoch


@dataclass(kw_only=True)
class ResumeState:
    """last.pt (01, 04): everything --resume needs, rewritten after every epoch."""
    KIND: ClassVar[str] = "resume_state"
    WHAT: ClassVar[str] = "resume state (last.pt)"
    THIS: ClassVar[str] = "resume state (last.pt) after epoch {epoch}"
    MADE_FROM: ClassVar[tuple[str, ...]] = ()
    model: dict                              # the global model after `epoch`
    arch: dict
    epoch: int                               # the last epoch done
    trainer: dict                            # the trainer's state_dict: optimizer state and counters
    rows: list                               # metrics.csv so far, one dict per epoch
    config: dict                             # the config the run was made with: a resume must use the same
    comm_bytes: int = 0                      # 01: bytes handed to collectives so far (rank 0's total)
    consecutive: list = field(default_factory=list)  # 01: the emergence watch's distances so far
    lineage: dict | None = None              # 04: {"ticket", "rewind"} records ({path, sha256}) it trains from


@dataclass(kw_only=True)
class Ticket:
    """ticket.pt (03): a pruned model and where it came from; 04 trains it, 03 can prune it again."""
    KIND: ClassVar[str] = "ticket"
    WHAT: ClassVar[str] = "a ticket (ticket.pt)"
    THIS: ClassVar[str] = "a ticket ({prune_kind})"
    # what 03 prunes into a ticket (its --from): load names that command for such a file given instead
    MADE_FROM: ClassVar[tuple[str, ...]] = ("pretrain_epoch", "ticket", "finetuned_ticket")
    model: dict                              # the pruned weights (magnitude: 0 where the mask is False)
    arch: dict                               # with the per-group widths `mids` once structurally pruned
    epoch: int                               # the epoch of the source's weights
    prune_kind: str                          # the criterion, prune.kind (l1, magnitude, ...)
    ratio: float                             # prune.ratio
    scope: str                               # prune.scope (magnitude: global or per layer)
    source: str                              # the file it was pruned from
    source_kind: str | None = None           # that file's kind (None: a ticket made before it was recorded)
    source_epoch: int                        # the epoch of that file's weights
    pretrain_dir: str                        # its pretraining run's folder: the epochs a rewind reads
    params_before: int                       # nonzero parameters of the source
    params_after: int                        # ... and of the ticket
    flops_before: int                        # forward FLOPs per sample (dense count) of the source
    flops_after: int                         # ... and of the ticket
    flops_before_sparse: int | None = None   # magnitude: each layer's FLOPs times its kept fraction
    flops_after_sparse: int | None = None
    kept: dict | None = None                 # structured lineage: block -> kept channels of the pretrained model
    mask: dict | None = None                 # magnitude: weight name -> bool tensor, True = a winner
    train_flops: int = 0                     # training complexity of the weights it holds
    lineage_flops: int = 0                   # all the training its lineage spent, pruning rounds included
    config: dict = field(default_factory=dict)  # the config of the stage that wrote it
    lineage: dict | None = None              # {"source": {path, sha256}}; None: made before lineage was recorded
    pretrain_sha256: dict | None = None      # epoch (str) -> sha256 of each pretraining epoch when it was made


@dataclass(kw_only=True)
class FinetunedTicket(Ticket):
    """final.pt (04): the ticket it was trained from, with the trained weights, the last epoch, the
    training FLOPs so far and 04's config; 03 can prune it again (iterative pruning)."""
    KIND: ClassVar[str] = "finetuned_ticket"
    WHAT: ClassVar[str] = "a fine-tuned ticket (final.pt)"
    THIS: ClassVar[str] = "a fine-tuned ticket ({finetune_mode})"
    MADE_FROM: ClassVar[tuple[str, ...]] = ()
    finetune_mode: str                       # finetune, rewind, scratch or rise
    ticket: str                              # the ticket file it was trained from
    test_acc: float | None = None            # % of the test split after the last epoch
    test_acc_lossless: float | None = None
    finetune_lineage: dict | None = None     # {"ticket", "rewind"} records, as in result.json's lineage


RECORDS = {r.KIND: r for r in (PretrainEpoch, ResumeState, Ticket, FinetunedTicket)}
Record = PretrainEpoch | ResumeState | Ticket | FinetunedTicket


def field_values(record: Record) -> dict:
    """The record's fields by name (the tensors themselves, not copies)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def cannot_write(path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write ({e.strerror or str(e) or type(e).__name__})")


# what torch's zip writer raises when a write of it fails (a full disk, a quota, an I/O error):
# a RuntimeError, not an OSError, e.g. "[enforce fail at inline_container.cc:471] . PytorchStreamWriter
# failed writing file data/77: file write failed" or "... unexpected pos 704 vs 598"
TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed writing|file write failed|unexpected pos \d+ vs \d+")


def _failed_write(e: RuntimeError) -> OSError | None:
    """The OSError behind a RuntimeError of torch.save's writer, or None when it is another error
    (a bug, which keeps its traceback). The OSError is in the exception's context when torch wrote
    through our file object; torch's own writes leave only the message."""
    cause = e.__cause__ or e.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause
    if TORCH_WRITE_FAILED.search(str(e)):
        return OSError(f"{str(e).split('] . ')[-1]}; is the disk full?")
    return None


def _write_atomic(path: str | os.PathLike, write):
    """Call write(binary file) on a temp file beside `path`, then rename it onto `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    except RuntimeError as e:
        failed = _failed_write(e)
        if failed is None:
            raise
        raise cannot_write(path, failed) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save(record: Record, path: str | os.PathLike):
    """Write `record` to `path` atomically, its kind recorded in it; a ticket's paths relative to
    its run folder (the run folder may move)."""
    import torch
    stored = {"kind": record.KIND, **field_values(record)}
    if isinstance(record, Ticket):
        stored = paths_relative_to_run(stored, path)
    _write_atomic(path, lambda f: torch.save(stored, f))


def write_text_atomic(text: str, path: str | os.PathLike):
    _write_atomic(path, lambda f: f.write(text.encode()))


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 100):
    """A matplotlib figure as PNG, written like every other output."""
    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


def _refused_callables(e: Exception, path: Path) -> list[str]:
    """The callables a refused file names: those torch's weights-only unpickler stopped at, or
    (where it gave up on a pickle protocol it does not read) those a complete pickle stream in the
    file would import. Empty for a file that is damaged rather than carrying code."""
    if not isinstance(e, pickle.UnpicklingError):
        return []
    stopped_at = re.findall(r"GLOBAL\s+([\w.]+)", str(e))
    return stopped_at or _imported_by_pickle(path.read_bytes())


def _imported_by_pickle(data: bytes) -> list[str]:
    """Names a pickle stream would import (GLOBAL, STACK_GLOBAL), read without running it; empty
    when `data` is not one complete pickle stream (random bytes stop on an unknown opcode, or end
    before or after the STOP opcode)."""
    names, strings, stream = [], [], io.BytesIO(data)
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle: pickletools raises ValueError, EOFError, UnicodeDecodeError, ...
        return []
    return names if stream.tell() == len(data) else []


def _read(path: Path) -> object:
    """What torch.load(weights_only=True) gives for `path`, or one line saying it carries code or
    is corrupt."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text advises weights_only=False: exactly what must not be done here
        callables = _refused_callables(e, path)
        if callables:
            raise UserError(f"{path}: refused: it holds a pickled object ({', '.join(callables)}) besides tensors "
                            "and plain values, and this toolkit loads nothing that could run code") from None
        # a truncated zip, damaged records (KeyError, RuntimeError, ...), bytes that are no pickle
        raise UserError(f"{path}: corrupt checkpoint: truncated, damaged or not a torch file "
                        f"({type(e).__name__})") from None


def _old_file(stored: dict) -> tuple[type | None, dict]:
    """A file written before the kind was recorded (up to commit 4da787e): its record type, told
    by the keys its stage wrote, and its values under today's field names (None: not a file of
    this toolkit). The only place a file's kind is guessed."""
    values = dict(stored)
    if "finetune_mode" in stored:                # 04's final.pt: a ticket's keys and the fine-tuning's
        record_type = FinetunedTicket
    elif "pretrain_dir" in stored:               # 03's ticket.pt
        record_type = Ticket
    elif "rows" in stored:                       # 01's or 04's last.pt
        record_type = ResumeState
        values["trainer"] = values.pop("method", None)
    elif {"model", "arch", "epoch"} <= stored.keys():
        return PretrainEpoch, values
    else:
        return None, values
    if record_type is not ResumeState:
        values["prune_kind"] = values.pop("kind", None)  # the criterion was stored as "kind"
        values.setdefault("lineage_flops", values.get("train_flops", 0))  # tickets older still
    return record_type, values


def _type_and_values(stored: object) -> tuple[type | None, dict]:
    """A loaded file's record type (None: not a file of this toolkit) and its values by field name."""
    if not isinstance(stored, dict):
        return None, {}
    kind = stored.get("kind")   # in a ticket older than the records: its criterion (l1, ...), no record's kind
    if isinstance(kind, str) and kind in RECORDS:
        return RECORDS[kind], stored
    return _old_file(stored)


def _plain_state_dict(stored: object) -> dict | None:
    """A file of tensors only (`torch.save(model.state_dict())`, torchvision's or timm's weights on
    disk), a DataParallel model's `module.` prefixes removed; None for anything else."""
    import torch
    if isinstance(stored, dict) and stored and all(torch.is_tensor(v) for v in stored.values()):
        strip = all(str(k).startswith("module.") for k in stored)
        return {k.removeprefix("module.") if strip else k: v for k, v in stored.items()}


def load(path: str | os.PathLike, kinds: type | tuple[type, ...], made_by: str | None = None,
         plain_arch: dict | None = None) -> Record:
    """The record stored at `path`, which must be of one of `kinds` (record types); `made_by` is
    the command that makes the wanted file, quoted when it is missing or of another kind. With
    `plain_arch`, a plain state_dict (weights trained elsewhere) is read as the epoch-0 pretraining
    checkpoint of that arch (the caller checks its keys and shapes against the model)."""
    path, kinds = Path(path), kinds if isinstance(kinds, tuple) else (kinds,)
    wanted = " or ".join(k.WHAT for k in kinds)
    hint = f" (run: {made_by})" if made_by else ""
    if not path.is_file():
        raise UserError(f"{path}: no such file; wanted {wanted}{hint}")
    stored = _read(path)
    plain = _plain_state_dict(stored) if plain_arch is not None and PretrainEpoch in kinds else None
    if plain is not None:
        return PretrainEpoch(model=plain, arch=plain_arch, epoch=0, method="trained elsewhere")
    record_type, values = _type_and_values(stored)
    if record_type is None:
        raise UserError(f"{path}: not a checkpoint of this toolkit, not {wanted}{hint}")
    if issubclass(record_type, Ticket):
        values = paths_resolved(values, path)
    names = {f.name for f in fields(record_type)}
    try:
        record = record_type(**{k: v for k, v in values.items() if k in names})  # what other code added: ignored
    except TypeError:
        missing = [f.name for f in fields(record_type) if f.name not in values
                   and f.default is MISSING and f.default_factory is MISSING]
        raise UserError(f"{path}: {record_type.WHAT} without {', '.join(missing)}: damaged, or made by "
                        "other code") from None
    if record_type not in kinds:
        source_of_wanted = made_by and any(record_type.KIND in k.MADE_FROM for k in kinds)
        hint = f"; make one from it: {made_by} --from {path}" if source_of_wanted else hint
        raise UserError(f"{path}: {record.THIS.format(**field_values(record))}, not {wanted}{hint}")
    return record
