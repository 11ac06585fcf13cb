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

Nothing here names a residual block: the channel groups are found by tracing (common.groups),
chosen in common.selection and cut by common.narrowing. `build_model(arch)` rebuilds a model whose
keyed groups are narrowed to the widths in `arch["mids"]`, which is how both a LoFT subnetwork and
a pruned ticket become real, smaller modules.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.mobilenetv3 import _mobilenet_v3_conf  # what mobilenet_v3_small() itself calls

from common.config import is_brought, is_file_callable
from common.data import NUM_CLASSES, input_shape
from common.errors import UserError
from common.narrowing import first_channels, narrow
from common.selection import GROUP_DEFAULTS, block_refs


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


TORCHVISION_PREFIX, TIMM_PREFIX = "torchvision.", "timm."


def _timm_builder(model_name: str):
    import timm
    if model_name not in timm.list_models():
        raise UserError(f"model.arch=timm.{model_name}: timm has no model {model_name!r} (timm.list_models())")
    return lambda **kwargs: timm.create_model(model_name, pretrained=False, **kwargs)  # weights: 03 --from


def _import_callable(name: str):
    """The callable `package.module:callable` or `/abs/path/file.py:callable` names."""
    module_name, _, attr = name.partition(":")
    try:
        if is_file_callable(name):
            spec = importlib.util.spec_from_file_location(f"loft_brought_{Path(module_name).stem}", module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        top = module_name.split(".")[0]   # the package itself not found, not a module it imports
        ours = isinstance(e, ModuleNotFoundError) and (module_name + ".").startswith(f"{e.name}.")
        hint = f" (is the folder holding {top} on PYTHONPATH?)" if ours and not is_file_callable(name) else ""
        raise UserError(f"model.arch={name}: cannot import it ({_one_line(e)}){hint}") from None
    except Exception as e:   # the module's own code failed as it ran: its error, not a traceback of ours
        raise UserError(f"model.arch={name}: importing {module_name} raised {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def _brought(arch: dict, importable: frozenset[str]) -> nn.Module:
    """The user's model: a torchvision builder or class (`torchvision.resnet50`,
    `torchvision.VisionTransformer`), a timm model (`timm.efficientnet_b0`, random init), or
    `package.module:callable` / `/path/file.py:callable`, called with arch["kwargs"] (num_classes
    added where the callable takes it and the kwargs do not set it)."""
    name, kwargs = arch["name"], dict(arch.get("kwargs") or {})
    if name.startswith(TORCHVISION_PREFIX):
        attr = name[len(TORCHVISION_PREFIX):]
        make = getattr(tvm, attr, None)
        if not callable(make) or attr.startswith("_"):
            raise UserError(f"model.arch={name}: torchvision.models has no builder or class {attr!r}")
    elif name.startswith(TIMM_PREFIX):
        make = _timm_builder(name[len(TIMM_PREFIX):])
    else:
        if name not in importable:   # a checkpoint never makes a stage import code its config did not name
            raise UserError(f"arch {name!r} comes from a checkpoint, but this stage's config does not name it "
                            "(set model.arch to it)")
        make = _import_callable(name)
    try:
        params = inspect.signature(make).parameters
        takes_classes = "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_classes = False
    if takes_classes and "num_classes" not in kwargs:
        kwargs["num_classes"] = int(arch["num_classes"])
    try:
        model = make(**kwargs)
    except UserError:
        raise
    except Exception as e:   # blamed on model.kwargs only when the callable's signature refuses them
        try:
            inspect.signature(make).bind(**kwargs)
        except TypeError as refused:
            raise UserError(f"model.arch={name}: its signature refuses model.kwargs={kwargs} ({refused})") from None
        except ValueError:   # no signature to ask (a builtin)
            pass
        raise UserError(f"model.arch={name}: building the model raised {_one_line(e)}") from None
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


def build_model(arch: dict, importable: frozenset[str] = frozenset()) -> nn.Module:
    """Rebuild a model from its description: {name, num_classes, width, mids?, dropout? (WRN only),
    and for a model the user brings kwargs, input_shape, groups?}. `mids` (group key → width) keeps
    the first `width` channels of each keyed group (of each conv group where a grouped conv reads it:
    common.narrowing.first_channels); the caller loads the values. `importable`: the
    package.module:callable names this stage invocation may import (its config's model.arch,
    `Config.importable`): a checkpoint alone never makes a stage import code."""
    if not is_brought(arch["name"]):
        model = _build_full(arch["name"], int(arch["num_classes"]), float(arch["width"]),
                            float(arch.get("dropout", 0.0)))
    else:
        model = _brought(arch, importable)
    mids = dict(arch.get("mids") or {})
    if mids:
        groups = {b.name: b.group for b in block_refs(model, tuple(arch.get("input_shape") or (3, 32, 32)))}
        unknown = sorted(set(mids) - set(groups))
        if unknown:
            raise UserError(f"arch mids name no channel group of this model: {', '.join(unknown)} (a ticket or "
                            "checkpoint of another architecture?)")
        keep = {groups[k].name: first_channels(groups[k], int(w)) for k, w in mids.items()}
        groups = list(groups.values())
        small = narrow(model, groups, keep, in_place=not is_brought(arch["name"]))
        error = None if small is model else _forward_error(small, arch)  # a literal width (view(-1, 256))?
        if error:   # one line naming the first group that breaks the forward alone, not a traceback later
            name = next((n for n in keep if _forward_error(narrow(model, groups, {n: keep[n]}), arch)), "?")
            raise UserError(f"model.arch={arch['name']}: narrowing channel group {name} breaks the model's forward "
                            f"({error}); a literal channel count in its forward (a view or reshape with a "
                            "number)? leave the group out with model.group_exclude")
        model = small
    return model


@torch.no_grad()
def _forward_error(model: nn.Module, arch: dict) -> str | None:
    """The error line of `model`'s eval forward on zeros of the arch's input shape, or None."""
    try:
        model.eval()(torch.zeros(2, *(arch.get("input_shape") or (3, 32, 32))))
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    finally:
        model.train()
    return None


def arch_of(model_cfg, data_cfg) -> dict:
    """The arch a config describes (what 01 stores in every checkpoint; later stages rebuild from it):
    the model, its classes, and its input shape where it is not the zoo's default (a brought model,
    or data.image_size set)."""
    arch = {"name": model_cfg.arch, "num_classes": NUM_CLASSES[data_cfg.dataset], "width": model_cfg.width}
    if is_brought(model_cfg.arch):
        arch.update(kwargs=dict(model_cfg.kwargs), input_shape=list(input_shape(data_cfg)))
    elif data_cfg.image_size:
        arch["input_shape"] = list(input_shape(data_cfg))
    choice = {"preset": model_cfg.group_preset, "include": list(model_cfg.group_include),
              "exclude": list(model_cfg.group_exclude)}
    if choice != GROUP_DEFAULTS:
        arch["groups"] = choice
    return arch


def narrowed_arch(arch: dict, mids: dict[str, int]) -> dict:
    out = copy.deepcopy(arch)
    out["mids"] = {**(arch.get("mids") or {}), **{k: int(v) for k, v in mids.items()}}
    return out


def check_weights(model: nn.Module, state: dict, source) -> None:
    """One line naming the first key of `state` (read from `source`) that does not fit `model`."""
    own = model.state_dict()
    for key in [*own, *state]:
        if key not in state or key not in own or state[key].shape != own[key].shape:
            said = ("missing" if key not in state else "no tensor of this config's model" if key not in own else
                    f"of shape {tuple(state[key].shape)}, this config's model {tuple(own[key].shape)}")
            raise UserError(f"{source}: {key} {said}: weights of another model or number of classes")


def count_params(model_or_state) -> int:
    if isinstance(model_or_state, nn.Module):
        return sum(p.numel() for p in model_or_state.parameters())
    return sum(v.numel() for v in model_or_state.values())
