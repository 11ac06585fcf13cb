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
    """Which state entries live on partitioned channels: key → (block name, dim)."""
    entries: dict[str, tuple[str, int]]

    @staticmethod
    def of(blocks: list[BlockRef], state: dict) -> "SlicePlan":
        return SlicePlan({k: (b.name, d) for b in blocks for k, d in b.slice_dims(state).items()})

    def shared_keys(self, state: dict) -> list[str]:
        return [k for k in state if k not in self.entries]


def worker_arch(arch: dict, part: dict, worker: int) -> dict:
    return narrowed_arch(arch, {name: len(sets[worker]) for name, sets in part.items()})


def select_channels(state: dict, plan: SlicePlan, channels: dict[str, torch.Tensor], out: dict | None = None) -> dict:
    """`state` with every planned entry cut to `channels[block]` (the others whole): a new dict of
    copies, or written in place into the tensors of `out` (a persistent module's state dict).
    The one slicing routine: LoFT's subnetworks and 03/04's structured tickets both use it."""
    sub = {} if out is None else out
    for k, v in state.items():
        sliced = k in plan.entries and plan.entries[k][0] in channels
        if sliced:
            block, dim = plan.entries[k]
            v = v.index_select(dim, channels[block])
        if out is None:
            sub[k] = v if sliced else v.clone()
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
    block, dim = plan.entries[key]
    shape = list(state[key].shape)
    shape[dim] = len(part[block][worker])
    return shape


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
        for k, shape in zip(part_keys, shapes[w]):
            block, dim = plan.entries[k]
            n = torch.Size(shape).numel()
            new[k].index_copy_(dim, part[block][w], flat[offset:offset + n].view(shape).to(state[k].dtype))
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
