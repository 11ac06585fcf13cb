"""Identity of the files a stage's output came from, so a stage can tell when one changed since.

An artefact records each upstream file as {"path", "sha256"} (the hash of the file's bytes).
A ticket records its source checkpoint and the hash of every pretraining epoch it could be
rewound to; a fine-tuned result records its ticket and its rewind checkpoint. A later stage
re-hashes the files it is about to use and refuses, in one line, when a hash differs: after
`01 --force` with another seed, an old ticket's kept indices no longer belong to the new run's
epoch-k weights, and pairing them would give a silently meaningless result.

A ticket (and a fine-tuned final.pt) stores its paths relative to its run folder, the folder
above its own (RUN/prune_TAG/ticket.pt: RUN), so a run tree copied, moved or unpacked elsewhere
reads its own files, and the hashes tell whether they are still the ones it was made from.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from common.errors import UserError

EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(path: str | Path) -> dict:
    return {"path": str(path), "sha256": file_sha256(path)}


def epoch_files(folder: Path) -> dict[int, Path]:
    """A pretraining folder's epoch checkpoints by epoch."""
    return {int(m.group(1)): f for f in sorted(Path(folder).glob("epoch_*.pt")) if (m := EPOCH_FILE.fullmatch(f.name))}


def pretrain_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every epoch checkpoint of a pretraining folder (keys: epoch numbers as strings)."""
    return {str(e): file_sha256(f) for e, f in epoch_files(folder).items()}


def check_unchanged(path: str | Path, sha256: str, user: str, remake: str):
    """Refuse when `path` no longer holds the bytes `user` was made from."""
    if file_sha256(path) != sha256:
        raise UserError(f"{path} changed since {user} was made from it (content hash differs); "
                        f"remake it: {remake}")


RELATIVE_TO_RUN = "run folder"  # the value of a ticket's "paths_relative_to"
PATH_KEYS = ("source", "pretrain_dir")  # a ticket's paths, besides lineage.source.path


def run_folder(artefact: str | Path) -> Path:
    return Path(artefact).absolute().parent.parent


def _map_paths(ticket: dict, change) -> dict:
    """`ticket` (a ticket's stored dict) with `change` applied to each of its paths."""
    out = {**ticket, **{k: change(ticket[k]) for k in PATH_KEYS if k in ticket}}
    source = (ticket.get("lineage") or {}).get("source")  # none in tickets made before lineage was recorded
    if source:
        out["lineage"] = {**ticket["lineage"], "source": {**source, "path": change(source["path"])}}
    return out


def paths_relative_to_run(ticket: dict, artefact: str | Path) -> dict:
    """`ticket` (its paths as this process opens them) as it is to be saved at `artefact`."""
    run = run_folder(artefact)
    out = _map_paths(ticket, lambda p: os.path.relpath(Path(p).absolute(), run))
    out["paths_relative_to"] = RELATIVE_TO_RUN
    return out


def paths_resolved(ticket: dict, artefact: str | Path) -> dict:
    """A ticket loaded from `artefact`, with paths this process can open. Tickets saved before
    paths were stored relative keep them as they were recorded."""
    if ticket.get("paths_relative_to") != RELATIVE_TO_RUN:
        return ticket
    run = run_folder(artefact)
    out = _map_paths(ticket, lambda p: os.path.normpath(run / p))
    del out["paths_relative_to"]
    return out
