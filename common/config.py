"""Typed, validated configuration: YAML file + `--set dotted.key=value` overrides.

Every key has a default and a one-line comment here. `load_config` returns a `Config` or
raises `UserError` naming the bad key (unknown key, wrong type, out-of-range value).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import yaml

from common.errors import UserError
from common.schedule import check_schedule_keys, ticket_schedule_source


def opt(default, *, choices=None, lo=None, hi=None, lo_open=False, hi_open=False):
    """A config field with its admissible values (checked by `validate`)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


ZOO = ["resnet18", "resnet34", "preresnet18", "preresnet34", "resnet20", "resnet32", "resnet56", "preresnet18_in",
       "wrn16_4", "wrn16_8", "wrn22_8", "wrn28_10", "wrn34_10", "wrn40_4", "resnet18_in", "resnet34_in",
       "mobilenetv3_small"]   # common/models.py ARCH_NAMES; *_in: ImageNet stems


@dataclass
class ModelCfg:
    arch: str = opt("preresnet18")   # a zoo name (ZOO), torchvision.<builder or class> (torchvision.resnet50), timm.<model> (timm.efficientnet_b0), package.module:callable or path/to/file.py:callable (relative to the config file)
    width: float = opt(1.0, lo=0.0, hi=16.0, lo_open=True)  # zoo: channel multiplier, 1.0 = the paper's widths; others: 1.0 (use kwargs)
    kwargs: dict = opt({})           # keyword arguments of a torchvision builder/class or callable (num_classes: from the dataset unless set)
    group_preset: str = opt("paper", choices=["paper", "all"])  # channel groups chosen: paper = blocks [1:] of residual stages layerS; all = every group found
    group_include: list[str] = opt([])   # fnmatch patterns on group names or keys (layer3.*, *.conv2): keep only matching groups
    group_exclude: list[str] = opt([])   # fnmatch patterns: never prune or partition these groups


@dataclass
class DataCfg:
    dataset: str = opt("cifar10", choices=["cifar10", "cifar100", "imagenet"])   # dataset name
    root: str = opt("data")                             # has cifar-10-batches-py/, cifar-100-python/ (fetched) or imagenet/
    train_subset: int = opt(0, lo=0)                    # 0 = all 50,000; else a class-balanced subset of this size
    test_subset: int = opt(0, lo=0)                     # 0 = all 10,000; else a class-balanced subset
    eval_batch_size: int = opt(500, lo=1)               # batch size for evaluation and BN recalibration
    lossless_test: int = opt(0, lo=0)                   # also report accuracy on test images of original index < N (../shared/data: 1000 lossless)
    loader_workers: int = opt(4, lo=0)                  # ImageNet: image-decoding processes per stream (0: in process)
    image_size: int = opt(0, lo=0)                      # side of the model's input: batches resized on the device (bilinear); 0 = the dataset's own (32, ImageNet 224)


@dataclass
class TrainCfg:
    """The keys of every training section (pretrain, finetune): one SGD trainer reads them."""
    epochs: int = opt(20, lo=1, hi=10000)                 # passes of the training set (pretrain: through every worker)
    batch_size: int = opt(128, lo=1)                      # B: batch size (pretrain: of one worker)
    lr: float = opt(0.1, lo=0.0, hi=10.0, lo_open=True)   # peak learning rate
    momentum: float = opt(0.9, lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = opt(5e-4, lo=0.0, hi=1.0)
    schedule: str = opt("cosine", choices=["cosine", "step", "multistep", "constant"])  # lr over the global step (common/schedule.py)
    milestones: list[int] = opt([])          # multistep: lr *= gamma after each of these epochs (or rounds, below)
    milestone_unit: str = opt("epochs", choices=["epochs", "rounds"])  # pretrain only: rounds of K = local_iters steps, every method
    gamma: float = opt(0.1, lo=0.0, hi=1.0, lo_open=True)  # multistep decay factor
    warmup_epochs: float = opt(0.0, lo=0.0)  # linear warm-up from ~0 to lr over this many epochs (0 = none)
    grad_clip: float = opt(0.0, lo=0.0)     # max grad norm; 0 = off (DeepSpeed's default of 1.0 is never implied)
    micro_batches: int = opt(0, lo=0)       # chunks of a batch (grad accumulation / pipeline micro-batches); 0 = ranks (dense) or S (gpipe)
    bf16: bool = opt(False)                 # bf16 autocast of forward/backward on CUDA (ignored on CPU); weights stay fp32
    channels_last: bool = opt(False)        # NHWC memory format for models and batches (faster convolutions on CUDA)


@dataclass
class PretrainCfg(TrainCfg):
    method: str = opt("loft", choices=["loft", "dense", "localsgd", "gpipe"])  # pretraining algorithm (SPEC 2)
    workers: int = opt(4, lo=1, hi=1024)                  # S: number of LoFT subnetworks / workers
    local_iters: int = opt(25, lo=1)                      # K: local SGD steps per round
    carry_momentum: bool = opt(False)       # slice/gather momentum with the weights (doubles traffic); default fresh per round
    partition_stage1: bool = opt(False)     # also split blocks[1:] of stage 1 (SPEC 1 default: no)
    bn_recal_batches: int = opt(20, lo=0)   # training batches used to re-estimate BN stats before eval/checkpoint
    stop_on_emergence: bool = opt(False)    # stop once the ticket has emerged (distance.emergence_* rule)
    data: str = opt("full", choices=["full", "shard"])  # loft/localsgd: each worker walks the whole set per epoch, or its 1/S (equal samples with dense; training FLOPs: comm.json's ratio to dense)
    fused_workers: bool = opt(False)        # loft/localsgd: a device's workers train as one grouped module (common/fused.py); fast on GPUs
    compile: bool = opt(False)              # loft/localsgd: the workers' forward and backward through torch.compile (minutes to start)
    overlap: str = opt("block_diagonal", choices=["block_diagonal", "non_adjacent"])  # a tensor on two partitioned groups (Bottleneck conv2): IST's diagonal blocks, or partition only groups sharing no tensor (common/models.py)


@dataclass
class DistanceCfg:
    emergence_eps: float = opt(0.05, lo=0.0, lo_open=True)  # normalised top-k distance under which rankings count as settled
    emergence_window: int = opt(3, lo=1)                    # consecutive epoch pairs that must stay under eps


@dataclass
class PruneCfg:
    kind: str = opt("l1")   # a criterion of common/importance.py: l1 = structured filters (LoFT); magnitude = masks (LTH/RISE)
    ratio: float = opt(0.5, lo=0.0, hi=1.0, hi_open=True)  # fraction removed: 0.3/0.5/0.8 in LoFT; 1 - R in RISE
    scope: str = opt("global", choices=["global", "layer"])  # magnitude ranking over all layers or per layer


@dataclass
class FinetuneCfg(TrainCfg):
    mode: str = opt("finetune", choices=["finetune", "rewind", "scratch", "rise"])  # ticket initialisation (SPEC 6)
    epochs: int = opt(90, lo=0, hi=10000)          # the paper fine-tunes 90; 0 = the rest of the pretraining schedule (E - k, schedule_from rewind)
    rewind_epoch: int = opt(0, lo=0)               # pretraining epoch k the kept weights are reset to (rewind, rise)
    schedule: str = opt("step", choices=["step", "cosine", "multistep", "constant"])  # step: ÷10 at 50 and 75 % of epochs, fits any length; the paper names none, its configs set the authors' 31/61/81 (docs/method.md)
    schedule_from: str = opt("auto", choices=["auto", "rewind", "fresh"])  # rewind: continue the pretraining schedule from epoch k; auto: rewind for modes rewind/rise, else fresh


@dataclass
class CommCfg:
    wire_dtype: str = opt("fp32", choices=["fp32", "bf16", "fp16"])  # dtype of LoFT/Local SGD transfers (accumulated in fp32)


@dataclass
class DistCfg:
    timeout_s: int = opt(300, lo=1)          # collective timeout before a rank gives up
    threads_per_rank: int = opt(0, lo=0)     # torch threads per rank; 0 = cores // local ranks
    device: str = opt("auto", choices=["auto", "cpu", "cuda"])  # auto: cuda:LOCAL_RANK when a GPU is visible, else cpu
    deterministic: bool = opt(False)         # CUDA: deterministic kernels, so resumed = uninterrupted bit for bit (slower); the CPU always is


@dataclass
class Config:
    seed: int = opt(0, lo=0, hi=2**31 - 1)   # one seed for init, data order, augmentation and partitions
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    comm: CommCfg = field(default_factory=CommCfg)
    distance: DistanceCfg = field(default_factory=DistanceCfg)
    prune: PruneCfg = field(default_factory=PruneCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    name: str = opt("")                      # run name: the config file's stem unless given

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def importable(self) -> frozenset[str]:
        """What a stage run with this config may import to build a model: its model.arch's callable."""
        return frozenset({self.model.arch}) if ":" in self.model.arch else frozenset()


# --------------------------------------------------------------------- parsing
def _coerce(key: str, value, typ):
    if get_origin(typ) is list:  # e.g. list[int]: a YAML sequence, each item coerced
        if not isinstance(value, list):
            raise UserError(f"config key {key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(typ)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):   # YAML 1.1 (PyYAML) reads 1e-3 and 5e-4, which have no dot, as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"config key {key}: {value!r} is not a finite number")
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    raise UserError(f"config key {key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _check_range(key: str, value, meta: dict):
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise UserError(f"config key {key}: {value!r} is not one of {meta['choices']}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise UserError(f"config key {key}: {value!r} must be {'>' if meta['lo_open'] else '>='} {lo}")
    if hi is not None and (value > hi or (meta["hi_open"] and value == hi)):
        raise UserError(f"config key {key}: {value!r} must be {'<' if meta['hi_open'] else '<='} {hi}")


def _fill(obj, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise UserError(f"config key {prefix.rstrip('.') or '<top>'}: expected a mapping, got {values!r}")
    hints = get_type_hints(type(obj))
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key {full!r} (known here: {', '.join(sorted(names))})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            _fill(getattr(obj, key), value, full + ".")
        else:
            value = _coerce(full, value, typ)
            _check_range(full, value, names[key].metadata)
            setattr(obj, key, value)


def _check_defaults(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_defaults(v, f"{prefix}{f.name}.")
        else:
            _check_range(prefix + f.name, v, f.metadata)


LIBRARY_PREFIXES = ("torchvision.", "timm.")   # models named inside a library the toolkit depends on


def is_brought(arch: str) -> bool:
    """A model named by torchvision.<name>, timm.<name>, package.module:callable or
    path/to/file.py:callable, not from the zoo."""
    return arch.startswith(LIBRARY_PREFIXES) or ":" in arch


def is_file_callable(arch: str) -> bool:
    """path/to/file.py:callable (the module is a file, not an importable package)."""
    return arch.partition(":")[0].endswith(".py")


def check_arch(model: ModelCfg):
    name = model.arch
    brought = is_brought(name)
    if not brought and name not in ZOO:
        raise UserError(f"config key model.arch: {name!r} is not a zoo model ({', '.join(ZOO)}), "
                        "torchvision.<name>, timm.<name>, package.module:callable or path/to/file.py:callable")
    module, _, attr = name.partition(":")
    if is_file_callable(name) and not Path(module).is_file():
        raise UserError(f"config key model.arch: {module} is not a file (a path is relative to the config file)")
    if ":" in name and not (attr.isidentifier() and (is_file_callable(name) or
                                                     all(p.isidentifier() for p in module.split(".")))):
        raise UserError(f"config key model.arch: {name!r} is not package.module:callable or path/to/file.py:callable")
    if brought and model.width != 1.0:
        raise UserError(f"config key model.width: {model.width} applies to zoo models only; size "
                        f"{name} with model.kwargs")
    if not brought and model.kwargs:
        raise UserError(f"config key model.kwargs: zoo model {name} takes none (model.width sizes it)")


def cross_check(cfg: Config):
    """Constraints between keys."""
    check_arch(cfg.model)
    if cfg.pretrain.method == "gpipe" and is_brought(cfg.model.arch):
        raise UserError(f"config key pretrain.method: gpipe cuts a zoo model's layer list; model.arch="
                        f"{cfg.model.arch} has none (use loft, localsgd or dense)")
    if cfg.pretrain.method == "loft" and cfg.pretrain.workers < 2:
        raise UserError("config key pretrain.workers: LoFT needs at least 2 workers")
    if cfg.pretrain.data == "shard" and cfg.pretrain.method not in ("loft", "localsgd"):
        raise UserError(f"config key pretrain.data: shard splits each pass among LoFT / Local SGD workers; "
                        f"pretrain.method={cfg.pretrain.method} walks the whole set (use full)")
    if cfg.finetune.milestone_unit != "epochs":
        raise UserError("config key finetune.milestone_unit: fine-tuning has no rounds; use epochs")
    if cfg.pretrain.fused_workers and cfg.pretrain.grad_clip > 0:
        raise UserError("config key pretrain.fused_workers: not with pretrain.grad_clip > 0 (one norm would "
                        "clip all fused workers together)")
    check_schedule_keys(cfg.pretrain, "pretrain")
    check_schedule_keys(cfg.finetune, "finetune")
    fc = cfg.finetune
    if ticket_schedule_source(fc) == "rewind":
        left = cfg.pretrain.epochs - fc.rewind_epoch
        if left < 1:
            raise UserError(f"config key finetune.rewind_epoch: {fc.rewind_epoch} leaves no epoch of the "
                            f"{cfg.pretrain.epochs}-epoch pretraining schedule to continue (schedule_from rewind)")
        if fc.epochs > left:
            raise UserError(f"config key finetune.epochs: {fc.epochs} runs past the end of the pretraining schedule "
                            f"({left} epochs remain after rewind epoch {fc.rewind_epoch}); use <= {left}, 0 for all "
                            "of them, or finetune.schedule_from=fresh")
    elif fc.epochs == 0:
        raise UserError("config key finetune.epochs: 0 (the rest of the pretraining schedule) needs "
                        "finetune.schedule_from rewind (mode rewind or rise)")
    # last: the criterion registry imports torch (seconds), which the checks above need not wait for
    from common.importance import pruning_kinds  # the registry: a new criterion needs no edit here
    if cfg.prune.kind not in pruning_kinds():
        raise UserError(f"config key prune.kind: {cfg.prune.kind!r} is not one of {pruning_kinds()}")


def parse_set(items: list[str]) -> dict:
    """['a.b=1', 'c=x'] → nested dict with YAML-parsed values."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    """`b` over `a`, mapping into mapping key by key; an empty mapping in `b` replaces (empties) `a`'s:
    `--set model.kwargs={}` clears the file's kwargs."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def read_mapping(path: Path, label: str) -> dict:
    """The top-level mapping of a YAML file; anything else (no file, a folder, bytes that are not
    UTF-8, a read error, invalid YAML, a list or a scalar) is one error line starting with `label`."""
    if not path.exists():
        raise UserError(f"{label}: no such file")
    if path.is_dir():
        raise UserError(f"{label}: is a directory, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{label}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{label}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{label}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:  # an empty file: every key at its default
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{label}: top level must be a mapping, not {type(values).__name__}")
    return values


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    values = read_mapping(Path(path), f"--config {path}") if path is not None else {}
    values = _merge(values, parse_set(overrides))
    cfg = Config()
    _fill(cfg, values)
    _check_defaults(cfg)
    if is_file_callable(cfg.model.arch):   # recorded absolute: later stages and moved run folders find it
        module, _, attr = cfg.model.arch.partition(":")
        base = Path(path).resolve().parent if path is not None else Path.cwd()
        cfg.model.arch = f"{(base / module).resolve()}:{attr}"
    if not cfg.name:
        cfg.name = Path(path).stem if path is not None else "default"
    cross_check(cfg)
    return cfg


def section_from_file(path: str | os.PathLike, section: str):
    """One validated section (e.g. the pretraining schedule) of a run's saved config.yaml."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no saved config (it is written by the stage that made that folder)")
    values = read_mapping(p, str(p))
    if not isinstance(values.get(section), dict):
        raise UserError(f"{p}: has no {section} section")
    cfg = Config()
    _fill(cfg, {section: values[section]})
    _check_defaults(getattr(cfg, section), f"{section}.")
    check_schedule_keys(getattr(cfg, section), section)
    return getattr(cfg, section)


# ------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise UserError(f"{self.prog}: {message}")


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every stage takes; a stage adds its own before parsing."""
    p = _Parser(description=description,
                epilog="What the stages compute: docs/method.md. Files, folders and lineage: docs/files.md. "
                       "Config keys: common/config.py.")
    p.add_argument("--config", required=True, help="yaml/NAME.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML-parsed value), repeatable; a mapping value merges into the "
                        "file's key by key, {} empties it (model.kwargs={})")
    p.add_argument("--run-dir", default=None, help="default: runs/<config stem>")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the DeepSpeed launcher
    return p


def run_dir_of(args, cfg: Config) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
