"""Channel-group discovery (common/groups.py): how long it takes and what it finds.

    python bench/discovery.py                  # torchvision resnet50 timed, then every model's counts
    python bench/discovery.py --repeats 5 --table resnet50

Times `discover` on torchvision resnet50 (32x32 input, the median of --repeats runs), split into
Torch-Pruning's own graph (`build_dependency` + `get_all_groups`) and the whole discovery (that
plus the control-flow check and the judging of every node), then prints, for the zoo and the
torchvision models of tests/test_groups.py, the groups found, the rejected places and their
reasons. Timings are only meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch_pruning as tp
import torchvision.models as tvm

from lib import machine
from common.groups import ROOT_TYPES, discover, reason_kinds
from common.selection import describe
from common.models import ARCH_NAMES, build_model

TORCHVISION = {
    "resnet50": lambda: tvm.resnet50(num_classes=10),
    "vgg11_bn": lambda: tvm.vgg11_bn(num_classes=10),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(num_classes=10),
    "convnext_tiny": lambda: tvm.convnext_tiny(num_classes=10),
    "vit_32px": lambda: tvm.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                              hidden_dim=16, mlp_dim=32, num_classes=10),
}


def zoo(name: str):
    """The zoo at ~8 channels in the first stage, as the tests build it."""
    first = {"resnet20": 16, "resnet32": 16, "resnet56": 16, "wrn16_4": 64, "wrn16_8": 128, "wrn22_8": 128,
             "wrn28_10": 160, "wrn34_10": 160, "wrn40_4": 64}
    width = 0.5 if name == "mobilenetv3_small" else 8 / first.get(name, 64)
    return build_model({"name": name, "num_classes": 10, "width": width})


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_pruning_only(model, example):
    graph = tp.DependencyGraph().build_dependency(model, example, verbose=False)
    return list(graph.get_all_groups(root_module_types=ROOT_TYPES))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs on resnet50 (median reported)")
    ap.add_argument("--table", choices=[*TORCHVISION, *ARCH_NAMES], help="also print this model's dry-run table")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# discovery on {machine()}, {args.threads} thread(s)")

    model = TORCHVISION["resnet50"]().eval()
    example = torch.randn(2, 3, 32, 32)
    discover(model)   # warm-up: first calls import and compile lazily
    tp_s = seconds(lambda: torch_pruning_only(model, example), args.repeats)
    all_s = seconds(lambda: discover(model, example=example), args.repeats)
    print(f"torchvision resnet50, 32x32: Torch-Pruning graph + groups {tp_s:.2f} s, discover {all_s:.2f} s "
          f"(median of {args.repeats})\n")

    print(f"{'model':<22} {'groups':>6} {'rejected':>8}  {'seconds':>7}  reasons (places per kind)")
    for name, make in [*((n, lambda n=n: zoo(n)) for n in ARCH_NAMES), *TORCHVISION.items()]:
        torch.manual_seed(0)
        m = make().eval()
        start = time.perf_counter()
        found = discover(m)
        took = time.perf_counter() - start
        kinds = collections.Counter(k for _, reason in found.rejected for k in reason_kinds(reason))
        print(f"{name:<22} {len(found.groups):>6} {len(found.rejected):>8}  {took:>7.2f}  "
              + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    if args.table:
        torch.manual_seed(0)
        print(f"\n{args.table}:\n" + describe((TORCHVISION.get(args.table) or (lambda: zoo(args.table)))().eval()))


if __name__ == "__main__":
    main()
