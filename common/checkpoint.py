"""The project's one checkpoint save/load pair.

Saves are atomic (temp file in the same folder, fsync, rename), so no half-written file is
ever visible under its final name. Loads use `weights_only=True`: a file carrying pickled
code is refused, and a truncated or foreign file becomes one error line naming it.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from common.errors import UserError


def save_atomic(obj: dict, path: str | os.PathLike):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(text: str, path: str | os.PathLike):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model", "arch"),
                    made_by: str | None = None) -> dict:
    """Read a .pt file safely; `made_by` is the command that produces it (quoted if missing)."""
    path = Path(path)
    if not path.is_file():
        hint = f" (run: {made_by})" if made_by else ""
        raise UserError(f"{path}: no such checkpoint{hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path}: refused, not a plain-tensor checkpoint (weights_only load failed: {first[:200]})") from None
    except Exception as e:  # truncated zip, corrupt records (KeyError, RuntimeError, ...), not a torch file
        raise UserError(f"{path}: unreadable checkpoint, truncated or not a torch file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in required):
        raise UserError(f"{path}: not a checkpoint of this toolkit (needs keys {', '.join(required)})")
    return obj
