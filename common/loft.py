"""One LoFT round — partition, train locally, aggregate (SPEC section 2) — written once over
the model's partitioned channel groups (`common.selection.partitioned_blocks`).

The global model is a state in flat buffers on the training device. A worker's subnetwork is a
real narrow module, `build_model(worker_arch(...))` with the worker's channel counts, built once
(a worker's channel counts are the same every round). `RoundExchange` is the round's one
exchange, for the weights and for carried momentum alike: it loads each worker's slices into its
tensors and puts the trained slices back, combining the shared tensors (`mean_of_workers`), with a
few large operators. tests/reference_round.py says the same tensor by tensor (the reference).
Output scaling: none. A subnetwork computes exactly the full network with the other workers'
channels of each partitioned group removed (equivalently: the consumers' input columns outside
the worker's sets zeroed), so no factor S is applied anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.data import _gen
from common.errors import UserError
from common.models import narrowed_arch
from common.narrowing import SlicePlan
from common.selection import BlockRef

PARTITION_STREAM = 7_000_001  # generator namespace for partitions, apart from data streams


# ------------------------------------------------------------------- partition
def draw_partition(blocks: list[BlockRef], workers: int, seed: int, round_: int) -> dict[str, list[torch.Tensor]]:
    """block name → S disjoint sorted index sets covering range(mid), sizes differing by ≤ 1.

    A group of s segments (read per conv group by a grouped conv: ChannelGroup.segments) is split
    segment by segment: worker w gets the same number k of channels (differing by ≤ 1 between
    workers) from every segment, so its j-th channel of segment i sits at i·k + j of its set (set
    sizes then differ by 0 or s).
    Seeded by (seed, round) only, so every rank draws the same partition without talking."""
    gen = _gen(seed, PARTITION_STREAM, round_)
    out = {}
    for b in blocks:
        s = b.group.segments
        per = b.mid // s
        perms = torch.stack([torch.randperm(per, generator=gen) for _ in range(s)])   # [s, per]
        perms += torch.arange(s)[:, None] * per
        out[b.name] = [torch.sort(chunk.reshape(-1)).values for chunk in torch.tensor_split(perms, workers, dim=1)]
    return out


def worker_arch(arch: dict, part: dict, worker: int) -> dict:
    return narrowed_arch(arch, {name: len(sets[worker]) for name, sets in part.items()})


# ------------------------------------------------------------------- aggregate
def mean_of_workers(stacked: torch.Tensor) -> torch.Tensor:
    """The default combine rule: [S, n] copies of the shared floats → their mean (added in worker
    order, fp32, on every rank alike)."""
    return stacked.sum(0) / len(stacked)


def floor_mean_of_workers(stacked: torch.Tensor) -> torch.Tensor:
    """The rule for shared integers (BN's num_batches_tracked, equal on all workers): floor mean."""
    return torch.div(stacked.sum(0), len(stacked), rounding_mode="floor")


# ------------------------------------------------------------------- flat form
def row_major_strides(shape) -> list[int]:
    strides, step = [], 1
    for n in reversed(list(shape)):
        strides.append(step)
        step *= n
    return strides[::-1]


@dataclass(frozen=True)
class FlatLayout:
    """A state dict in flat form: one 1-D buffer per dtype holding the entries of that dtype in
    state order, each row-major. LoFT keeps its global state so (`Loft.flat`), so that a round
    reads and writes it with a few large operators instead of one (or more) per tensor."""
    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    offsets: dict[str, int]  # where entry k starts in its dtype's buffer

    @staticmethod
    def of(state: dict) -> "FlatLayout":
        offsets, ends = {}, {}
        for k, v in state.items():
            offsets[k] = ends.get(v.dtype, 0)
            ends[v.dtype] = offsets[k] + v.numel()
        return FlatLayout({k: v.shape for k, v in state.items()}, {k: v.dtype for k, v in state.items()}, offsets)

    def keys_by_dtype(self) -> dict[torch.dtype, list[str]]:
        out: dict[torch.dtype, list[str]] = {}
        for k, dtype in self.dtypes.items():
            out.setdefault(dtype, []).append(k)
        return out

    def flatten(self, state: dict, device) -> dict[torch.dtype, torch.Tensor]:
        """New buffers on `device` holding `state`'s values (the caller's tensors stay untouched)."""
        return {dtype: torch.cat([state[k].reshape(-1) for k in keys]).to(device)
                for dtype, keys in self.keys_by_dtype().items()}

    def views(self, flats: dict[torch.dtype, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict whose tensors are views into `flats`."""
        return {k: flats[self.dtypes[k]].narrow(0, self.offsets[k], shape.numel()).view(shape)
                for k, shape in self.shapes.items()}


class RoundExchange:
    """A round's loading and aggregation (the semantics of `extract` and `aggregate`, bit for bit)
    as a few large indexing operators on flat buffers, instead of several per tensor and worker.

    A worker's state, flattened per dtype (its partitioned entries, then its shared ones, each
    row-major: the order `aggregate` packs payloads in), is a list of positions in the global
    flat buffer (`FlatLayout`). A shared entry's positions are fixed. A partitioned entry's
    element at worker index (i_0, i_1, ...) lies at
        offset + Σ_uncut dims i_d·stride_d + Σ_cut dims stride_d·(r·channels[i_d // r] + i_d % r),
    `channels` being the worker's channels of the cut's group this round (r: the cut's repeat).
    A grouped conv's input cut (g conv groups, k of the worker's columns each, n_d columns in the
    global tensor) reads, in a row of conv group q = i_0 // (the worker's rows / g),
        stride_d·(channels[q·k + i_d] − q·n_d),
    its sets holding as many channels of each conv group, sorted (`draw_partition`).
    All but `channels[...]` is fixed, a worker's widths being the same every round, so
    `begin_round` finds every position of all S workers as base + Σ_cuts mult·table[slot], `table`
    the round's channel sets concatenated: four operators.

    This rank's workers hold their tensors in flat buffers too (`local_flats`; every tensor of
    `local` a view into its dtype's buffer, in any layout: modules in turn, a fused module,
    channels_last). `load` is then one gather per dtype; `aggregate` one gather per payload, the
    collectives, and one scatter per payload into a copy of the global buffer. Every rank computes
    all S workers' positions, so it can place the payloads of workers on other ranks. The price:
    index tensors of about 10x the fp32 model's bytes, held on the device (bench_c10's model:
    29 MB for 2.8 MB of weights, measured; by that ratio about 0.45 GB for a full-width ResNet-18).
    """

    def __init__(self, plan: SlicePlan, layout: FlatLayout, part: dict, workers: int,
                 local: dict[int, dict], local_flats: dict[torch.dtype, torch.Tensor], device):
        self.S, self.device = workers, torch.device(device)
        self.groups = list(part)
        self.widths = {g: [len(s) for s in part[g]] for g in self.groups}  # every round the same
        starts, n = {}, 0  # where (worker, group)'s channels begin in the round's table
        for w in range(workers):
            for g in self.groups:
                starts[w, g] = n
                n += self.widths[g][w]
        sentinel = n  # the table's last entry, a 0: the slot of an element's missing second cut
        self.zero = torch.zeros(1, dtype=torch.int64)
        self.by_dtype = [_DtypeExchange(plan, layout, dtype, keys, self.widths, starts, sentinel, workers, local,
                                        local_flats[dtype], self.device)
                         for dtype, keys in layout.keys_by_dtype().items()]

    def begin_round(self, part: dict):
        """This round's positions of every worker's partitioned elements, from its channel sets."""
        for g in self.groups:
            if [len(s) for s in part[g]] != self.widths[g]:
                raise UserError(f"block {g}: the partition's set sizes {[len(s) for s in part[g]]} differ from "
                                f"the first round's {self.widths[g]} (a worker's widths must not change)")
        table = torch.cat([part[g][w] for w in range(self.S) for g in self.groups] + [self.zero])
        table = table.to(self.device, torch.int64)
        for ex in self.by_dtype:
            ex.begin_round(table)

    @torch.no_grad()
    def load(self, flats: dict[torch.dtype, torch.Tensor]):
        """Every local worker's slices of the global state (`flats`) into its tensors, in place."""
        for ex in self.by_dtype:
            ex.load(flats[ex.dtype])

    @torch.no_grad()
    def aggregate(self, flats: dict[torch.dtype, torch.Tensor], comm, combine) -> dict[torch.dtype, torch.Tensor]:
        """New global buffers from the workers' trained tensors: partitioned slices placed back,
        shared floats combined by `combine` ([S, n] stack → [n]), shared integers' floor mean."""
        return {ex.dtype: ex.aggregate(flats[ex.dtype], comm, combine) for ex in self.by_dtype}


class _DtypeExchange:
    """RoundExchange for the entries of one dtype."""

    def __init__(self, plan, layout, dtype, keys, widths, starts, sentinel, S, local, local_flat, device):
        self.dtype, self.S = dtype, S
        self.part_keys = [k for k in keys if k in plan.entries]
        self.shared_keys = [k for k in keys if k not in plan.entries]
        base, slot, mult, self.part_sizes = [], [], [], []
        for w in range(S):
            pieces = [self._element_positions(layout, plan.entries[k], plan.conv_groups.get(k, 1), k, w, widths,
                                              starts, sentinel) for k in self.part_keys]
            self.part_sizes.append(sum(len(p[0]) for p in pieces))
            for b, s, m in pieces:
                base.append(b), slot.append(s), mult.append(m)
        self.n_part = sum(self.part_sizes)
        # index tensors in int32 (half of int64's memory) where the operator takes them; a state
        # and a rank's workers hold fewer than 2^31 elements
        if max(sum(shape.numel() for shape in layout.shapes.values()), local_flat.numel()) >= 2**31:
            raise ValueError("RoundExchange: a state of 2^31 or more elements")
        if self.n_part:
            self.base = torch.cat(base).to(device, torch.int32)
            self.slot, self.mult = (torch.cat(t, 1).to(device, torch.int32) for t in (slot, mult))
        self.shared_global = torch.cat([torch.arange(layout.shapes[k].numel()) + layout.offsets[k]
                                        for k in self.shared_keys]).to(device) if self.shared_keys else None
        n_shared = len(self.shared_global) if self.shared_keys else 0
        # all positions of the round: the S workers' partitioned elements, then the shared ones
        self.where = torch.empty(self.n_part + n_shared, dtype=torch.int64, device=device)
        self.where_part = self.where.narrow(0, 0, self.n_part)
        if n_shared:
            self.where.narrow(0, self.n_part, n_shared).copy_(self.shared_global)
        # this rank's workers: their elements' positions in the local buffer, in payload order
        self.mine = sorted(local)
        ids = torch.arange(local_flat.numel(), device=device)

        def positions(keys, w):
            out = []
            for k in keys:
                v = local[w][k]
                if v.untyped_storage().data_ptr() != local_flat.untyped_storage().data_ptr():
                    raise ValueError(f"RoundExchange: worker {w}'s {k} is not a view into its flat buffer")
                out.append(ids.as_strided(v.shape, v.stride(), v.storage_offset()).reshape(-1))
            return torch.cat(out) if out else ids[:0]

        self.local_part = torch.cat([positions(self.part_keys, w) for w in self.mine]).int()
        self.local_shared = torch.stack([positions(self.shared_keys, w) for w in self.mine]).int()
        # for every local element, the index in `where` of the position it loads from
        part_from = torch.cat([torch.arange(sum(self.part_sizes[:w]), sum(self.part_sizes[:w + 1]), device=device)
                               for w in self.mine])
        shared_from = (self.n_part + torch.arange(n_shared, device=device)).expand(len(self.mine), n_shared)
        self.load_from = torch.full((local_flat.numel(),), -1, dtype=torch.int32, device=device)
        self.load_from[self.local_part.long()] = part_from.int()
        self.load_from[self.local_shared.reshape(-1).long()] = shared_from.reshape(-1).int()
        if (self.load_from < 0).any():
            raise ValueError("RoundExchange: a local buffer holds elements of no state entry")
        self.local_flat = local_flat

    @staticmethod
    def _element_positions(layout, cuts, conv_groups, k, w, widths, starts, sentinel):
        """(base, slot, mult) of worker w's elements of partitioned entry k, row-major: position =
        base + mult[0]·table[slot[0]] + mult[1]·table[slot[1]] (an entry cut once: slot[1] points
        at the table's final 0). `conv_groups` > 1: k is a grouped conv's weight, its dim-1 cut per
        conv group."""
        cut_at = {dim: (group, repeat) for group, dim, repeat in cuts}
        if len(cut_at) > 2 or len(cut_at) < len(cuts):
            raise ValueError(f"RoundExchange: {k} is cut {len(cuts)} times along dims {sorted(cut_at)}")
        gshape, gstride = layout.shapes[k], row_major_strides(layout.shapes[k])
        shape = [widths[cut_at[d][0]][w] * cut_at[d][1] // (conv_groups if d == 1 else 1) if d in cut_at else n
                 for d, n in enumerate(gshape)]
        base = torch.full(shape, layout.offsets[k], dtype=torch.int64)
        slot = [torch.full(shape, sentinel, dtype=torch.int64) for _ in range(2)]
        mult = [torch.zeros(shape, dtype=torch.int64) for _ in range(2)]
        c = 0
        for d, n in enumerate(shape):
            i = torch.arange(n).view([n if e == d else 1 for e in range(len(shape))])
            if d in cut_at:
                group, repeat = cut_at[d]
                first = starts[w, group] + i // repeat
                if d == 1 and conv_groups > 1:   # row i_0's conv group q reads its own k channels, at c − q·n_1
                    q = torch.arange(shape[0]).view([-1] + [1] * (len(shape) - 1)) // (shape[0] // conv_groups)
                    first, base = first + q * n, base - q * gshape[d] * gstride[d]
                base += (i % repeat) * gstride[d]
                slot[c] = first.expand(shape)
                mult[c] = torch.full(shape, gstride[d] * repeat, dtype=torch.int64)
                c += 1
            else:
                base += i * gstride[d]
        return base.reshape(-1), torch.stack([s.reshape(-1) for s in slot]), torch.stack([m.reshape(-1) for m in mult])

    def begin_round(self, table: torch.Tensor):
        if self.n_part:  # base + mult[0]·table[slot[0]] + mult[1]·table[slot[1]], in int64
            torch.add(self.base, (self.mult * table[self.slot]).sum(0), out=self.where_part)

    def load(self, flat: torch.Tensor):
        torch.index_select(flat, 0, self.where[self.load_from], out=self.local_flat)

    def aggregate(self, flat: torch.Tensor, comm, combine) -> torch.Tensor:
        new = flat.clone()  # what no worker owns (a block-diagonal entry's off-diagonal blocks) stays
        if self.n_part:
            mine = self.local_flat[self.local_part].split([self.part_sizes[w] for w in self.mine])
            gathered = comm.gather_workers(dict(zip(self.mine, mine)), dict(enumerate(self.part_sizes)))
            new.index_copy_(0, self.where_part, torch.cat([gathered[w] for w in range(self.S)]).to(self.dtype))
        if self.shared_keys:
            rule = combine if self.dtype.is_floating_point else floor_mean_of_workers
            stack = comm.gather_stack(dict(zip(self.mine, self.local_flat[self.local_shared].unbind())), self.S)
            new.index_copy_(0, self.shared_global, rule(stack).to(self.dtype))
        return new
