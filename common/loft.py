"""One LoFT round — partition, train locally, aggregate (SPEC section 2) — written once over
the model's list of partitioned blocks (`common.models.partitioned_blocks`).

The global model is a state dict on the training device. A worker's subnetwork is a real
narrow module, `build_model(worker_arch(...))` with the worker's channel counts, built once
(a worker's channel counts are the same every round); each round `extract(..., out=...)`
copies its slices into it in place. Output scaling: none. A subnetwork computes exactly the full network with
the other workers' mid channels removed (equivalently: conv2's input columns outside the
worker's sets zeroed), so no factor S is applied anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.data import _gen
from common.groups import channel_columns
from common.models import BlockRef, narrowed_arch

PARTITION_STREAM = 7_000_001  # generator namespace for partitions, apart from data streams


# ------------------------------------------------------------------- partition
def draw_partition(blocks: list[BlockRef], workers: int, seed: int, round_: int) -> dict[str, list[torch.Tensor]]:
    """block name → S disjoint sorted index sets covering range(mid), sizes differing by ≤ 1.

    Seeded by (seed, round) only, so every rank draws the same partition without talking."""
    gen = _gen(seed, PARTITION_STREAM, round_)
    out = {}
    for b in blocks:
        perm = torch.randperm(b.mid, generator=gen)
        out[b.name] = [torch.sort(chunk).values for chunk in torch.tensor_split(perm, workers)]
    return out


@dataclass(frozen=True)
class SlicePlan:
    """Which state entries live on partitioned channels: key → ((group key, dim, repeat), ...).
    An entry on two groups (a Bottleneck's conv2: outputs on its own group, inputs on conv1's) is
    cut along both dims; `repeat` > 1 where a flatten gives each channel that many columns."""
    entries: dict[str, tuple[tuple[str, int, int], ...]]

    @staticmethod
    def of(blocks: list[BlockRef], state: dict) -> "SlicePlan":
        entries: dict[str, tuple] = {}
        for b in blocks:
            for k, (dim, repeat) in b.slice_dims(state).items():
                entries[k] = (*entries.get(k, ()), (b.name, dim, repeat))
        return SlicePlan(entries)

    def shared_keys(self, state: dict) -> list[str]:
        return [k for k in state if k not in self.entries]

    def cuts(self, key: str, channels: dict) -> list[tuple[int, torch.Tensor]]:
        """(dim, indices) that cut entry `key` to `channels` (group key → kept channels)."""
        return [(dim, channel_columns(channels[group], repeat))
                for group, dim, repeat in self.entries.get(key, ()) if group in channels]


def worker_arch(arch: dict, part: dict, worker: int) -> dict:
    return narrowed_arch(arch, {name: len(sets[worker]) for name, sets in part.items()})


def select_channels(state: dict, plan: SlicePlan, channels: dict[str, torch.Tensor], out: dict | None = None) -> dict:
    """`state` with every planned entry cut to `channels[group]` (the others whole): a new dict of
    copies, or written in place into the tensors of `out` (a persistent module's state dict).
    The one slicing routine: LoFT's subnetworks and 03/04's structured tickets both use it."""
    sub = {} if out is None else out
    for k, v in state.items():
        cuts = plan.cuts(k, channels)
        for dim, idx in cuts:
            v = v.index_select(dim, idx)
        if out is None:
            sub[k] = v if cuts else v.clone()
        else:
            out[k].copy_(v)
    return sub


def extract(state: dict, plan: SlicePlan, part: dict, worker: int, out: dict | None = None) -> dict:
    """Worker's subnetwork state: partitioned entries sliced to its channels, the rest copied
    (into `out`'s tensors in place, if given)."""
    return select_channels(state, plan, {block: sets[worker] for block, sets in part.items()}, out)


def partition_to(part: dict, device) -> dict:
    """The partition's index sets on `device` (where the global state lives)."""
    return {name: [s.to(device) for s in sets] for name, sets in part.items()}


def slice_shape(state: dict, plan: SlicePlan, part: dict, key: str, worker: int) -> list[int]:
    """Shape of `worker`'s slice of the partitioned entry `key`."""
    shape = list(state[key].shape)
    for group, dim, repeat in plan.entries[key]:
        shape[dim] = len(part[group][worker]) * repeat
    return shape


def place(target: torch.Tensor, cuts: list[tuple[int, torch.Tensor]], values: torch.Tensor) -> None:
    """Write `values` into `target` at the cut's indices (one dim: a row/column placement; two: the
    block [rows x columns], the rest of those rows and columns untouched)."""
    (dim, idx), rest = cuts[0], cuts[1:]
    if rest:
        block = target.index_select(dim, idx)
        place(block, rest, values)
        values = block
    target.index_copy_(dim, idx, values.to(target.dtype))


# ------------------------------------------------------------------- aggregate
def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)  # reshape: logical order, any layout


def mean_of_workers(stacked: torch.Tensor) -> torch.Tensor:
    """The default combine rule: [S, n] copies of the shared floats → their mean (added in worker
    order, fp32, on every rank alike)."""
    return stacked.sum(0) / len(stacked)


def aggregate(state: dict, plan: SlicePlan, part: dict, results: dict[int, dict], comm, workers: int,
              combine=mean_of_workers) -> dict:
    """New global state from the workers' trained subnetwork states: the exchange (pack, collectives,
    place) around one combine rule.

    `results` holds this rank's workers (all S in one process). Partitioned slices are all-gathered
    and placed back at their indices (disjoint sets: a placement, not a combination). The shared
    float tensors of all S workers are all-gathered as one [S, n] stack and `combine(stack)` → [n]
    makes the new value (`mean_of_workers` unless the method says otherwise); integer buffers
    (num_batches_tracked) are equal on all workers and keep their floor mean. Every rank gets the
    same stack in the same worker order, so one process and W ranks agree bit for bit.
    """
    new = place_partitioned(state, plan, part, results, comm, workers)
    shared = plan.shared_keys(state)
    floats = [k for k in shared if state[k].is_floating_point()]
    ints = [k for k in shared if not state[k].is_floating_point()]
    for keys, rule in ((floats, combine), (ints, lambda st: torch.div(st.sum(0), len(st), rounding_mode="floor"))):
        if keys:
            stack = comm.gather_stack({w: _flat([results[w][k] for k in keys]) for w in sorted(results)}, workers)
            new.update(unpack(rule(stack), keys, state))
    return {k: new[k] for k in state}  # keep the state dict's key order


def place_partitioned(state: dict, plan: SlicePlan, part: dict, results: dict[int, dict], comm, workers: int) -> dict:
    """Every worker's partitioned slices, all-gathered and written back at its channel indices."""
    part_keys = [k for k in state if k in plan.entries]
    shapes = {w: [slice_shape(state, plan, part, k, w) for k in part_keys] for w in range(workers)}
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


def unpack(flat: torch.Tensor, keys: list[str], like: dict) -> dict:
    """A flat payload back into tensors shaped (and typed) like `like[k]`, in `keys` order."""
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[offset:offset + n].view(like[k].shape).to(like[k].dtype)
        offset += n
    return out
