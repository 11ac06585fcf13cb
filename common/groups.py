"""Channel groups discovered from the traced graph (SPEC section 8; rules in docs/discovery.md).

A channel group is a set of C channels that producers (output channels of a Conv or Linear)
hand only through per-channel operations (BatchNorm, activations, pooling, a depthwise conv, a
squeeze-excitation gate, a flatten) to consumers that read them as input channels; a grouped conv
(groups g > 1) produces or reads them per conv group, so the group's channels then form g equal
blocks (`segments`) that keep as many channels each. Nothing here
names a layer: Torch-Pruning's `DependencyGraph` traces one forward and lists, for every
Conv/Linear, every (node, dimension) its output channels touch; `discover` keeps the Torch-Pruning
groups whose every node is per-channel and records, for the others, which place ends them and why
(an add, a concat, a reshape into heads, a norm over the channels, a grouped conv with one channel
per conv group, the model output, an unknown op or a custom autograd function).

    found = discover(model, input_shape=(3, 32, 32))
    found.groups          # [ChannelGroup(name="layer2.1.conv1", width=128, producers=..., ...), ...]
    found.rejected        # [("layer1.0.conv3", "add"), ("fc", "model output (fc)"), ...]

Which groups a run uses: common.selection; cutting them: common.narrowing.
"""
from __future__ import annotations

import math
import re
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops as tp_ops

from common.errors import UserError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)   # transposed convs are not producers or consumers here
ROOT_TYPES = (*CONV_TYPES, nn.Linear)


# ---------------------------------------------------------------------------- the group
@dataclass(frozen=True)
class ChannelGroup:
    """One set of channels, by the modules that hold its slices.

    producers: (module, dim of its weight and bias holding the group's output channels)
    consumers: (module, dim of its weight holding the input channels, repeat): a consumer behind a
               flatten reads each channel `repeat` times, as `repeat` consecutive input columns
    members:   per-channel modules between them (BN, depthwise conv, PReLU): every tensor, dim 0
    segments:  the channels form this many equal consecutive blocks, and a keep set (pruned, a
               worker's share) keeps as many channels of each: the conv groups of the grouped convs
               that produce or read them (the lcm of their g; 1 without grouped convs)
    grouped:   (consumer, g) for each consumer that is a grouped conv: the rows of its conv group i
               (weight dim 0, block i of g) read segment i of g, at weight dim 1 (width/g columns)"""
    name: str
    width: int
    producers: tuple[tuple[str, int], ...]
    consumers: tuple[tuple[str, int, int], ...]
    members: tuple[str, ...] = ()
    segments: int = 1
    grouped: tuple[tuple[str, int], ...] = ()

    def entries(self, state: dict) -> dict[str, tuple[int, int]]:
        """State-dict keys of `state` that live on the group's channels → (dim, repeat); a grouped
        consumer's weight (`grouped`) holds them per conv group (`conv_groups`)."""
        out = {}
        for module, dim in self.producers:
            out.update({f"{module}.{leaf}": (dim, 1) for leaf in ("weight", "bias")})
        for module, dim, repeat in self.consumers:
            out[f"{module}.weight"] = (dim, repeat)
        for module in self.members:
            out.update({f"{module}.{leaf}": (0, 1) for leaf in ("weight", "bias", "running_mean", "running_var")})
        return {k: v for k, v in out.items() if k in state}

    def conv_groups(self) -> dict[str, int]:
        """Weight key of each grouped consumer → its g (see `grouped`)."""
        return {f"{module}.weight": g for module, g in self.grouped}


@dataclass
class Discovery:
    """What `discover` found: the groups (in module order) and the places that are not groups."""
    groups: list[ChannelGroup]
    rejected: list[tuple[str, str]]    # (place: the producers' name, reason(s) joined by "; ")

    def by_name(self) -> dict[str, ChannelGroup]:
        return {g.name: g for g in self.groups}


# ----------------------------------------------------------------------------- discovery
def discover(model: nn.Module, input_shape=(3, 32, 32), example: torch.Tensor | None = None) -> Discovery:
    """Trace one eval-mode forward and return the model's channel groups and rejected places.

    `example` (default: a batch of 2 random inputs of `input_shape`) fixes the shapes the graph
    is read at (e.g. how many positions a flatten repeats each channel over)."""
    if example is None:
        device = next(model.parameters()).device
        example = torch.randn(2, *input_shape, device=device)
    trace = _Trace()
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]   # the graph is read from autograd
    for p in frozen:
        p.requires_grad_(True)
    try:
        model.eval()
        _refuse_data_dependent_control_flow(model, example)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Torch-Pruning warns about ops it does not know; we judge them below
            graph = tp.DependencyGraph().build_dependency(
                model, example, forward_fn=trace.forward, verbose=False)
            tp_groups = list(graph.get_all_groups(root_module_types=ROOT_TYPES))
    except UserError:
        raise
    except Exception as e:  # the user's forward or the tracer failed: one line, not a traceback
        raise UserError(_trace_failure(model, example, e)) from None
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)

    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    internal = trace.internal_nodes(graph, names)
    groups, rejected = [], []
    for tp_group in tp_groups:
        judged = _judge(tp_group, graph, names, internal, trace)
        if isinstance(judged, ChannelGroup):
            groups.append(judged)
        else:
            rejected.append(judged)
    groups.sort(key=lambda g: order[g.name])
    rejected.sort(key=lambda r: order.get(r[0], len(order)))
    return Discovery(groups, rejected)


def _trace_failure(model: nn.Module, example: torch.Tensor, e: Exception) -> str:
    """One line: the model's own forward failed, or Torch-Pruning failed on its graph (and where)."""
    error = f"{type(e).__name__}: {e}".splitlines()[0]
    inner = traceback.extract_tb(e.__traceback__)[-1]
    if "/torch_pruning/" in inner.filename:
        return (f"cannot discover channel groups of {type(model).__name__}: Torch-Pruning's DependencyGraph fails "
                f"in {inner.name} ({error}); LoFT, structured pruning and the filter distance need them, so use "
                "pretrain.method=dense or localsgd and prune.kind=magnitude for this model")
    return f"cannot trace {type(model).__name__} on an input of shape {tuple(example.shape)}: {error}"


class _Trace:
    """The forward Torch-Pruning traces, recording what its graph leaves out: each module call's
    input autograd nodes (to tell a module's own inner ops, e.g. the view + addmm + view of a
    Linear on 3-D input, from ops between modules) and the model's output nodes."""

    def __init__(self):
        self.inputs: dict[nn.Module, set] = {}
        self.outputs: set = set()
        self.calls: dict[nn.Module, int] = {}   # module → calls in one forward (> 1: weights shared)

    def forward(self, model: nn.Module, example: torch.Tensor):
        self.calls = {}

        def record(module, args, kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
            self.inputs.setdefault(module, set()).update(t.grad_fn for t in tensors if t.grad_fn is not None)
            self.calls[module] = self.calls.get(module, 0) + 1
        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
        try:
            out = model(example)
        finally:
            for h in hooks:
                h.remove()
        self.outputs = {t.grad_fn for t in tp.utils.flatten_as_list(out) if torch.is_tensor(t) and t.grad_fn}
        return out

    def internal_nodes(self, graph, names: dict) -> dict:
        """grad_fn of an op inside a module's forward → that module's name."""
        module_out = {node.grad_fn for m, node in graph.module2node.items() if m in names}
        owner = {}
        for module, node in graph.module2node.items():
            if module not in names or module not in self.inputs:
                continue
            stop = self.inputs[module] | (module_out - {node.grad_fn})
            todo = [f for f, _ in node.grad_fn.next_functions if f is not None]
            while todo:
                f = todo.pop()
                if f in stop or f in owner or type(f).__name__ == "AccumulateGrad":
                    continue
                owner[f] = names[module]
                todo.extend(g for g, _ in f.next_functions if g is not None)
        return owner


def _refuse_data_dependent_control_flow(model: nn.Module, example: torch.Tensor) -> None:
    """Torch-Pruning records the one path the example input takes; a branch on tensor values could
    take another path on another input, so such a model is refused in one line naming the branch.

    torch.fx's symbolic trace is the quick test; it also stops at things that are fine here (a test
    on a shape, iterating over sizes), so a model it cannot trace is traced again with fake tensors
    (static shapes, unknown values), which stops only where a value decides the path."""
    try:
        torch.fx.symbolic_trace(model)
        return
    except Exception:
        pass
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    try:
        make_fx(lambda s, x: torch.func.functional_call(model, s, (x,)), tracing_mode="fake")(state, example)
    except (GuardOnDataDependentSymNode, DataDependentOutputException) as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/torch/" not in f.filename and f.filename != __file__]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        raise UserError(f"cannot trace {type(model).__name__}: its forward branches on tensor values{where}; "
                        "channel groups need one graph for every input (use torch.where or a shape test)") from None
    except Exception:   # anything else fake tensors cannot run: the eager trace decides
        return


# ---------------------------------------------------------------- judging one TP group
# Autograd node names (without "Backward<N>") of ops that act on each channel by itself.
PER_CHANNEL_OPS = {"Relu", "Hardtanh", "Hardswish", "Hardsigmoid", "Sigmoid", "Silu", "Gelu", "Tanh",
                   "LeakyRelu", "Elu", "Celu", "Selu", "Softplus", "Mish", "Threshold", "Clamp", "ClampMin",
                   "ClampMax", "Neg", "Abs", "Exp", "Clone", "Alias", "ToCopy"}
SPATIAL_POOLS = {"MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool1D", "AvgPool2D",
                 "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AdaptiveMaxPool1D",
                 "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "UpsampleNearest2D", "UpsampleBilinear2D"}
REDUCTIONS = {"Mean", "Sum"}
RESHAPES = {"View", "Reshape", "UnsafeView", "ReshapeAlias", "Squeeze", "Unsqueeze"}
PRODUCTS = {"Mul", "Div"}
OP_REASONS = {"Add": "add", "Sub": "add", "Cat": "concat", "Stack": "concat", "Split": "split",
              "SplitWithSizes": "split", "Unbind": "split", "Select": "slice", "Slice": "slice",
              "Index": "slice", "Permute": "layout change", "Transpose": "layout change",
              "ScaledDotProductFlashAttentionForCpu": "attention", "ScaledDotProductAttention": "attention",
              "ScaledDotProductEfficientAttention": "attention", "ScaledDotProductFlashAttention": "attention"}
NORMS_OVER_CHANNELS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
REASON_ORDER = ["add", "concat", "split", "slice", "reshape into heads", "reshape", "layout change", "attention",
                "norm over channels", "grouped conv", "shared module", "model input", "model output",
                "custom autograd function", "unknown op"]


def _op_name(grad_fn) -> str:
    return re.sub(r"Backward\d*$", "", type(grad_fn).__name__)


def _judge(tp_group, graph, names: dict, internal: dict, trace: _Trace):
    """A ChannelGroup, or (place, reasons) saying what in the Torch-Pruning group is not per-channel."""
    producers, consumers, members, reasons = [], [], [], []
    conv_groups = {}   # grouped producer or consumer → its g
    root = tp_group[0].dep.target.module
    width = graph.get_out_channels(root)
    nodes = {}   # node → role, the group's nodes outside modules' inner ops
    for dep, _ in tp_group:
        node = dep.target
        if node.grad_fn in internal:
            continue
        into = dep.handler.__name__ == "prune_in_channels"
        nodes[node] = "in" if into else nodes.get(node, "out")
    # Convs hold channels at dim 1 (N, C, ...); a group of Linears only, at the last dim (tokens).
    channels_first = any(isinstance(n.module, CONV_TYPES) for n in nodes)
    for node, role in nodes.items():
        module = node.module
        name = names.get(module)
        if trace.calls.get(module, 0) > 1:   # the graph holds one node for all its calls: producers would be missed
            reasons.append(("shared module", f"{name}: called {trace.calls[module]} times per forward"))
        if role == "out" and (node.grad_fn in trace.outputs or node.type == tp_ops.OPTYPE.OUTPUT):
            reasons.append(("model output", name))
        if isinstance(module, ROOT_TYPES) and name is not None:
            kind = _layer_role(module, role, width)
            if kind == "producer":
                producers.append(name)
            elif kind == "consumer":
                consumers.append(name)
            elif kind == "member":
                members.append(name)
            else:
                reasons.append((kind, f"{name}, groups={module.groups}" if kind == "grouped conv" else name))
            if kind in ("producer", "consumer") and isinstance(module, CONV_TYPES) and module.groups > 1:
                conv_groups[name] = module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and _output_shape(node.grad_fn)[1] == width:
            members.append(name)
        elif isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                members.append(name)
        elif isinstance(module, NORMS_OVER_CHANNELS):
            reasons.append(("norm over channels", f"{type(module).__name__} {name}"))
        elif isinstance(module, nn.MultiheadAttention):
            reasons.append(("attention", name))
        elif isinstance(module, nn.Parameter):
            reasons.append(("unknown op", f"parameter {graph._param_to_name.get(module, '')} outside a layer"))
        elif name is not None:
            reasons.append(("unknown op", f"{type(module).__name__} {name}"))
        elif node.type != tp_ops.OPTYPE.OUTPUT:
            reason = _op_reason(node.grad_fn, width, channels_first)
            if reason:
                reasons.append(reason)
    if not producers and not reasons:
        reasons.append(("model input", "the channels come from the input, not from a Conv or Linear"))
    if not consumers and not reasons:
        reasons.append(("unknown op", "no Conv or Linear reads the channels"))
    segments = math.lcm(*conv_groups.values()) if conv_groups else 1
    if not reasons:
        consumers_repeat, mismatches = _consumer_repeats(consumers, names, width, nodes)
        reasons += mismatches
        if conv_groups and width // segments < 2:   # each conv group keeps a channel: none could go
            alone = [(c, g) for c, g in conv_groups.items() if width // g < 2] or list(conv_groups.items())
            reasons.append(("grouped conv", ", ".join(f"{c}, groups={g}" for c, g in alone)
                            + f": {width // segments} channel per conv group"))
    if reasons:
        return _place(producers or [names.get(root, "?")], names), _join(reasons)
    producer_dims = tuple((p, 0) for p in _in_module_order(producers, names))
    consumer_dims = tuple((c, 1, consumers_repeat[c]) for c in _in_module_order(consumers, names))
    grouped = tuple((c, conv_groups[c]) for c, _, _ in consumer_dims if c in conv_groups)
    return ChannelGroup(_place(producers, names), width, producer_dims, consumer_dims,
                        tuple(_in_module_order(members, names)), segments, grouped)


def _layer_role(module: nn.Module, role: str, width: int) -> str:
    """What a Conv/Linear is to the group: producer, consumer, member (depthwise) or a reason. A
    grouped conv (1 < g, not depthwise) produces or reads the group per conv group (`segments`)."""
    fan_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    if role == "out" and fan_out != width:   # Torch-Pruning coupled it through an op that changes widths
        return "unknown op"      # (the layer's name is the detail)
    if isinstance(module, nn.Linear) or module.groups == 1:
        return "consumer" if role == "in" else "producer"
    if module.groups == module.in_channels == module.out_channels == width:
        return "member"
    if module.groups == module.out_channels:   # Torch-Pruning couples its inputs with its outputs (depthwise)
        return "grouped conv"
    return "consumer" if role == "in" else "producer"


def _consumer_repeats(consumers, names, width, nodes) -> tuple[dict[str, int], list]:
    """Each consumer's repeat (input columns per channel), and a reason per impossible fan-in."""
    modules = {n: m for m, n in names.items()}
    flatten = any(_op_name(n.grad_fn) in RESHAPES for n in nodes if names.get(n.module) is None)
    repeats, mismatches = {}, []
    for c in consumers:
        m = modules[c]
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if fan_in % width or (fan_in != width and not flatten):
            mismatches.append(("unknown op", f"{c} reads {fan_in} inputs from {width} channels"))
        repeats[c] = max(1, fan_in // width)
    return repeats, mismatches


def _op_reason(grad_fn, width: int, channels_first: bool):
    """None if an op outside modules acts on each channel by itself, else (reason, detail)."""
    if isinstance(grad_fn, torch.autograd.function.BackwardCFunction):
        return ("custom autograd function", re.sub(r"Backward$", "", type(grad_fn).__name__))
    name = _op_name(grad_fn)
    if name in PER_CHANNEL_OPS or (name in SPATIAL_POOLS and channels_first):
        return None
    if name in REDUCTIONS:
        shape = list(_input_shape(grad_fn) or [])
        if hasattr(grad_fn, "_saved_dim"):   # else a reduction of everything (x.mean())
            dims = [d - 2 ** 64 if d >= 2 ** 63 else d for d in grad_fn._saved_dim]   # -1 is saved unsigned
            axis = _channel_axis(shape, width, channels_first)
            if axis is not None and axis not in [d % len(shape) for d in dims]:
                return None
        return ("unknown op", f"{name} over the channels")
    if name in RESHAPES:
        return _reshape_reason(grad_fn, width, channels_first)
    if name in PRODUCTS:
        return _product_reason(grad_fn, width, channels_first)
    if name in OP_REASONS:
        return (OP_REASONS[name], None)
    return ("unknown op", type(grad_fn).__name__)


def _input_shape(grad_fn):
    """Shape of the op's (first) input, from what autograd saved or the producing node's metadata."""
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        if hasattr(grad_fn, attr):
            return list(getattr(grad_fn, attr))
    saved = getattr(grad_fn, "_saved_self", None)
    if torch.is_tensor(saved):
        return list(saved.shape)
    f, i = grad_fn.next_functions[0]
    return list(f._input_metadata[i].shape) if f is not None and hasattr(f, "_input_metadata") else None


def _output_shape(grad_fn):
    return list(grad_fn._input_metadata[0].shape)


def _channel_axis(shape, width: int, channels_first: bool):
    """Where a traced tensor holds the group's channels: dim 1 for conv maps (N, C, ...), the last
    dim for a Linear's tokens (N, ..., C); None if that dim does not have the group's width."""
    if len(shape) < 2:
        return None
    axis = 1 if channels_first else len(shape) - 1
    return axis if shape[axis] == width else None


def _reshape_reason(grad_fn, width: int, channels_first: bool):
    """A flatten of conv maps (each channel becomes `repeat` consecutive columns) or a reshape that
    only adds or drops unit dims is per-channel; a split of the channel dim is a reshape into heads."""
    before, after = _input_shape(grad_fn), _output_shape(grad_fn)
    if before is None:
        return ("reshape", None)
    if [s for s in before if s != 1] == [s for s in after if s != 1]:
        return None
    if channels_first and len(before) >= 3 and before[1] == width and after == [before[0], math.prod(before[1:])]:
        return None
    if before[-1] == width and after[:-2] == before[:-1] and after[-2] * after[-1] == width:
        return ("reshape into heads", f"{width} → {after[-2]} x {after[-1]}")
    return ("reshape", f"{before} → {after}")


def _product_reason(grad_fn, width: int, channels_first: bool):
    """A product of two tensors of the group (an SE gate) or by a single number is per-channel; by a
    constant tensor (which narrowing could not slice) or broadcast across the channels it is not."""
    graph_inputs = [(f, i) for f, i in grad_fn.next_functions if f is not None]
    if len(graph_inputs) < len(grad_fn.next_functions):     # one side is a constant
        consts = [getattr(grad_fn, a, None) for a in ("_saved_other", "_saved_self")]
        if all(c is None or not torch.is_tensor(c) or c.numel() == 1 for c in consts):
            return None
        return ("unknown op", "product with a constant tensor")
    shapes = [list(f._input_metadata[i].shape) for f, i in graph_inputs]
    out = _output_shape(grad_fn)
    axis = _channel_axis(out, width, channels_first)
    if axis is not None:
        from_end = len(out) - axis   # broadcasting aligns shapes at their last dim
        if all(len(s) >= from_end and s[-from_end] == width for s in shapes):
            return None
    return ("unknown op", f"product broadcast across the channels {shapes}")


def _join(reasons: list[tuple[str, str | None]]) -> str:
    """'add; norm over channels (LayerNorm ln_1, LayerNorm ln_2, +3 more)': one entry per kind."""
    details: dict[str, list[str]] = {}
    for kind, detail in reasons:
        details.setdefault(kind, [])
        if detail and detail not in details[kind]:
            details[kind].append(detail)
    parts = []
    for kind in sorted(details, key=lambda k: REASON_ORDER.index(k) if k in REASON_ORDER else len(REASON_ORDER)):
        d = details[kind]
        more = f", +{len(d) - 2} more" if len(d) > 2 else ""
        parts.append(f"{kind} ({', '.join(d[:2])}{more})" if d else kind)
    return "; ".join(parts)


def _in_module_order(module_names, names: dict) -> list[str]:
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(set(module_names), key=order.__getitem__)


def _place(producers, names: dict) -> str:
    """A group's name: its first producer in module order (stable across runs and widths)."""
    return _in_module_order(producers, names)[0]


def reason_kinds(reason: str) -> list[str]:
    """The kinds in a rejected place's reason string, e.g. ['add', 'model output']."""
    return [part.split(" (")[0] for part in reason.split("; ")]


# ------------------------------------------------------------------- discovery, once per structure
_DISCOVERED: dict = {}   # structure key → Discovery
TRACES = [0]             # how many times `discovered` traced a model (the rest came from the cache)


def discovered(model: nn.Module, input_shape=(3, 32, 32)) -> Discovery:
    """`discover(model)`, traced once per model structure (module types, tensor names and shapes) and
    input shape. The example input comes from a private generator: the global RNG is left alone."""
    key = (tuple((n, type(m)) for n, m in model.named_modules()),
           tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()), tuple(input_shape))
    if key not in _DISCOVERED:
        TRACES[0] += 1
        example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        _DISCOVERED[key] = discover(model, input_shape, example.to(next(model.parameters())))  # its device, dtype
    return _DISCOVERED[key]
