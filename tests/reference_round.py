"""The LoFT round tensor by tensor: the reference the round exchange (common.loft.RoundExchange)
is tested against, bit for bit. Not used by the trainers."""
from __future__ import annotations

import torch

from common.loft import floor_mean_of_workers, mean_of_workers
from common.narrowing import SlicePlan, select_channels, take


def extract(state: dict, plan: SlicePlan, part: dict, worker: int) -> dict:
    """Worker's subnetwork state: partitioned entries sliced to its channels, the rest copied."""
    return select_channels(state, plan, {block: sets[worker] for block, sets in part.items()})


def partition_to(part: dict, device) -> dict:
    """The partition's index sets on `device` (where the global state lives)."""
    return {name: [s.to(device) for s in sets] for name, sets in part.items()}


def place(target: torch.Tensor, cuts: list[tuple[int, torch.Tensor]], values: torch.Tensor) -> None:
    """Write `values` into `target` at the cut's indices (one dim: a row/column placement; two: the
    block [rows x columns], the rest of those rows and columns untouched). A grouped conv's input
    cut (indices [g, k]) places, in the rows of conv group i, the columns of channels idx[i]."""
    (dim, idx), rest = cuts[0], cuts[1:]
    if rest:
        block = take(target, dim, idx)
        place(block, rest, values)
        values = block
    if idx.dim() == 1:
        target.index_copy_(dim, idx, values.to(target.dtype))
        return
    columns = target.shape[dim]
    for i, (rows, vals) in enumerate(zip(target.chunk(len(idx), 0), values.chunk(len(idx), 0))):
        rows.index_copy_(dim, idx[i] - i * columns, vals.to(target.dtype))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)  # reshape: logical order


def unpack(flat: torch.Tensor, keys: list[str], like: dict) -> dict:
    """A flat payload back into tensors shaped (and typed) like `like[k]`, in `keys` order."""
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[offset:offset + n].view(like[k].shape).to(like[k].dtype)
        offset += n
    return out


def place_partitioned(state: dict, plan: SlicePlan, part: dict, results: dict[int, dict], comm, workers: int) -> dict:
    """Every worker's partitioned slices, all-gathered and written back at its channel indices."""
    part_keys = [k for k in state if k in plan.entries]
    shapes = {w: [plan.shape(state, k, {g: sets[w] for g, sets in part.items()}) for k in part_keys]
              for w in range(workers)}
    sizes = {w: sum(torch.Size(sh).numel() for sh in shapes[w]) for w in range(workers)}
    payloads = {w: _flat([results[w][k] for k in part_keys]) for w in sorted(results)}
    gathered = comm.gather_workers(payloads, sizes)
    new = {k: state[k].clone() for k in part_keys}
    for w, flat in gathered.items():
        offset = 0
        mine = {group: sets[w] for group, sets in part.items()}
        for k, shape in zip(part_keys, shapes[w]):
            n = torch.Size(shape).numel()
            place(new[k], plan.cuts(k, mine), flat[offset:offset + n].view(shape))
            offset += n
    return new


def aggregate(state: dict, plan: SlicePlan, part: dict, results: dict[int, dict], comm, workers: int,
              combine=mean_of_workers) -> dict:
    """New global state from the workers' trained subnetwork states: partitioned slices placed back
    at their indices; the shared float tensors of all S workers all-gathered as one [S, n] stack and
    combined; integer buffers by their floor mean."""
    new = place_partitioned(state, plan, part, results, comm, workers)
    shared = [k for k in state if k not in plan.entries]
    floats = [k for k in shared if state[k].is_floating_point()]
    ints = [k for k in shared if not state[k].is_floating_point()]
    for keys, rule in ((floats, combine), (ints, floor_mean_of_workers)):
        if keys:
            stack = comm.gather_stack({w: _flat([results[w][k] for k in keys]) for w in sorted(results)}, workers)
            new.update(unpack(rule(stack), keys, state))
    return {k: new[k] for k in state}  # keep the state dict's key order
