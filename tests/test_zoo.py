"""Model zoo (SPEC 1): every architecture builds, its layer list is its forward, LoFT and structured
pruning work on it unchanged (or it says it is not partitionable), magnitude masks and checkpoints
work, and parameter counts match the published ones."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from common.checkpoint import PretrainEpoch, load, save
from common.config import load_config
from common.data import load_cifar, normalize
from common.dist import Comm, DistEnv
from common.errors import UserError
from common.loft import draw_partition, worker_arch
from common.narrowing import SlicePlan
from reference_round import aggregate, extract
from common.models import ARCH_NAMES, PadShortcut, arch_of, build_model, count_params
from common.selection import block_refs, is_partitionable, partitioned_blocks, prunable_blocks
from common.prune import maskable_weights, prune_filters, prune_magnitude
from conftest import DATA, REPO, randomised

IMAGENET_STEM = {"resnet18_in", "resnet34_in", "preresnet18_in"}
NOT_PARTITIONABLE = {"mobilenetv3_small"}
# widths giving ~8 channels in the first stage (mobilenet: torchvision rounds to multiples of 8)
FIRST_STAGE = {"resnet20": 16, "resnet32": 16, "resnet56": 16, "wrn16_4": 64, "wrn16_8": 128, "wrn22_8": 128,
               "wrn28_10": 160, "wrn34_10": 160, "wrn40_4": 64}


def small_arch(name: str, num_classes: int = 10) -> dict:
    width = 0.5 if name == "mobilenetv3_small" else 8 / FIRST_STAGE.get(name, 64)
    return {"name": name, "num_classes": num_classes, "width": width}






@pytest.fixture(scope="module")
def cifar_images():
    return normalize(load_cifar(DATA, "cifar10", train=False, download=False).images[:4])


def inputs(name, images):
    """Real CIFAR-10 images; upsampled to 64x64 for the ImageNet-stem models."""
    return F.interpolate(images, size=64, mode="bilinear", align_corners=False) if name in IMAGENET_STEM else images


def masked_copy(model, keep: dict[str, torch.Tensor]):
    """The full model with every listed block's mid channels outside `keep` cut off (conv2 columns zeroed)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for b in block_refs(masked):
            if b.name in keep:
                drop = torch.ones(b.mid, dtype=torch.bool)
                drop[keep[b.name]] = False
                masked.get_submodule(b.name).conv2.weight[:, drop] = 0
    return masked.eval()


# ------------------------------------------------------------------ per model
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_builds_and_forward_is_the_layer_list(name, cifar_images):
    arch = small_arch(name)
    model = randomised(arch)
    x = inputs(name, cifar_images)
    fired = []
    layers = model.layer_list()
    for i, layer in enumerate(layers):  # GPipe's counter hooks the cut layers: they must run in forward
        layer.register_forward_hook(lambda *_, i=i: fired.append(i))
    with torch.no_grad():
        out = model(x)
        assert fired == list(range(len(layers)))
        seq = x
        for layer in model.layer_list():
            seq = layer(seq)
    assert out.shape == (4, 10)
    assert torch.equal(out, seq)
    assert isinstance(layers[0], nn.Conv2d) and layers[0].in_channels == 3   # [stem conv, stem norm, blocks, head]
    if is_partitionable(model):
        assert len(layers) - 3 == len([b for b in block_refs(model) if b.stage])  # one group a residual block
    if isinstance(model, (tvm.ResNet, tvm.MobileNetV3)):   # torchvision's own forward gives the same
        with torch.no_grad():
            assert torch.equal(type(model).__mro__[1].forward(model, x), out)
    twin = copy.deepcopy(model)                              # a copy's layer list is made of the copy's modules
    own = {id(p) for p in twin.parameters()}
    assert all(id(p) in own for layer in twin.layer_list() for p in layer.parameters())


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_loft_partition_aggregate_round_trip_and_subnetwork(name, cifar_images):
    arch = small_arch(name)
    model = randomised(arch)
    if name in NOT_PARTITIONABLE:
        assert not is_partitionable(model)
        assert block_refs(model)                             # groups found, none chosen by the paper preset
        for fn in (prunable_blocks, partitioned_blocks):
            with pytest.raises(UserError, match="is not partitionable"):
                fn(model)
        return
    assert is_partitionable(model)
    blocks = partitioned_blocks(model)
    assert blocks and all(b.stage > 1 and b.index > 0 for b in blocks)
    state = model.state_dict()
    plan = SlicePlan.of(blocks, state)
    assert all(len(b.group.entries(state)) == 6 for b in blocks)  # conv1, 4 mid-BN entries, conv2 (no biases)
    part = draw_partition(blocks, 2, 0, 3)
    results = {w: extract(state, plan, part, w) for w in range(2)}
    new = aggregate(state, plan, part, results, Comm(DistEnv()), 2)
    assert list(new) == list(state)
    assert all(torch.equal(new[k], v) for k, v in state.items())
    x = inputs(name, cifar_images[:2])
    sub = build_model(worker_arch(arch, part, 0))             # a real, narrower module
    sub.load_state_dict(results[0])
    assert count_params(sub) < count_params(model)
    with torch.no_grad():
        y_sub = sub.eval()(x)
        y_mask = masked_copy(model, {b.name: part[b.name][0] for b in blocks})(x)
    torch.testing.assert_close(y_sub, y_mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_structured_prune_is_the_masked_full_model(name, cifar_images):
    arch = small_arch(name)
    model = randomised(arch)
    if name in NOT_PARTITIONABLE:
        with pytest.raises(UserError, match="is not partitionable"):
            prune_filters(model, arch, 0.5)
        return
    pruned = prune_filters(model, arch, 0.5)
    assert set(pruned.kept) == {b.name for b in prunable_blocks(model)}
    x = inputs(name, cifar_images)
    with torch.no_grad():
        out_pruned, out_masked, out_full = pruned.model(x), masked_copy(model, pruned.kept)(x), model(x)
    assert (out_pruned - out_masked).abs().max().item() <= 1e-5
    assert (out_full - out_masked).abs().max().item() > 1e-4   # the mask does change the function
    assert count_params(pruned.model) < count_params(model)
    assert list(pruned.model.state_dict()) == list(model.state_dict())  # same parameter names


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_magnitude_mask(name, cifar_images):
    arch = small_arch(name)
    model = randomised(arch)
    pruned = prune_magnitude(model, arch, 0.8, "global")
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(pruned.mask) == set(maskable_weights(model)) == convs
    total = sum(m.numel() for m in pruned.mask.values())
    kept = sum(int(m.sum()) for m in pruned.mask.values())
    assert kept == int(0.2 * total + 0.5)
    state = pruned.model.state_dict()
    assert all((state[k][~m] == 0).all() and (state[k][m] != 0).all() for k, m in pruned.mask.items())
    with torch.no_grad():
        assert pruned.model(inputs(name, cifar_images)).shape == (4, 10)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_checkpoint_round_trip(name, tmp_path, cifar_images):
    arch = small_arch(name, num_classes=100)
    model = randomised(arch)
    if is_partitionable(model):                              # a narrowed ticket rebuilds from its arch alone
        pruned = prune_filters(model, arch, 0.3)
        model, arch = pruned.model, pruned.arch
    save(PretrainEpoch(model=model.state_dict(), arch=arch, epoch=3), tmp_path / "ck.pt")
    ck = load(tmp_path / "ck.pt", PretrainEpoch)
    rebuilt = build_model(ck.arch)
    rebuilt.load_state_dict(ck.model)
    x = inputs(name, cifar_images)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


# ------------------------------------------------------------ published facts
def params_of(name, num_classes=10, width=1.0):
    with torch.device("meta"):
        return count_params(build_model({"name": name, "num_classes": num_classes, "width": width}))


def test_parameter_counts_match_the_published_ones():
    # small CIFAR ResNets (He et al. 2015, option-A shortcuts): 0.27 M / 0.46 M / 0.85 M
    for name, published, exact in (("resnet20", 0.27e6, 269_722), ("resnet32", 0.46e6, 464_154),
                                   ("resnet56", 0.85e6, 853_018)):
        assert params_of(name) == exact and abs(exact / published - 1) < 0.02, name
    assert params_of("resnet18") == 11_173_962                   # CIFAR ResNet-18, 11.17 M
    assert params_of("preresnet18") == 11_172_170
    assert params_of("resnet18_in", 1000) == 11_689_512          # torchvision's own figures
    assert params_of("resnet34_in", 1000) == 21_797_672
    assert params_of("mobilenetv3_small", 1000) == 2_542_856
    assert abs(params_of("wrn28_10") / 36.5e6 - 1) < 0.01        # Zagoruyko & Komodakis 2016, Table
    assert abs(params_of("wrn16_4") / 2.7e6 - 1) < 0.02
    assert abs(params_of("wrn16_8") / 11.0e6 - 1) < 0.01
    assert abs(params_of("wrn40_4") / 8.9e6 - 1) < 0.01
    # the pre-activation ImageNet ResNet-18 differs from torchvision's only by its BN placement
    assert abs(params_of("preresnet18_in", 1000) / 11.69e6 - 1) < 0.002


@pytest.mark.parametrize("name, make", [("resnet18_in", tvm.resnet18), ("mobilenetv3_small", tvm.mobilenet_v3_small)])
def test_torchvision_models_are_torchvisions_bit_for_bit(name, make):
    torch.manual_seed(5)
    ours = build_model({"name": name, "num_classes": 10, "width": 1.0}).state_dict()
    torch.manual_seed(5)
    theirs = make(num_classes=10).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_torchvision_resnet_width_keeps_torchvisions_names():
    with torch.device("meta"):
        half = build_model({"name": "resnet34_in", "num_classes": 10, "width": 0.5}).state_dict()
        full = tvm.resnet34(num_classes=10).state_dict()
    assert list(half) == list(full)
    assert half["layer3.2.conv1.weight"].shape == (128, 128, 3, 3) and half["fc.weight"].shape == (10, 256)
    assert [b.group.members for b in prunable_blocks(build_model({"name": "resnet18_in", "num_classes": 10,
                                                                  "width": 0.125}))] == \
        [(f"layer{s}.1.bn1",) for s in range(1, 5)]


def test_option_a_shortcut_and_wrn_structure():
    model = build_model({"name": "resnet20", "num_classes": 10, "width": 1.0})
    sc = model.layer2[0].shortcut
    assert isinstance(sc, PadShortcut) and not list(sc.parameters())
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    y = sc(x)
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()
    wrn = build_model({"name": "wrn28_10", "num_classes": 100, "width": 1.0})
    assert [len(s) for s in (wrn.layer1, wrn.layer2, wrn.layer3)] == [4, 4, 4] and not hasattr(wrn, "layer4")
    assert wrn.conv1.out_channels == 16 and [wrn.layer3[1].conv1.out_channels, wrn.head.fc.in_features] == [640, 640]
    assert [b.group.members for b in partitioned_blocks(wrn)] == \
        [(f"layer{s}.{j}.bn2",) for s in (2, 3) for j in (1, 2, 3)]
    drop = build_model({"name": "wrn16_4", "num_classes": 10, "width": 0.125, "dropout": 0.3}).train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(drop(x), drop(x)) and torch.equal(drop.eval()(x), drop(x))
    with pytest.raises(UserError, match="6n\\+4"):
        build_model({"name": "wrn27_10", "num_classes": 10, "width": 1.0})
    with pytest.raises(UserError, match="unknown architecture"):
        build_model({"name": "vgg16", "num_classes": 10, "width": 1.0})


# --------------------------------------------------------------------- configs
def test_config_offers_exactly_the_zoo():
    from common.config import ZOO
    assert ZOO == ARCH_NAMES


CONFIGS = sorted((REPO / "yaml").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_its_model_builds(path):
    cfg = load_config(path)
    arch = arch_of(cfg.model, cfg.data)
    with torch.device("meta"):
        model = build_model(arch)
    if cfg.pretrain.method == "loft":
        assert partitioned_blocks(model, cfg.pretrain.partition_stage1, arch, cfg.pretrain.overlap)
    if not is_partitionable(model, arch):
        assert cfg.pretrain.method != "loft" and cfg.prune.kind == "magnitude"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_dry_run_of_every_config(path, capsys):
    """01 --dry-run (a zoo model at width 1/8 to stay fast; the full widths are the same code)."""
    from conftest import stage
    brought = "arch: torchvision." in path.read_text() or "arch: timm." in path.read_text()
    narrow = [] if brought else ["--set", "model.width=0.125"]
    stage("01_pretrain_loft").main(["--config", str(path), "--dry-run", *narrow])
    assert '"params_total"' in capsys.readouterr().out


def test_imagenet_dry_run_counts_224_pixel_inputs(capsys):
    """ResNet-18 on ImageNet: 1.82 G multiply-adds per image = 3.64 GFLOPs in FlopCounterMode's count."""
    import json
    from conftest import stage
    stage("01_pretrain_loft").main(["--config", "yaml/resnet18_in.yaml", "--dry-run"])
    rep = json.loads(capsys.readouterr().out)
    assert abs(rep["flops_per_sample_dense"] - 3.64e9) / 3.64e9 < 0.01
    assert rep["params_total"] == 11_689_512
