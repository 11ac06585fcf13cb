"""The project's one checkpoint save/load pair.

Saves are atomic (temp file in the same folder, fsync, rename), so no half-written file is
ever visible under its final name, and a failed write (full disk, no permission) leaves the
previous file as it was and is one error line. Files get the mode an ordinary `open` would give
(0666 minus the umask), not the temp file's private 0600. Loads use `weights_only=True`: a file
carrying pickled code is refused, and a truncated, damaged or foreign file is one error line
saying it is corrupt, naming it. Paths a ticket stores relative to its run folder come back as
paths this process can open (common/lineage.py). torch is imported by the functions that need it, so a stage can
check its config before paying for the import.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import tempfile
from pathlib import Path

from common.errors import UserError
from common.lineage import paths_resolved


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


def save_atomic(obj: dict, path: str | os.PathLike):
    import torch
    _write_atomic(path, lambda f: torch.save(obj, f))


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


def describe(obj: dict) -> str:
    """What kind of file of this toolkit a loaded dict is, by the keys each stage writes."""
    if "finetune_mode" in obj:
        return f"a fine-tuned ticket ({obj['finetune_mode']})"
    if "kind" in obj and "arch" in obj:
        return f"a ticket ({obj['kind']})"
    if "rows" in obj and "method" in obj:
        return f"resume state (last.pt) after epoch {obj.get('epoch', '?')}"
    if "test_acc" in obj and "epoch" in obj and "method" in obj:
        return f"a pretraining checkpoint (epoch {obj['epoch']})"
    return "not a checkpoint of this toolkit"


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model", "arch"),
                    made_by: str | None = None, wanted: str = "checkpoint") -> dict:
    """Read a .pt file safely; `made_by` is the command that produces it (quoted if missing or of
    the wrong kind), `wanted` names the kind the caller needs (for the error line)."""
    import torch
    path = Path(path)
    hint = f" (run: {made_by})" if made_by else ""
    if not path.is_file():
        raise UserError(f"{path}: no such {wanted}{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text advises weights_only=False: exactly what must not be done here
        callables = _refused_callables(e, path)
        if callables:
            raise UserError(f"{path}: refused: it holds a pickled object ({', '.join(callables)}) besides tensors "
                            "and plain values, and this toolkit loads nothing that could run code") from None
        # a truncated zip, damaged records (KeyError, RuntimeError, ...), bytes that are no pickle
        raise UserError(f"{path}: corrupt checkpoint: truncated, damaged or not a torch file "
                        f"({type(e).__name__})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in required):
        kind = describe(obj) if isinstance(obj, dict) else "not a checkpoint of this toolkit"
        raise UserError(f"{path}: {kind}, not a {wanted} (needs keys {', '.join(required)}){hint}")
    return paths_resolved(obj, path)  # a ticket's paths are stored relative to its run folder
