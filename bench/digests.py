"""Digests of a run's results that do not depend on the checkpoint file format: for a .pt file,
every tensor in it (its path of keys, dtype, shape and bytes), metadata left out; for any other
file, its bytes. Two runs of the pipeline on one machine are the same iff the digests are.

    .venv/bin/python bench/digests.py runs/quick_c10
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

FILES = ["pretrain/epoch_005.pt", "distance/filter_distance.csv", "prune_l1_p50/ticket.pt",
         "finetune_l1_p50_finetune/final.pt", "finetune_l1_p50_rewind_k1/final.pt"]


def tensors(obj, path: str = ""):
    """(key path, tensor) for every tensor inside nested dicts and lists, in sorted key order."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{path}/{i}")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.suffix == ".pt":
        for key, t in tensors(torch.load(path, map_location="cpu", weights_only=True)):
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    run = Path(sys.argv[1])
    for name in FILES:
        print(f"{name}  {digest(run / name) if (run / name).is_file() else 'missing'}")
