"""The project's one checkpoint save/load pair.

Saves are atomic (temp file in the same folder, fsync, rename), so no half-written file is
ever visible under its final name, and a failed write (full disk, no permission) leaves the
previous file as it was. Files get the mode an ordinary `open` would give (0666 minus the
umask), not the temp file's private 0600. Loads use `weights_only=True`: a file carrying
pickled code is refused, and a truncated or foreign file becomes one error line naming it.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from common.errors import UserError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def cannot_write(path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write ({e.strerror or type(e).__name__})")


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
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_atomic(obj: dict, path: str | os.PathLike):
    _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike):
    _write_atomic(path, lambda f: f.write(text.encode()))


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 100):
    """A matplotlib figure as PNG, written like every other output."""
    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


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
    path = Path(path)
    hint = f" (run: {made_by})" if made_by else ""
    if not path.is_file():
        raise UserError(f"{path}: no such {wanted}{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text advises weights_only=False, which is exactly what must not be done here
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: it holds a pickled object{what} besides tensors and plain values, "
                        "and this toolkit loads nothing that could run code") from None
    except Exception as e:  # truncated zip, corrupt records (KeyError, RuntimeError, ...), not a torch file
        raise UserError(f"{path}: unreadable checkpoint, truncated or not a torch file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in required):
        kind = describe(obj) if isinstance(obj, dict) else "not a checkpoint of this toolkit"
        raise UserError(f"{path}: {kind}, not a {wanted} (needs keys {', '.join(required)}){hint}")
    return obj
