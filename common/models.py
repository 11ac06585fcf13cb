"""The model zoo (SPEC 1) and the generic description of its residual blocks.

Architectures (`build_model({"name": ..., "num_classes": ..., "width": ...})`; `ARCH_NAMES`
lists the names the config offers):
- CIFAR (32x32 input, 3x3 stem, no max-pool): `resnet18`, `resnet34` (BasicBlock, 64-128-256-512),
  `preresnet18`, `preresnet34` (pre-activation blocks), `resnet20/32/56` (3 stages 16-32-64,
  n = (d-2)/6 BasicBlocks each, He et al. 2015 option-A shortcuts: parameter-free, stride-2
  subsampling plus zero channels, as in the RISE paper's reference code), and `wrn{d}_{k}`, the
  WideResNet WRN-d-k (3 stages 16k-32k-64k of n = (d-4)/6 pre-activation wide blocks, stem 16).
- ImageNet (224x224 input, 7x7 stride-2 stem + max-pool): `resnet18_in`, `resnet34_in`
  (torchvision's ResNet class, its modules, state-dict keys and init), `preresnet18_in`
  (pre-activation BasicBlocks, 64-128-256-512, the LoFT paper's "PreResNet-18 ImageNet").
- `mobilenetv3_small`: torchvision's MobileNetV3-small, for the unstructured-pruning path.
`width` multiplies every channel count (stem included) of every model; torchvision's models
are rebuilt narrower by the same code that builds them at width 1.0.

Every model exposes `layer_list()`: the modules whose sequential application is the forward
pass ([stem conv, stem norm, block_1 .. block_n, head], the list GPipe cuts, SPEC section 3);
each model's forward *is* that sequential application, so hooks on the list fire in training.

Residual blocks are not named here: `block_refs` takes the channel groups that tracing finds
(common.groups, Torch-Pruning's DependencyGraph; once per model structure) inside a block
`layerS.J`, and the `paper` preset (SPEC section 1) says which 03 prunes (`prunable_blocks`) and
LoFT partitions (`partitioned_blocks`). A `BlockRef` is such a group keyed by its block: the key of
`arch["mids"]`, a ticket's kept channels and LoFT's partition; `slice_dims` are the group's
state-dict entries. `build_model(arch)` rebuilds a model whose groups are narrowed to the widths in
`arch["mids"]`, which is how both a LoFT subnetwork and a pruned ticket become real, smaller modules.
A model whose groups lie in no such block (MobileNetV3: its inverted-residual blocks are
`features.N`) is not partitionable by the preset: `block_refs` raises a `UserError` saying so.
"""
from __future__ import annotations

import copy
import importlib
from collections import Counter
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.mobilenetv3 import _mobilenet_v3_conf  # what mobilenet_v3_small() itself calls

from common.config import IMPORTS_NAMED, is_brought
from common.errors import UserError
from common.groups import CONV_TYPES, PRESETS, ChannelGroup, Selection, block_of, discovered, filter_selection


# --------------------------------------------------------------------------- blocks
class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU (He et al. 2015). Mid channels: conv1/bn1/conv2."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, mid: int | None = None):
        super().__init__()
        mid = out_ch if mid is None else mid
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = self.projection(in_ch, out_ch, stride)

    @staticmethod
    def projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
        """Option B: 1x1 conv + BN."""
        return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad the new channels (half before, half after)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.before, self.after = stride, (out_ch - in_ch) // 2, out_ch - in_ch - (out_ch - in_ch) // 2

    def forward(self, x):
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.before, self.after))


class BasicBlockA(BasicBlock):
    """BasicBlock with the parameter-free option-A shortcut (the small CIFAR ResNets)."""

    @staticmethod
    def projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
        return PadShortcut(in_ch, out_ch, stride)


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut (He et al. 2016, identity mappings). Mid: conv1/bn2/conv2."""

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


class WideBlock(PreActBlock):
    """WRN's wide basic block: a PreActBlock with dropout between the two convs (0 = none)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, mid: int | None = None, dropout: float = 0.0):
        super().__init__(in_ch, out_ch, stride, mid)
        self.dropout = dropout

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, self.dropout, self.training) if self.dropout > 0 else out
        return self.conv2(out) + shortcut


def residual_stages(model: nn.Module) -> list[nn.Sequential]:
    """`layer1 .. layerN` of a ResNet, for its layer list (LoFT and pruning find blocks by tracing: block_refs)."""
    stages, i = [], 1
    while hasattr(model, f"layer{i}"):
        stages.append(getattr(model, f"layer{i}"))
        i += 1
    return stages


class GlobalAvgPool(nn.Module):
    """N x C x H x W → N x C x 1 x 1, the mean over (H, W). Used instead of AdaptiveAvgPool2d(1),
    whose CUDA backward has no deterministic kernel (an error under dist.deterministic); the mean
    gives the same bits on the CPU, forward and backward."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


def _global_pools_as_means(model: nn.Module) -> nn.Module:
    """Every AdaptiveAvgPool2d to 1x1 in a torchvision model (head, squeeze-excitation) → GlobalAvgPool."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
                setattr(parent, name, GlobalAvgPool())
    return model


class Head(nn.Module):
    """[optional final BN-ReLU] → global average pool → linear classifier."""

    def __init__(self, in_ch: int, num_classes: int, final_bn: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch) if final_bn else None
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(x.mean((2, 3)))  # global average pool (see GlobalAvgPool)


# --------------------------------------------------------------------- networks
class ResNet(nn.Module):
    """Stem, stages of residual blocks (stage i > 1 starts with stride 2), head. Widths already scaled.

    CIFAR stem: 3x3 conv, stride 1, then BN-ReLU (post-activation) or nothing (pre-activation
    nets normalise inside each block; the stem-norm slot is an identity so that the layer list
    has the same shape for every model). ImageNet stem: 7x7 stride-2 conv, BN-ReLU, 3x3 max-pool."""

    def __init__(self, block, num_blocks, widths, num_classes: int, preact: bool,
                 stem_width: int | None = None, imagenet_stem: bool = False, **block_kw):
        super().__init__()
        stem = stem_width or widths[0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
            self.bn1 = nn.Sequential(nn.BatchNorm2d(stem), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
            self.bn1 = nn.Identity() if preact else nn.Sequential(nn.BatchNorm2d(stem), nn.ReLU())
        in_ch = stem
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, w, stride if j == 0 else 1, **block_kw))
                in_ch = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.head = Head(in_ch, num_classes, final_bn=preact)

    def layer_list(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, *[b for stage in residual_stages(self) for b in stage], self.head]

    def forward(self, x):
        for layer in self.layer_list():
            x = layer(x)
        return x


CifarResNet = ResNet  # the name it had before the ImageNet stem


class TorchvisionResNet(tvm.ResNet):
    """torchvision's ImageNet ResNet with BasicBlocks: the same class, modules, state-dict keys and
    initialisation (at width 1.0, bit for bit what `torchvision.models.resnet18(num_classes=...)`
    builds from the same seed; a test checks it), built with every channel count times `width`.

    Layer list: [conv1, (bn1, relu, maxpool), blocks..., (avgpool, flatten, fc)]; the two groups
    are kept as (unregistered) Sequentials so the forward runs through the very same objects."""

    def __init__(self, layers: list[int], num_classes: int, width: float = 1.0):
        nn.Module.__init__(self)  # torchvision's ResNet.__init__ with the stage widths scaled
        block, w = tvm.resnet.BasicBlock, _scaled([64, 128, 256, 512], width)
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = w[0]
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (n, c) in enumerate(zip(layers, w)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, c, n, stride=1 if i == 0 else 2))
        self.avgpool = GlobalAvgPool()  # torchvision: AdaptiveAvgPool2d((1, 1)), same bits
        self.fc = nn.Linear(w[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def layer_list(self) -> list[nn.Module]:
        if "_groups" not in self.__dict__:  # a plain attribute: not a submodule, keys unchanged
            self._groups = (nn.Sequential(self.bn1, self.relu, self.maxpool),
                            nn.Sequential(self.avgpool, nn.Flatten(1), self.fc))
        return [self.conv1, self._groups[0], *[b for s in residual_stages(self) for b in s], self._groups[1]]

    def forward(self, x):
        for layer in self.layer_list():
            x = layer(x)
        return x


class MobileNetV3Small(tvm.MobileNetV3):
    """torchvision's MobileNetV3-small (`mobilenet_v3_small(num_classes=...)`: same class, modules,
    keys and init), channel counts scaled by torchvision's own `width_mult`. Its channel groups are
    found, but the paper preset chooses none (they are not in blocks `layerS.J`): not partitionable.

    Layer list: [stem conv, (stem BN, hardswish), inverted-residual blocks..., (last 1x1 conv
    block, avgpool, flatten, classifier)]."""

    def __init__(self, num_classes: int, width: float = 1.0):
        setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width)
        super().__init__(setting, last_channel, num_classes=num_classes)
        _global_pools_as_means(self)

    def layer_list(self) -> list[nn.Module]:
        if "_groups" not in self.__dict__:
            stem, f = self.features[0], self.features
            self._groups = (nn.Sequential(*list(stem)[1:]),
                            nn.Sequential(f[len(f) - 1], self.avgpool, nn.Flatten(1), self.classifier))
        f = self.features
        return [f[0][0], self._groups[0], *[f[i] for i in range(1, len(f) - 1)], self._groups[1]]

    def forward(self, x):
        for layer in self.layer_list():
            x = layer(x)
        return x


# ---------------------------------------------------------------------- registry
def _scaled(widths, width: float) -> list[int]:
    return [max(1, int(round(w * width))) for w in widths]


@dataclass(frozen=True)
class ResNetSpec:
    block: type
    num_blocks: tuple
    widths: tuple             # stage widths at width=1.0
    stem: int | None = None   # stem width at width=1.0 (default: the first stage's)
    imagenet_stem: bool = False


_C4, _C3 = (64, 128, 256, 512), (16, 32, 64)
RESNETS = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2), _C4),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3), _C4),
    "preresnet18": ResNetSpec(PreActBlock, (2, 2, 2, 2), _C4),
    "preresnet34": ResNetSpec(PreActBlock, (3, 4, 6, 3), _C4),
    "resnet20": ResNetSpec(BasicBlockA, (3, 3, 3), _C3),
    "resnet32": ResNetSpec(BasicBlockA, (5, 5, 5), _C3),
    "resnet56": ResNetSpec(BasicBlockA, (9, 9, 9), _C3),
    "preresnet18_in": ResNetSpec(PreActBlock, (2, 2, 2, 2), _C4, imagenet_stem=True),
}
TORCHVISION_RESNETS = {"resnet18_in": [2, 2, 2, 2], "resnet34_in": [3, 4, 6, 3]}
WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")  # wrn{depth}_{widen factor}: WRN-d-k, d = 6n + 4
WRNS = ["wrn16_4", "wrn16_8", "wrn22_8", "wrn28_10", "wrn34_10", "wrn40_4"]
ARCH_NAMES = [*RESNETS, *WRNS, *TORCHVISION_RESNETS, "mobilenetv3_small"]  # the config's choices


def _wrn(name: str, num_classes: int, width: float, dropout: float) -> nn.Module:
    m = WRN_NAME.fullmatch(name)
    d, k = int(m.group(1)), int(m.group(2))
    if (d - 4) % 6 or d < 10 or k < 1:
        raise UserError(f"model.arch={name}: WRN depth must be 6n+4 (10, 16, 22, 28, 34, 40, ...) and k >= 1")
    n = (d - 4) // 6
    widths = _scaled([16 * k, 32 * k, 64 * k], width)
    return ResNet(WideBlock, [n] * 3, widths, num_classes, preact=True,
                  stem_width=_scaled([16], width)[0], dropout=dropout)


TORCHVISION_PREFIX = "torchvision."


def is_zoo(name: str) -> bool:
    return not is_brought(name)


def _brought(arch: dict) -> nn.Module:
    """The user's model: a torchvision builder or class (`torchvision.resnet50`,
    `torchvision.VisionTransformer`) or `package.module:callable`, called with arch["kwargs"]
    (num_classes added where the callable takes it and the kwargs do not set it)."""
    name, kwargs = arch["name"], dict(arch.get("kwargs") or {})
    if name.startswith(TORCHVISION_PREFIX):
        attr = name[len(TORCHVISION_PREFIX):]
        make = getattr(tvm, attr, None)
        if not callable(make) or attr.startswith("_"):
            raise UserError(f"model.arch={name}: torchvision.models has no builder or class {attr!r}")
    else:
        if name not in IMPORTS_NAMED:   # a checkpoint never makes a stage import code its config did not name
            raise UserError(f"arch {name!r} comes from a checkpoint, but this stage's config does not name it "
                            "(set model.arch to it)")
        module_name, _, attr = name.partition(":")
        try:
            make = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"model.arch={name}: cannot import it ({type(e).__name__}: {e})") from None
    try:
        params = inspect.signature(make).parameters
        takes_classes = "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_classes = False
    if takes_classes and "num_classes" not in kwargs:
        kwargs["num_classes"] = int(arch["num_classes"])
    try:
        model = make(**kwargs)
    except TypeError as e:
        raise UserError(f"model.arch={name} with model.kwargs={kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.arch={name} returned a {type(model).__name__}, not an nn.Module")
    return _global_pools_as_means(model)


def _build_full(name: str, num_classes: int, width: float, dropout: float = 0.0) -> nn.Module:
    if name in RESNETS:
        s = RESNETS[name]
        return ResNet(s.block, s.num_blocks, _scaled(s.widths, width), num_classes,
                      preact=issubclass(s.block, PreActBlock),
                      stem_width=_scaled([s.stem], width)[0] if s.stem else None, imagenet_stem=s.imagenet_stem)
    if WRN_NAME.fullmatch(name):
        return _wrn(name, num_classes, width, dropout)
    if name in TORCHVISION_RESNETS:
        return TorchvisionResNet(TORCHVISION_RESNETS[name], num_classes, width)
    if name == "mobilenetv3_small":
        return MobileNetV3Small(num_classes, width)
    raise UserError(f"model.arch: unknown architecture {name!r} (choose from {', '.join(ARCH_NAMES)})")


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

    def slice_dims(self, state: dict) -> dict[str, tuple[int, int]]:
        """state-dict keys that live on the group's channels → (dim they index, repeat: how many
        consecutive columns a channel has there, > 1 behind a flatten)."""
        return self.group.entries(state)


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
    if choice["preset"] not in PRESETS:
        raise UserError(f"model.group_preset: unknown preset {choice['preset']!r} (choose from {', '.join(PRESETS)})")
    chosen = PRESETS[choice["preset"]]([b.group for b in refs], partition_stage1=partition_stage1)
    chosen = filter_selection(chosen, {b.group.name: b.name for b in refs}, choice["include"], choice["exclude"])
    if not chosen.prunable:
        raise UserError(f"{type(model).__name__} is not partitionable with model.group_preset={choice['preset']}"
                        f"{' and the include/exclude patterns' if choice['include'] or choice['exclude'] else ''}: "
                        f"none of its {len(refs)} channel groups is chosen (01 --dry-run lists them); "
                        "choose groups, or use pretrain.method=dense, localsgd or gpipe and prune.kind=magnitude")
    return refs, chosen


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


OVERLAPS = ("block_diagonal", "non_adjacent")


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
    if overlap == "block_diagonal":
        return refs, chosen
    if overlap != "non_adjacent":
        raise UserError(f"pretrain.overlap: unknown {overlap!r} (choose from {', '.join(OVERLAPS)})")
    state, owner, kept, why_not = model.state_dict(), {}, [], dict(chosen.why_not)
    for b in refs:
        if b.group.name not in chosen.partitioned:
            continue
        keys = set(b.slice_dims(state))
        shared = sorted(keys & set(owner))
        if shared:
            why_not[b.group.name] = f"shares {shared[0]} with {owner[shared[0]]} (pretrain.overlap=non_adjacent)"
        else:
            kept.append(b.group.name)
            owner.update({k: b.group.name for k in keys})
    return refs, Selection(chosen.prunable, tuple(kept), why_not)


# --------------------------------------------------------------------- narrowing
def _narrowed(module: nn.Module, path: str, out_ch: int | None = None, in_ch: int | None = None) -> nn.Module:
    """A fresh module like `module` with `out_ch` outputs (a BN, a depthwise conv: `out_ch`
    channels) or `in_ch` inputs. Fresh modules, not slices: their values are loaded afterwards."""
    kind = type(module)
    if kind in CONV_TYPES and module.groups == 1:
        return kind(in_ch or module.in_channels, out_ch or module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, 1, module.bias is not None, module.padding_mode)
    if kind in CONV_TYPES and module.groups == module.in_channels == module.out_channels and out_ch:
        return kind(out_ch, out_ch, module.kernel_size, module.stride, module.padding, module.dilation, out_ch,
                    module.bias is not None, module.padding_mode)
    if kind is nn.Linear:
        return nn.Linear(in_ch or module.in_features, out_ch or module.out_features, module.bias is not None)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return kind(out_ch, module.eps, module.momentum, module.affine, module.track_running_stats)
    if kind is nn.PReLU and out_ch:
        return nn.PReLU(out_ch)
    raise UserError(f"cannot narrow {path}: a {kind.__name__} (narrowed: Conv, depthwise Conv, Linear, BatchNorm, "
                    "PReLU); leave its group out with model.group_exclude")


def set_mid_widths(model: nn.Module, mids: dict[str, int], input_shape=(3, 32, 32)) -> nn.Module:
    """Narrow each keyed channel group to `mids[key]` channels (in place): its producers, members
    and consumers, in that order, replaced by fresh modules of the new width. Groups are traced on
    the full model first, so two groups on one module (a Bottleneck's conv2) narrow both its dims."""
    if not mids:
        return model
    groups = {b.name: b.group for b in block_refs(model, input_shape)}
    unknown = sorted(set(mids) - set(groups))
    if unknown:
        raise UserError(f"arch mids name no channel group of this model: {', '.join(unknown)} (a ticket or "
                        "checkpoint of another architecture?)")
    for name, width in mids.items():
        g = groups[name]
        for path, _ in g.producers:
            _replace(model, path, _narrowed(model.get_submodule(path), path, out_ch=width))
        for path in g.members:
            _replace(model, path, _narrowed(model.get_submodule(path), path, out_ch=width))
        for path, _, repeat in g.consumers:
            _replace(model, path, _narrowed(model.get_submodule(path), path, in_ch=width * repeat))
    return model


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def build_model(arch: dict) -> nn.Module:
    """Rebuild a model from its description: {name, num_classes, width, mids?, dropout? (WRN only),
    and for a model the user brings kwargs, input_shape, groups?}."""
    if is_zoo(arch["name"]):
        model = _build_full(arch["name"], int(arch["num_classes"]), float(arch["width"]),
                            float(arch.get("dropout", 0.0)))
    else:
        model = _brought(arch)
    return set_mid_widths(model, dict(arch.get("mids") or {}), tuple(arch.get("input_shape") or (3, 32, 32)))


def arch_of(model_cfg, num_classes: int, input_shape) -> dict:
    """The arch a config describes (what 01 stores in every checkpoint; later stages rebuild from it)."""
    arch = {"name": model_cfg.arch, "num_classes": num_classes, "width": model_cfg.width}
    if not is_zoo(model_cfg.arch):
        arch.update(kwargs=dict(model_cfg.kwargs), input_shape=list(input_shape))
    choice = {"preset": model_cfg.group_preset, "include": list(model_cfg.group_include),
              "exclude": list(model_cfg.group_exclude)}
    if choice != GROUP_DEFAULTS:
        arch["groups"] = choice
    return arch


def narrowed_arch(arch: dict, mids: dict[str, int]) -> dict:
    out = copy.deepcopy(arch)
    out["mids"] = {**(arch.get("mids") or {}), **{k: int(v) for k, v in mids.items()}}
    return out


def count_params(model_or_state) -> int:
    if isinstance(model_or_state, nn.Module):
        return sum(p.numel() for p in model_or_state.parameters())
    return sum(v.numel() for v in model_or_state.values())
