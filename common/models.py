"""CIFAR ResNets and the generic description of their residual blocks.

Every model here exposes `layer1 .. layerN` (stages of residual blocks, as torchvision does)
and `layer_list()`: the modules whose sequential application is the forward pass
([stem conv, stem norm, block_1 .. block_n, head], the list GPipe cuts, SPEC section 3).

A residual block is described by `BlockRef`: its name, its inner width `mid` (conv1's
filters = conv2's input channels) and the BN that normalises those channels. LoFT's
partition, 03's pruning and 02's filter distance all walk `BlockRef`s; nothing below names
a layer of a particular network by hand. `build_model(arch)` rebuilds a model, narrowed to
the per-block mid widths in `arch["mids"]`, which is how both a LoFT subnetwork and a
pruned ticket become real, physically smaller modules.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError


# --------------------------------------------------------------------------- blocks
class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU (He et al. 2015). Mid channels: conv1/bn1/conv2."""
    MID_BN = "bn1"

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, mid: int | None = None):
        super().__init__()
        mid = out_ch if mid is None else mid
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut (He et al. 2016, identity mappings). Mid: conv1/bn2/conv2."""
    MID_BN = "bn2"

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, mid: int | None = None):
        super().__init__()
        mid = out_ch if mid is None else mid
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class Head(nn.Module):
    """[optional final BN-ReLU] → global average pool → linear classifier."""

    def __init__(self, in_ch: int, num_classes: int, final_bn: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch) if final_bn else None
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CifarResNet(nn.Module):
    """3x3 stem (no max-pool), stages of residual blocks, head. `widths` already scaled."""

    def __init__(self, block, num_blocks, widths, num_classes: int, preact: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        # Pre-activation nets normalise inside each block; their stem-norm slot is an identity
        # so that the layer list (and GPipe's cut points) has the same shape for every model.
        self.bn1 = nn.Identity() if preact else nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU())
        in_ch = widths[0]
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, w, stride if j == 0 else 1))
                in_ch = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.head = Head(in_ch, num_classes, final_bn=preact)

    def layer_list(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, *[b for stage in residual_stages(self) for b in stage], self.head]

    def forward(self, x):
        for layer in self.layer_list():
            x = layer(x)
        return x


def _scaled(widths, width: float) -> list[int]:
    return [max(1, int(round(w * width))) for w in widths]


CIFAR_ARCHS = {
    # name: (block, blocks per stage, stage widths at width=1.0)
    "resnet18": (BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": (BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512]),
    "preresnet18": (PreActBlock, [2, 2, 2, 2], [64, 128, 256, 512]),
    "preresnet34": (PreActBlock, [3, 4, 6, 3], [64, 128, 256, 512]),
}


def _build_full(name: str, num_classes: int, width: float) -> nn.Module:
    if name not in CIFAR_ARCHS:
        raise UserError(f"model.arch: unknown architecture {name!r} (choose from {', '.join(sorted(CIFAR_ARCHS))})")
    block, num_blocks, widths = CIFAR_ARCHS[name]
    return CifarResNet(block, num_blocks, _scaled(widths, width), num_classes,
                       preact=block is PreActBlock)


# --------------------------------------------------------------- block description
@dataclass(frozen=True)
class BlockRef:
    name: str      # module path, e.g. "layer2.1"
    stage: int     # 1-based stage index
    index: int     # index of the block inside its stage
    mid: int       # current inner width (conv1 filters)
    mid_bn: str    # attribute name of the BN on the mid channels

    def slice_dims(self, state: dict) -> dict[str, int]:
        """state-dict keys of this block that live on the mid channels → the dim they index."""
        keys = {f"{self.name}.conv1.weight": 0, f"{self.name}.conv1.bias": 0,
                f"{self.name}.conv2.weight": 1}
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{self.name}.{self.mid_bn}.{leaf}"] = 0
        return {k: d for k, d in keys.items() if k in state}


def residual_stages(model: nn.Module) -> list[nn.Sequential]:
    stages, i = [], 1
    while hasattr(model, f"layer{i}"):
        stages.append(getattr(model, f"layer{i}"))
        i += 1
    return stages


def block_refs(model: nn.Module) -> list[BlockRef]:
    refs = []
    for s, stage in enumerate(residual_stages(model), start=1):
        for j, block in enumerate(stage):
            mid_bn = getattr(block, "MID_BN", None)
            if mid_bn is None:
                raise UserError(f"{type(block).__name__} in layer{s} is not partitionable: "
                                "it has no conv1/conv2 pair around a mid BN")
            refs.append(BlockRef(f"layer{s}.{j}", s, j, block.conv1.out_channels, mid_bn))
    return refs


def prunable_blocks(model: nn.Module) -> list[BlockRef]:
    """Blocks [1:] of every stage: the first (possibly strided) block of a stage is kept whole."""
    return [b for b in block_refs(model) if b.index > 0]


def partitioned_blocks(model: nn.Module, partition_stage1: bool = False) -> list[BlockRef]:
    """Blocks LoFT splits across workers: prunable blocks, stage 1 only if asked (SPEC 1)."""
    return [b for b in prunable_blocks(model) if partition_stage1 or b.stage > 1]


# --------------------------------------------------------------------- narrowing
def _narrow_conv(conv: nn.Conv2d, out_ch=None, in_ch=None) -> nn.Conv2d:
    return nn.Conv2d(in_ch or conv.in_channels, out_ch or conv.out_channels, conv.kernel_size,
                     conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None)


def set_mid_widths(model: nn.Module, mids: dict[str, int]) -> nn.Module:
    """Replace conv1 / mid BN / conv2 of the named blocks by modules `mids[name]` wide (in place)."""
    for name, width in mids.items():
        block = model.get_submodule(name)
        block.conv1 = _narrow_conv(block.conv1, out_ch=width)
        setattr(block, block.MID_BN, nn.BatchNorm2d(width))
        block.conv2 = _narrow_conv(block.conv2, in_ch=width)
    return model


def build_model(arch: dict) -> nn.Module:
    """Rebuild a model from its description: {name, num_classes, width, mids?}."""
    model = _build_full(arch["name"], int(arch["num_classes"]), float(arch["width"]))
    return set_mid_widths(model, dict(arch.get("mids") or {}))


def narrowed_arch(arch: dict, mids: dict[str, int]) -> dict:
    out = copy.deepcopy(arch)
    out["mids"] = {**(arch.get("mids") or {}), **{k: int(v) for k, v in mids.items()}}
    return out


def count_params(model_or_state) -> int:
    if isinstance(model_or_state, nn.Module):
        return sum(p.numel() for p in model_or_state.parameters())
    return sum(v.numel() for v in model_or_state.values())
