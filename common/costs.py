"""Analytic costs: parameters, FLOPs (torch.utils.flop_counter) and communication (SPEC 3)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from common.models import BlockRef

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


def split_params(model: nn.Module, blocks: list[BlockRef]) -> tuple[int, int]:
    """(shared, partitioned) parameter counts for a list of partitioned blocks."""
    state = dict(model.named_parameters())
    part = sum(state[k].numel() for b in blocks for k in b.slice_dims(state))
    total = sum(p.numel() for p in model.parameters())
    return total - part, part


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
                   batch: int, local_iters: int, input_shape=(3, 32, 32)) -> dict:
    """The paper's parameter-server counts (fp32) for LoFT, Local SGD and GPipe."""
    shared, part = split_params(model, blocks)
    full = shared + part
    rounds = rounds_total(epochs, n_train, batch, local_iters)
    gpipe_fwd = epochs * n_train * sum(cut_activation_numels(model, workers, input_shape)) * FP32
    return {
        "rounds": rounds,
        "loft": rounds * 2 * (workers * shared + part) * FP32 if blocks else None,  # None: not partitionable
        "localsgd": rounds * 2 * workers * full * FP32,
        "gpipe_fwd": gpipe_fwd,            # the paper's convention: forward activations once
        "gpipe_fwd_bwd": 2 * gpipe_fwd,    # real traffic: activations forward + gradients back
    }
