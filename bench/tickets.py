"""What a 50 % L1 ticket does to the models researchers bring: the table in docs/discovery.md.

    python bench/tickets.py                      # every model below, 32x32 input
    python bench/tickets.py --models tv_resnext50_32x4d timm_regnety_004

For each model (torchvision, timm, hand-written), built as `model.arch` would name it, with the
`all` preset (every channel group found): the groups found and how many narrowing leaves out, the
share of parameters a 50 % L1 ticket removes (03's `prune_filters`), and narrowed = masked: the
largest |difference| of the ticket's outputs and the full model's with the pruned channels masked
(float64, eval mode, BN statistics randomised so that slicing them matters).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

from lib import REPO, machine
from common.groups import discover
from common.models import build_model
from common.narrowing import masked, narrowing_problem
from common.prune import prune_filters
from common.selection import prunable_blocks

sys.path.insert(0, str(REPO / "tests"))   # byom_model: the hand-written models of the tests

ALL = {"preset": "all", "include": [], "exclude": []}
MODELS = {   # name in the table → (model.arch, model.kwargs)
    "tv_resnet50": ("torchvision.resnet50", {}),
    "tv_resnext50_32x4d": ("torchvision.resnext50_32x4d", {}),
    "tv_regnet_y_400mf": ("torchvision.regnet_y_400mf", {}),
    "tv_mobilenet_v3_large": ("torchvision.mobilenet_v3_large", {}),
    "tv_efficientnet_b0": ("torchvision.efficientnet_b0", {}),
    "tv_vgg11_bn": ("torchvision.vgg11_bn", {}),
    "tv_convnext_tiny": ("torchvision.convnext_tiny", {}),
    "tv_vit_32px": ("torchvision.VisionTransformer", {"image_size": 32, "patch_size": 4, "num_layers": 2,
                                                      "num_heads": 2, "hidden_dim": 64, "mlp_dim": 256}),
    "timm_efficientnet_b0": ("timm.efficientnet_b0", {}),
    "timm_mobilenetv3_large_100": ("timm.mobilenetv3_large_100", {}),
    "timm_regnety_004": ("timm.regnety_004", {}),
    "timm_resnext26ts": ("timm.resnext26ts", {}),
    "own_small_cnn": ("byom_model:small_cnn", {}),
    "own_bn_subclass_cnn": ("byom_model:bn_subclass_cnn", {}),
}


def randomised_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def row(name: str) -> dict:
    arch_name, kwargs = MODELS[name]
    arch = {"name": arch_name, "num_classes": 10, "width": 1.0, "kwargs": kwargs, "input_shape": [3, 32, 32],
            "groups": ALL}
    torch.manual_seed(0)
    start = time.perf_counter()
    model = randomised_bn(build_model(arch, frozenset({arch_name})).double())
    found = discover(model, example=torch.randn(2, 3, 32, 32, dtype=torch.float64))
    left_out = sum(narrowing_problem(model, g) is not None for g in found.groups)
    chosen = prunable_blocks(model, arch)
    pruned = prune_filters(model, arch, 0.5)
    total = sum(p.numel() for p in model.parameters())
    removed = 1 - sum(p.numel() for p in pruned.model.parameters()) / total
    keep = {b.group.name: pruned.kept[b.name] for b in chosen}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = float((pruned.model(x) - masked(model, [b.group for b in chosen], keep)(x)).abs().max())
    return {"model": name, "arch": arch_name, "params": total, "groups": len(found.groups), "left_out": left_out,
            "removed": removed, "diff": diff, "seconds": time.perf_counter() - start}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"<!-- bench/tickets.py on {machine()} -->")
    print("| model (`model.arch`) | parameters | groups found | left out (cannot narrow) | removed by a 50 % L1 ticket "
          "| max \\|narrowed − masked\\| (float64) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = row(name)
        print(f"| `{r['arch']}` | {r['params'] / 1e6:.2f} M | {r['groups']} | {r['left_out']} | "
              f"{100 * r['removed']:.1f} % | {r['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
