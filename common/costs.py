"""Analytic costs: parameters, FLOPs (torch.utils.flop_counter) and communication (SPEC 3)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from common.loft import draw_partition, worker_arch
from common.models import build_model
from common.narrowing import SlicePlan
from common.selection import BlockRef

FP32 = 4


def flops_per_sample(model: nn.Module, input_shape=(3, 32, 32), backward: bool = False) -> int:
    """Forward (or forward+backward) FLOPs of one sample, as FlopCounterMode counts them.
    Counted on a batch of 2 and halved (FLOPs are linear in the batch): train-mode BN refuses a
    single value per channel, which a batch of 1 gives at a 1x1 feature map."""
    model = model.eval() if not backward else model.train()
    x = torch.zeros(2, *input_shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops()) // 2


def layer_flops(model: nn.Module, input_shape=(3, 32, 32)) -> dict[str, int]:
    """Forward FLOPs of one sample per module (FlopCounterMode's names, root prefix removed)."""
    root = type(model).__name__
    x = torch.zeros(1, *input_shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name.startswith(root + "."):
            out[name[len(root) + 1:]] = int(sum(ops.values()))
    return out


@torch.no_grad()
def output_positions(model: nn.Module, input_shape=(3, 32, 32)) -> dict[str, int]:
    """Weight name → output positions of its conv/linear per sample (H_out x W_out; 1 for a linear
    layer), from forward hooks, so modules outside the registered tree are found too."""
    positions, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inputs, out, key=f"{name}.weight"):
                positions[key] = out.numel() // mod.weight.shape[0]  # one sample: outputs per output channel
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.MultiheadAttention):  # calls its out_proj's weight without the module
            def hook(mod, inputs, out, key=f"{name}.out_proj.weight"):
                positions[key] = out[0].numel() // mod.embed_dim
            hooks.append(m.register_forward_hook(hook))
    model.eval()(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return positions


def train_flops_per_sample(model: nn.Module, input_shape=(3, 32, 32), mask: dict | None = None) -> int:
    """Forward + backward FLOPs of one training sample (the RISE paper's training complexity).

    Dense: what FlopCounterMode counts for a forward and a backward. With a mask (a ticket whose
    losers are held at 0 or locked), only the winners need a weight gradient: the gradient of one
    conv/linear weight costs 2 FLOPs (a multiply-add) per output position of its layer, so each
    non-winner saves 2 x H_out x W_out. The forward and the input gradients stay dense: every
    layer's input gradient is needed by the winners below it, and RISE's locked weights are non-zero."""
    dense = flops_per_sample(model, input_shape, backward=True)
    if not mask:
        return dense
    positions = output_positions(model, input_shape)
    return dense - sum(2 * positions[name] * int((~m).sum()) for name, m in mask.items())


def split_params(model: nn.Module, blocks: list[BlockRef]) -> tuple[int, int]:
    """(shared, partitioned) parameter counts for a list of partitioned blocks."""
    state = dict(model.named_parameters())
    part = sum(state[k].numel() for k in {k for b in blocks for k in b.group.entries(state)})
    total = sum(p.numel() for p in model.parameters())
    return total - part, part


def partitioned_sent(model: nn.Module, blocks: list[BlockRef], workers: int) -> int:
    """Partitioned parameters the S workers hand back in one round, together: each worker its
    slices. All of them when every tensor lies on one partitioned group; less where a tensor lies
    on two (pretrain.overlap=block_diagonal): the workers send its S diagonal blocks only."""
    state = dict(model.named_parameters())
    plan = SlicePlan.of(blocks, state)
    part = draw_partition(blocks, workers, 0, 0)   # sizes: the same every round, whatever the seed
    return sum(math.prod(plan.shape(state, k, {g: sets[w] for g, sets in part.items()}))
               for k in plan.entries for w in range(workers))


def pipeline_cuts(num_layers: int, stages: int) -> list[int]:
    """Indices of the layers after which GPipe cuts: floor(L/S) layers a stage, rest on the last."""
    per = num_layers // stages
    if per < 1:
        raise ValueError(f"{stages} pipeline stages for {num_layers} layers")
    return [(i + 1) * per - 1 for i in range(stages - 1)]


@torch.no_grad()
def cut_activation_numels(model: nn.Module, stages: int, input_shape=(3, 32, 32)) -> list[int]:
    """Elements of one sample's activation crossing each pipeline cut."""
    layers = model.layer_list()
    cuts = set(pipeline_cuts(len(layers), stages))
    x, sizes = torch.zeros(1, *input_shape), []
    model.eval()
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in cuts:
            sizes.append(x.numel())
    return sizes


def rounds_total(epochs: int, n_train: int, batch: int, local_iters: int) -> int:
    """LoFT / Local SGD rounds in a run: rounds flow over epoch boundaries (SPEC 3)."""
    return (epochs * (n_train // batch)) // local_iters


def epoch_end_round(epoch: int, steps_per_pass: int, local_iters: int) -> int:
    """Number of rounds completed when epoch `epoch` (1-based) ends."""
    return (epoch * steps_per_pass) // local_iters


def analytic_bytes(model: nn.Module, blocks: list[BlockRef], workers: int, epochs: int, n_train: int,
                   batch: int, local_iters: int, input_shape=(3, 32, 32), shard: bool = False) -> dict:
    """The paper's parameter-server counts (fp32) for LoFT, Local SGD and GPipe. With `shard`
    (pretrain.data=shard) a LoFT / Local SGD worker walks 1/S of each pass: rounds ÷ S."""
    shared, part = split_params(model, blocks)
    full, sent = shared + part, partitioned_sent(model, blocks, workers)
    rounds = rounds_total(epochs, n_train // workers if shard else n_train, batch, local_iters)
    # GPipe cuts the model's layer list (the zoo's); a model brought without one has no GPipe count
    gpipe_fwd = (epochs * n_train * sum(cut_activation_numels(model, workers, input_shape)) * FP32
                 if hasattr(model, "layer_list") else None)
    return {
        "rounds": rounds,
        "loft": rounds * 2 * (workers * shared + sent) * FP32 if blocks else None,  # None: not partitionable
        "localsgd": rounds * 2 * workers * full * FP32,
        "gpipe_fwd": gpipe_fwd,            # the paper's convention: forward activations once
        "gpipe_fwd_bwd": 2 * gpipe_fwd if gpipe_fwd is not None else None,  # real traffic: forward + gradients back
    }


def pretrain_train_flops(arch: dict, blocks: list[BlockRef], method: str, workers: int, epochs: int, n_train: int,
                         batch: int, local_iters: int, input_shape=(3, 32, 32), shard: bool = False,
                         importable: frozenset[str] = frozenset()) -> int:
    """Forward+backward FLOPs of a pretraining run, counted as its trainer counts them (steps taken
    x FLOPs of one step, common/pretrain.py). Dense and GPipe: N // B steps an epoch of the full
    model. LoFT and Local SGD: whole rounds of K steps, each step a batch through every worker's
    subnetwork (Local SGD: a full replica); N // B steps an epoch, (N // S) // B with `shard`."""
    if method in ("dense", "gpipe"):
        return epochs * (n_train // batch) * batch * flops_per_sample(build_model(arch, importable), input_shape, backward=True)
    steps = rounds_total(epochs, n_train // workers if shard else n_train, batch, local_iters) * local_iters
    part = draw_partition(blocks, workers, 0, 0) if method == "loft" else {}  # sizes: the same every round
    widths = [tuple(len(sets[w]) for sets in part.values()) for w in range(workers)]
    cost = {wd: flops_per_sample(build_model(worker_arch(arch, part, widths.index(wd)), importable), input_shape,
                                 backward=True)
            for wd in set(widths)}  # workers differ by at most one channel a block: count each width once
    return steps * batch * sum(cost[wd] for wd in widths)


def train_flops_ratio_to_dense(arch: dict, blocks: list[BlockRef], method: str, workers: int, epochs: int,
                               n_train: int, batch: int, local_iters: int, input_shape=(3, 32, 32),
                               shard: bool = False, importable: frozenset[str] = frozenset()) -> float:
    """A run's training FLOPs over those of dense for the same epochs, data and batch size. With
    `shard` (equal samples) LoFT-S spends about c_subnet / c_dense of dense, not 1: each sample
    goes through one narrow subnetwork instead of the full model."""
    run = pretrain_train_flops(arch, blocks, method, workers, epochs, n_train, batch, local_iters, input_shape, shard,
                               importable)
    dense = pretrain_train_flops(arch, [], "dense", workers, epochs, n_train, batch, local_iters, input_shape,
                                 importable=importable)
    return run / dense

