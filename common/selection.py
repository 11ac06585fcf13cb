"""Which channel groups a run prunes and partitions — the one place that chooses (SPEC section 1).

Groups are found by tracing (common.groups); a preset chooses among them (`paper`: the LoFT paper's
choice inside residual blocks `layerS.J`; `all`: every group), `model.group_include` / `exclude`
narrow the choice, a group narrowing cannot cut is left out, and `pretrain.overlap` says what LoFT
does where one tensor lies on two chosen groups. A `BlockRef` is a chosen group with its key: the
key of `arch["mids"]`, of a ticket's kept channels and of LoFT's partition.
"""
from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from common.config import is_brought
from common.errors import UserError
from common.groups import ChannelGroup, Discovery, discovered
from common.narrowing import narrowing_problem

# --------------------------------------------------------------------------------- presets
BLOCK_NAME = re.compile(r"(layer(\d+)\.(\d+))\.")   # a group inside block j of residual stage s


def block_of(group_name: str) -> tuple[str, int, int] | None:
    """(block path, stage s, index j) of a group inside a residual block `layerS.J`, else None."""
    m = BLOCK_NAME.match(group_name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


@dataclass(frozen=True)
class Selection:
    """Which groups a preset prunes and partitions, and why each other group is left alone."""
    prunable: tuple[str, ...]
    partitioned: tuple[str, ...]
    why_not: dict[str, str] = field(default_factory=dict)   # group → why it is not partitioned


def paper_preset(groups: list[ChannelGroup], partition_stage1: bool = False) -> Selection:
    """The LoFT paper's choice (SPEC section 1): prune the groups of blocks [1:] of every residual
    stage `layerS` (the first block of a stage is the strided or widening one: kept whole) and
    partition those of stages 2..last (stage 1 too if `partition_stage1`)."""
    prunable, partitioned, why_not = [], [], {}
    for g in groups:
        block = block_of(g.name)
        if block is None:
            why_not[g.name] = "not inside a residual block layerS.J"
        elif block[2] == 0:
            why_not[g.name] = "first block of its stage (strided or widening)"
        else:
            prunable.append(g.name)
            if block[1] > 1 or partition_stage1:
                partitioned.append(g.name)
            else:
                why_not[g.name] = "stage 1 (partitioned only if asked)"
    return Selection(tuple(prunable), tuple(partitioned), why_not)


def all_preset(groups: list[ChannelGroup], partition_stage1: bool = False) -> Selection:
    """Every discovered group, pruned and partitioned (a model without the zoo's residual stages)."""
    names = tuple(g.name for g in groups)
    return Selection(names, names, {})


PRESETS = {"paper": paper_preset, "all": all_preset}


def filter_selection(chosen: Selection, keys: dict[str, str], include: list[str], exclude: list[str]) -> Selection:
    """`chosen` narrowed by fnmatch patterns, each matched against a group's name and its key
    (`keys`: name → key, e.g. layer2.1.conv1 → layer2.1): with `include`, only groups matching one
    of them; never a group matching one of `exclude`."""
    if not include and not exclude:
        return chosen

    def matches(name: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (name, keys.get(name, name)))

    def why(name: str) -> str | None:
        if include and not matches(name, include):
            return "matches no model.group_include pattern"
        if matches(name, exclude):
            return "matches a model.group_exclude pattern"
        return None

    why_not = dict(chosen.why_not)
    for name in chosen.prunable:
        if why(name):
            why_not[name] = why(name)
    return Selection(tuple(n for n in chosen.prunable if not why(n)),
                     tuple(n for n in chosen.partitioned if not why(n)), why_not)


# ------------------------------------------------------------------------ the dry-run table
def format_groups(found: Discovery, chosen: Selection | None = None) -> str:
    """The table `01 --dry-run` prints: every group (name, width, producers, consumers, chosen or
    not and why), then every place that is no group, with its reasons."""
    def chosen_text(name: str) -> str:
        if chosen is None:
            return ""
        if name in chosen.partitioned:
            return "partition + prune"
        if name in chosen.prunable:
            return f"prune only: {chosen.why_not.get(name, '')}"
        return f"no: {chosen.why_not.get(name, 'not selected')}"

    rows = [("group", "width", "producers", "consumers", "chosen" if chosen else "")]
    for g in found.groups:
        consumers = ", ".join(c if r == 1 else f"{c} (x{r})" for c, _, r in g.consumers)
        width = f"{g.segments}x{g.width // g.segments}" if g.segments > 1 else str(g.width)   # per conv group
        rows.append((g.name, width, ", ".join(p for p, _ in g.producers), consumers, chosen_text(g.name)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
             for r in rows]
    lines.append(f"{len(found.groups)} channel groups; not groups (shared channels), {len(found.rejected)} places:")
    place = max((len(p) for p, _ in found.rejected), default=0)
    lines += [f"  {p:<{place}}  {reason}" for p, reason in found.rejected]
    return "\n".join(lines)


def describe(model: nn.Module, input_shape=(3, 32, 32), preset: str | None = "paper",
             partition_stage1: bool = False) -> str:
    """Discover `model`'s groups and format them with the named preset's choice (None: no choice)."""
    found = discovered(model, input_shape)
    chosen = _preset(preset, model, found.groups, partition_stage1) if preset else None
    return format_groups(found, chosen)


def _preset(preset: str, model: nn.Module, groups: list[ChannelGroup], partition_stage1: bool) -> Selection:
    """The preset's choice, less the groups narrowing cannot cut (each with the reason)."""
    if preset not in PRESETS:
        raise UserError(f"model.group_preset: unknown group preset {preset!r} (choose from {', '.join(PRESETS)})")
    chosen = PRESETS[preset](groups, partition_stage1=partition_stage1)
    problems = {g.name: narrowing_problem(model, g) for g in groups if g.name in chosen.prunable}
    problems = {name: why for name, why in problems.items() if why}
    if not problems:
        return chosen
    return Selection(tuple(n for n in chosen.prunable if n not in problems),
                     tuple(n for n in chosen.partitioned if n not in problems), {**chosen.why_not, **problems})


# --------------------------------------------------------------- group description
@dataclass(frozen=True)
class BlockRef:
    """A channel group (common.groups) and its key: the key of `arch["mids"]`, of a ticket's kept
    channels and of LoFT's partition. Found by tracing, never by a layer's name.

    The key is the residual block's path (`layer2.1`) when the group is the only one inside a
    block `layerS.J` (the zoo's BasicBlocks: the paper's name for it), else the group's own name,
    its first producer (`layer2.1.conv2` in a Bottleneck, `features.3.block.0.0` in a MobileNet)."""
    name: str            # the key
    stage: int           # 1-based residual stage of its block `layerS.J`; 0 outside such a block
    index: int           # index of the block inside its stage (0 outside)
    group: ChannelGroup  # e.g. layer2.1.conv1 → layer2.1.bn1 → layer2.1.conv2

    @property
    def mid(self) -> int:
        """Current width of the group (conv1's filters in a BasicBlock)."""
        return self.group.width

    @property
    def producer(self) -> str:
        """The group's first producer: its name in 02's tables (a group's filters are ranked over
        all its producers: common.importance.l1_filter_norm)."""
        return self.group.producers[0][0]


def block_refs(model: nn.Module, input_shape=(3, 32, 32)) -> list[BlockRef]:
    """Every channel group traced in `model` (once per structure), keyed (see BlockRef)."""
    groups = discovered(model, input_shape).groups
    blocks = [block_of(g.name) or (None, 0, 0) for g in groups]
    per_block = Counter(path for path, _, _ in blocks if path)
    return [BlockRef(path if path and per_block[path] == 1 else g.name, stage, index, g)
            for g, (path, stage, index) in zip(groups, blocks)]


GROUP_DEFAULTS = {"preset": "paper", "include": [], "exclude": []}


def group_choice(arch: dict | None) -> dict:
    """The groups an arch prunes and partitions: a preset (common.groups.PRESETS) narrowed by
    include/exclude patterns (fnmatch, on group names or keys). Stored in the arch (and so in every
    checkpoint) only when it differs from the paper preset, so the zoo's files are unchanged."""
    return {**GROUP_DEFAULTS, **((arch or {}).get("groups") or {})}


def _chosen(model: nn.Module, arch: dict | None, partition_stage1: bool) -> tuple[list[BlockRef], Selection]:
    choice = group_choice(arch)
    refs = block_refs(model, tuple((arch or {}).get("input_shape") or (3, 32, 32)))
    chosen = _preset(choice["preset"], model, [b.group for b in refs], partition_stage1)
    chosen = filter_selection(chosen, {b.group.name: b.name for b in refs}, choice["include"], choice["exclude"])
    if not chosen.prunable:
        raise UserError(f"{type(model).__name__} is not partitionable with model.group_preset={choice['preset']}"
                        f"{' and the include/exclude patterns' if choice['include'] or choice['exclude'] else ''}: "
                        f"none of its {len(refs)} channel groups is chosen (01 --dry-run lists them); "
                        f"choose groups, or use pretrain.method={_unsplit_methods(arch)} and prune.kind=magnitude")
    return refs, chosen


def _unsplit_methods(arch: dict | None) -> str:
    """The pretraining methods that need no chosen group, for this arch (GPipe cuts zoo models only)."""
    return "dense or localsgd" if is_brought((arch or {}).get("name", "")) else "dense, localsgd or gpipe"


def is_partitionable(model: nn.Module, arch: dict | None = None) -> bool:
    """Whether the arch's group choice selects any group (LoFT, structured pruning, filter distance)."""
    try:
        _chosen(model, arch, False)
    except UserError:
        return False
    return True


def prunable_blocks(model: nn.Module, arch: dict | None = None) -> list[BlockRef]:
    """The groups 03 prunes and 02 ranks (the paper preset: blocks [1:] of every stage)."""
    refs, chosen = _chosen(model, arch, False)
    return [b for b in refs if b.group.name in chosen.prunable]


def partitioned_blocks(model: nn.Module, partition_stage1: bool = False, arch: dict | None = None,
                       overlap: str = "block_diagonal") -> list[BlockRef]:
    refs, chosen = group_selection(model, arch, partition_stage1, overlap)
    return [b for b in refs if b.group.name in chosen.partitioned]


def group_selection(model: nn.Module, arch: dict | None = None, partition_stage1: bool = False,
                    overlap: str = "block_diagonal") -> tuple[list[BlockRef], Selection]:
    """The groups LoFT splits across workers (the paper preset: prunable ones, stage 1 only if asked).

    Where one tensor lies on two chosen groups (a Bottleneck's 3x3 conv: its inputs are conv1's
    group, its outputs its own), `overlap` says what a worker gets: `block_diagonal` (IST) keeps
    both groups, and worker w trains the block [its outputs x its inputs], the off-diagonal blocks
    untouched that round; `non_adjacent` keeps, in module order, only groups sharing no tensor
    with a group kept before them."""
    refs, chosen = _chosen(model, arch, partition_stage1)
    if overlap == "block_diagonal":   # else non_adjacent (the config checks the choice)
        return refs, chosen
    state, owner, kept, why_not = model.state_dict(), {}, [], dict(chosen.why_not)
    for b in refs:
        if b.group.name not in chosen.partitioned:
            continue
        keys = set(b.group.entries(state))
        shared = sorted(keys & set(owner))
        if shared:
            why_not[b.group.name] = f"shares {shared[0]} with {owner[shared[0]]} (pretrain.overlap=non_adjacent)"
        else:
            kept.append(b.group.name)
            owner.update({k: b.group.name for k in keys})
    return refs, Selection(chosen.prunable, tuple(kept), why_not)


