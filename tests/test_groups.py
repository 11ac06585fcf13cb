"""Channel groups discovered from the traced graph (common/groups.py, SPEC section 8).

Narrowing is checked against an independent reference: the full model whose consumers see the
removed channels as zeros. The zoo's groups are checked against its blocks as written by hand
here (conv1 → mid BN → conv2 in every block of layer1..layerN: what common/models.py named
before it used discovery), and the `paper` preset against today's prunable / partitioned sets. Group counts of the torchvision models are derived from their architecture in
the comments, not copied from a run."""
import collections
import functools

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from common.errors import UserError
from common.groups import discover, reason_kinds
from common.narrowing import masked, narrow
from common.selection import block_refs, paper_preset, partitioned_blocks, prunable_blocks
from common.models import ARCH_NAMES, PreActBlock, build_model

FIRST_STAGE = {"resnet20": 16, "resnet32": 16, "resnet56": 16, "wrn16_4": 64, "wrn16_8": 128, "wrn22_8": 128,
               "wrn28_10": 160, "wrn34_10": 160, "wrn40_4": 64}
ZOO = [a for a in ARCH_NAMES if a != "mobilenetv3_small"]   # the zoo's residual nets


def zoo_arch(name: str) -> dict:
    """~8 channels in the first stage (mobilenet: torchvision rounds widths to multiples of 8)."""
    return {"name": name, "num_classes": 10, "width": 0.5 if name == "mobilenetv3_small" else 8 / FIRST_STAGE.get(name, 64)}


TORCHVISION = {
    "tv_resnet50": lambda: tvm.resnet50(num_classes=10),
    "tv_vgg11_bn": lambda: tvm.vgg11_bn(num_classes=10),
    "tv_mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=10),
    "tv_mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=10),
    "tv_efficientnet_b0": lambda: tvm.efficientnet_b0(num_classes=10),
    "tv_convnext_tiny": lambda: tvm.convnext_tiny(num_classes=10),
    "tv_vit": lambda: tvm.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                            hidden_dim=16, mlp_dim=32, num_classes=10),
}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (so slicing them matters), no all-zero tensor (the
    ViT's head starts at zero) and unit layer scales (ConvNeXt's start at 1e-6, which would hide
    its MLPs from the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
    return model.eval()


@functools.lru_cache(maxsize=None)
def built(key: str):
    """(model, discovery) for a zoo arch name or a TORCHVISION key, built once per test session."""
    torch.manual_seed(0)
    model = TORCHVISION[key]() if key in TORCHVISION else build_model(zoo_arch(key))
    model = randomised(model)
    return model, discover(model)


def random_halves(groups, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randperm(g.width, generator=gen)[:max(1, g.width // 2)] for g in groups}


def assert_close_1e5(a: torch.Tensor, b: torch.Tensor):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= 1e-5 * scale


# ------------------------------------------------------------------ narrowed == masked
@pytest.mark.parametrize("key", [*ARCH_NAMES, *TORCHVISION])
def test_narrowed_equals_masked_for_every_group(key):
    """Every discovered group cut to a seeded random half at once: the physically smaller model's
    eval output equals the full model with those channels zeroed at their consumers (1e-5), the
    masking changes the output (so the check is not vacuous), the model has fewer parameters, and
    its state is the full state cut along the groups' entries."""
    model, found = built(key)
    assert found.groups
    keep = random_halves(found.groups)
    small, ref = narrow(model, found.groups, keep), masked(model, found.groups, keep)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out_small, out_ref, out_full = small(x), ref(x), model(x)
    assert_close_1e5(out_small, out_ref)
    assert float((out_ref - out_full).abs().max()) > 1e-3
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    modules = dict(small.named_modules())
    for g in found.groups:
        for name, _ in g.producers:
            m = modules[name]
            assert (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == len(keep[g.name])
    # The narrowed state is the full one cut along every group's `entries` (what LoFT will slice)
    # and nothing else: a tensor in two groups (a Bottleneck's conv2, SE layers) on both dims.
    full, cut = model.state_dict(), small.state_dict()
    expected = dict(full)
    for g in found.groups:
        kept = keep[g.name].sort().values
        for key, (dim, repeat) in g.entries(full).items():
            columns = (kept[:, None] * repeat + torch.arange(repeat)).reshape(-1)
            expected[key] = expected[key].index_select(dim, columns)
    assert list(cut) == list(full)
    assert all(torch.equal(cut[k], expected[k]) for k in full), [k for k in full if not torch.equal(cut[k], expected[k])]


@pytest.mark.parametrize("key", ["resnet20", "tv_mobilenet_v3_small", "tv_vit"])
def test_narrowed_equals_masked_one_group_at_a_time(key):
    """The same, each group alone (a mistake in one group cannot hide behind another's)."""
    model, found = built(key)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for g in found.groups:
        keep = {g.name: random_halves([g], seed=4)[g.name]}
        with torch.no_grad():
            assert_close_1e5(narrow(model, found.groups, keep)(x), masked(model, found.groups, keep)(x))


# ------------------------------------------------------------------ counts and reasons
# groups, and the reason kinds of the rejected places (one Counter entry per place and kind).
PINNED = {
    # 16 Bottlenecks x 2 inner groups + the stem (its output feeds layer1.0's conv1 and downsample
    # projection only); the 4 stage residual streams end at an add, fc at the output.
    "tv_resnet50": (33, {"add": 4, "model output": 1}),
    # 8 convs and 2 hidden Linears (features.25 → flatten → classifier.0 reads each channel 49 times).
    "tv_vgg11_bn": (10, {"model output": 1}),
    # stem (through block 1's depthwise conv) + 16 expansions + projections of the 1-block stages
    # (16, 320 channels) + the 1280-channel head conv; the 5 multi-block stages end at an add.
    "tv_mobilenet_v2": (20, {"add": 5, "model output": 1}),
    # stem (through block 1's depthwise conv and SE) + 10 expansions + 9 SE squeezes + block 1's
    # projection + head conv + classifier.0; stages of 24, 40, 48, 96 channels end at an add.
    "tv_mobilenet_v3_small": (23, {"add": 4, "model output": 1}),
    # stem (through block 1) + 15 expansions + 16 SE squeezes + projections of the 1-block stages
    # (16, 320) + head conv; 5 multi-block stages end at an add.
    "tv_efficientnet_b0": (35, {"add": 5, "model output": 1}),
    # one MLP hidden group per CNBlock (3+3+9+3); each stage's stream: add, LayerNorm, layer scale.
    "tv_convnext_tiny": (18, {"add": 4, "layout change": 4, "norm over channels": 4, "unknown op": 4,
                              "model output": 1}),
    # one MLP hidden group per encoder block; the residual stream meets everything.
    "tv_vit": (2, {"add": 1, "concat": 1, "slice": 1, "reshape": 1, "layout change": 1, "attention": 1,
                   "norm over channels": 1, "unknown op": 1, "model output": 1}),
    # width 0.5 rounds the 40- and 48-channel stages to 24 both: one residual stream fewer than tv.
    "mobilenetv3_small": (23, {"add": 3, "model output": 1}),
}


def reason_counter(found) -> dict:
    return dict(collections.Counter(k for _, reason in found.rejected for k in reason_kinds(reason)))


@pytest.mark.parametrize("key", PINNED)
def test_group_counts_and_rejection_reasons_are_pinned(key):
    _, found = built(key)
    groups, reasons = PINNED[key]
    assert (len(found.groups), reason_counter(found)) == (groups, reasons)


def test_group_details_of_the_torchvision_models():
    """A Bottleneck's 3x3 conv is in two groups (consumer of conv1's, producer of its own); VGG's
    flatten repeats each channel over the 7x7 average pool; SE: expand conv and fc2 produce the
    expanded channels, fc1 and the projection consume them; a ViT MLP is fc1 → GELU → fc2."""
    by = built("tv_resnet50")[1].by_name()
    assert by["layer2.1.conv1"].consumers == (("layer2.1.conv2", 1, 1),)
    assert by["layer2.1.conv2"].producers == (("layer2.1.conv2", 0),)
    assert by["layer2.1.conv2"].members == ("layer2.1.bn2",)
    state = built("tv_resnet50")[0].state_dict()
    assert by["layer2.1.conv1"].entries(state)["layer2.1.conv2.weight"] == (1, 1)
    assert by["layer2.1.conv2"].entries(state)["layer2.1.conv2.weight"] == (0, 1)
    assert built("tv_vgg11_bn")[1].by_name()["features.25"].consumers == (("classifier.0", 1, 49),)
    se = built("tv_mobilenet_v3_small")[1].by_name()["features.4.block.0.0"]
    assert se.producers == (("features.4.block.0.0", 0), ("features.4.block.2.fc2", 0))
    assert se.consumers == (("features.4.block.2.fc1", 1, 1), ("features.4.block.3.0", 1, 1))
    assert se.members == ("features.4.block.0.1", "features.4.block.1.0", "features.4.block.1.1")
    vit = built("tv_vit")[1]
    assert [(g.name, g.width, g.consumers) for g in vit.groups] == [
        (f"encoder.layers.encoder_layer_{i}.mlp.0", 32, ((f"encoder.layers.encoder_layer_{i}.mlp.3", 1, 1),))
        for i in range(2)]


# ------------------------------------------------------------------ the zoo: groups == blocks
def zoo_blocks(model) -> list[tuple[str, int, int, str]]:
    """The zoo's residual blocks as they were written by hand before discovery (the reference):
    (block path, stage, index, its mid BN) for every block of layer1..layerN; a BasicBlock
    normalises conv1's filters with bn1, a pre-activation block with bn2."""
    out, s = [], 1
    while hasattr(model, f"layer{s}"):
        for j, block in enumerate(getattr(model, f"layer{s}")):
            out.append((f"layer{s}.{j}", s, j, "bn2" if isinstance(block, PreActBlock) else "bn1"))
        s += 1
    return out


@pytest.mark.parametrize("name", ZOO)
def test_zoo_groups_are_todays_blocks_and_paper_preset_is_todays_selection(name):
    """Discovered groups = the hand-written blocks of before (conv1 → mid BN → conv2, the same 6
    state-dict entries and dims); block_refs are those groups; `paper` (hence prunable_blocks /
    partitioned_blocks) selects blocks [1:] of every stage, stage 1 partitioned only if asked;
    narrowing = the old slicing (each entry index-selected to the kept channels)."""
    model, found = built(name)
    blocks = zoo_blocks(model)
    state = model.state_dict()
    inner = [g for g in found.groups if g.name.startswith("layer")]
    assert [(g.name, g.width) for g in inner] == [(f"{b}.conv1", model.get_submodule(b).conv1.out_channels)
                                                    for b, *_ in blocks]
    # A WRN's first block widens with a projection, so the stem's output is never added: its
    # channels (stem conv → layer1.0's BN → conv1 and shortcut) are one more, outer group.
    outer = [(g.name, g.consumers) for g in found.groups if g not in inner]
    assert outer == ([("conv1", (("layer1.0.conv1", 1, 1), ("layer1.0.shortcut.0", 1, 1)))]
                     if name.startswith("wrn") else [])
    for g, (b, _, _, bn) in zip(inner, blocks):
        assert g.producers == ((f"{b}.conv1", 0),)
        assert g.consumers == ((f"{b}.conv2", 1, 1),)
        assert g.members == (f"{b}.{bn}",)
        expected = {f"{b}.conv1.weight": 0, f"{b}.conv2.weight": 1,
                    **{f"{b}.{bn}.{leaf}": 0 for leaf in ("weight", "bias", "running_mean", "running_var")}}
        assert {k: d for k, (d, _) in g.entries(state).items()} == expected
    assert [(r.name, r.stage, r.index, r.group) for r in block_refs(model) if r.stage] == \
        [(b, s, j, g) for (b, s, j, _), g in zip(blocks, inner)]
    for stage1 in (False, True):
        chosen = paper_preset(found.groups, partition_stage1=stage1)
        assert list(chosen.prunable) == [f"{b}.conv1" for b, _, j, _ in blocks if j > 0]
        assert list(chosen.partitioned) == [f"{b}.conv1" for b, s, j, _ in blocks if j > 0 and (s > 1 or stage1)]
        assert set(chosen.why_not) == {g.name for g in found.groups} - set(chosen.partitioned)
        assert [r.producer for r in prunable_blocks(model)] == list(chosen.prunable)
        assert [r.producer for r in partitioned_blocks(model, stage1)] == list(chosen.partitioned)
    keep = random_halves(inner)
    today = dict(state)   # the old slicing: every block entry cut to the kept mid channels
    for r in (r for r in block_refs(model) if r.stage):
        for key, (dim, _) in r.group.entries(state).items():
            today[key] = state[key].index_select(dim, keep[r.producer].sort().values)
    mine = narrow(model, inner, keep).state_dict()
    assert list(mine) == list(today) and all(torch.equal(mine[k], today[k]) for k in today)


def test_a_narrowed_zoo_model_is_traced_once_per_structure():
    """block_refs traces each model structure once (common.groups.discovered); build_model's
    narrowing through the groups gives the same modules as the arch's widths say."""
    from common import groups
    arch = zoo_arch("preresnet18")
    before = groups.TRACES[0]
    for _ in range(3):
        block_refs(build_model(arch))
    assert groups.TRACES[0] - before <= 1
    small = build_model({**arch, "mids": {"layer3.1": 3}})
    assert [small.layer3[1].conv1.out_channels, small.layer3[1].bn2.num_features,
            small.layer3[1].conv2.in_channels] == [3, 3, 3]
    assert [r.mid for r in block_refs(small) if r.name == "layer3.1"] == [3]


def test_paper_preset_on_torchvision_resnet50():
    """Blocks [1:] of each stage, both inner groups of a Bottleneck; stage 1 only if asked."""
    chosen = paper_preset(built("tv_resnet50")[1].groups)
    assert chosen.prunable == tuple(f"layer{s}.{j}.conv{c}" for s, n in enumerate([3, 4, 6, 3], 1)
                                    for j in range(1, n) for c in (1, 2))
    assert chosen.partitioned == tuple(n for n in chosen.prunable if not n.startswith("layer1."))
    assert chosen.why_not["conv1"] == "not inside a residual block layerS.J"


# ------------------------------------------------------------------ what ends a group
class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))


class Heads(nn.Module):
    """Patch embedding, then q = Linear, reshaped into 2 heads of 4 for a self-attention."""

    def __init__(self):
        super().__init__()
        self.embed, self.q, self.out = nn.Conv2d(3, 8, 8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)                     # [B, 16, 8]
        heads = self.q(tokens).view(-1, 16, 2, 4).transpose(1, 2)              # [B, 2, 16, 4]
        mixed = torch.softmax(heads @ heads.transpose(-1, -2), -1) @ heads
        return self.out(mixed.transpose(1, 2).reshape(-1, 16, 8)).mean(1)


class ChannelNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.conv2 = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 3)
        self.fc, self.ln, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        pooled = self.conv2(self.gn(self.conv(x))).mean((2, 3))
        return self.fc2(self.ln(self.fc(pooled)))


class Grouped(nn.Module):
    """A depth multiplier conv (groups = its 8 inputs, 16 outputs): conv's channels are one per conv
    group, so none could be removed (tests/test_grouped_conv.py: grouped convs that narrow)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.grouped = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, groups=8)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.grouped(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


class TwoOutputs(nn.Module):
    """Returns the features too: their channels reach the model output, so they are no group."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        features = self.conv2(torch.relu(self.conv(x)))
        return features, self.head(features.mean((2, 3)))


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(Double.apply(self.conv(x))))).mean((2, 3))


@pytest.mark.parametrize("model, place, kind", [
    (Concat(), "a", "concat"), (Concat(), "b", "concat"),
    (Heads(), "q", "reshape into heads"),
    (ChannelNorms(), "conv", "norm over channels"), (ChannelNorms(), "fc", "norm over channels"),
    (Grouped(), "conv", "grouped conv"),
    (TwoOutputs(), "conv2", "model output"),
    (CustomFunction(), "conv", "custom autograd function"),
])
def test_each_rejection_reason(model, place, kind):
    found = discover(model)
    rejected = dict(found.rejected)
    assert place not in found.by_name()
    assert kind in reason_kinds(rejected[place]), rejected[place]


def test_what_the_rejection_models_keep():
    """Around the rejected places, the per-channel groups are still found."""
    assert [g.name for g in discover(TwoOutputs()).groups] == ["conv"]
    assert [g.name for g in discover(CustomFunction()).groups] == ["conv2"]
    assert [g.name for g in discover(Grouped()).groups] == ["grouped"]   # 2 of its outputs per conv group
    assert dict(discover(CustomFunction()).rejected)["conv"] == "custom autograd function (Double)"


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = torch.relu(x)
        return self.conv2(x)


def test_data_dependent_control_flow_is_one_line():
    with pytest.raises(UserError) as err:
        discover(Branchy())
    message = str(err.value)
    assert "\n" not in message and "branches on tensor values" in message and "if x.mean() > 0" in message


def test_forward_failure_and_bad_kept_channels_are_one_line():
    with pytest.raises(UserError, match=r"cannot trace Concat on an input of shape \(2, 1, 32, 32\)"):
        discover(Concat(), input_shape=(1, 32, 32))
    model, found = built("resnet20")
    g = found.groups[0]
    for bad in ({"nope": torch.tensor([0])}, {g.name: torch.tensor([g.width])}, {g.name: torch.tensor([0, 0])},
                {g.name: torch.tensor([], dtype=torch.long)}):
        with pytest.raises(UserError):
            narrow(model, found.groups, bad)


def test_discovery_leaves_the_model_as_it_was():
    """Training mode, values and frozen parameters are as before (the trace needs eval and grads)."""
    torch.manual_seed(0)
    model = build_model(zoo_arch("resnet20")).train()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(discover(model).groups) == 9
    assert model.training and not model.conv1.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv1.weight")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class InputDepthwise(nn.Module):
    """A depthwise conv straight on the image: its channels are the input's, produced by no layer."""

    def __init__(self):
        super().__init__()
        self.dw, self.conv = nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.dw(x)).mean((2, 3))


def test_channels_of_the_input_are_no_group():
    found = discover(InputDepthwise())
    assert found.groups == [] and "model input" in reason_kinds(dict(found.rejected)["dw"])


class LinearSE(nn.Module):
    """Squeeze-excitation written with Linears and a view back to (N, C, 1, 1), then a spatial gate
    (a mean over the channels broadcast back over them)."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn, self.project = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.expand(x)))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        x = self.project(x * gate.view(*gate.shape, 1, 1))   # not view(-1, 8, 1, 1): narrowed, 8 is wrong
        x = x * torch.sigmoid(x.mean(1, keepdim=True))
        return self.head(x.mean((2, 3)))


def test_se_with_linears_is_one_group_and_a_spatial_gate_is_not():
    model = randomised(LinearSE())
    found = discover(model)
    by = found.by_name()
    assert sorted(by) == ["expand", "fc1"]
    assert by["expand"].producers == (("expand", 0), ("fc2", 0))
    assert by["expand"].consumers == (("project", 1, 1), ("fc1", 1, 1))
    assert "unknown op" in reason_kinds(dict(found.rejected)["project"])
    keep = random_halves(found.groups)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_1e5(narrow(model, found.groups, keep)(x), masked(model, found.groups, keep)(x))


class ShapeBranch(nn.Module):
    """Branches on a shape (fixed for a given input size): torch.fx cannot trace it, which is fine."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.shape[-1] > 3:
            x = torch.relu(x)
        return self.conv2(x).mean((2, 3))


def test_a_branch_on_a_shape_is_fine():
    assert [g.name for g in discover(ShapeBranch()).groups] == ["conv"]


def test_dry_run_table_lists_every_group_with_its_choice_and_every_rejected_place():
    from common.selection import describe
    model, found = built("resnet20")
    lines = describe(model).splitlines()
    assert lines[0].split() == ["group", "width", "producers", "consumers", "chosen"]
    rows = {line.split()[0]: line for line in lines[1:1 + len(found.groups)]}
    assert list(rows) == [g.name for g in found.groups]
    assert rows["layer2.1.conv1"].split()[1:4] == ["16", "layer2.1.conv1", "layer2.1.conv2"]
    assert rows["layer2.1.conv1"].endswith("partition + prune")
    assert rows["layer1.1.conv1"].endswith("prune only: stage 1 (partitioned only if asked)")
    assert rows["layer3.0.conv1"].endswith("no: first block of its stage (strided or widening)")
    assert lines[1 + len(found.groups)] == "9 channel groups; not groups (shared channels), 2 places:"
    assert [line.split()[0] for line in lines[2 + len(found.groups):]] == ["conv1", "head.fc"]
    assert "classifier.0 (x49)" in describe(built("tv_vgg11_bn")[0], preset=None)
    with pytest.raises(UserError, match="unknown group preset 'nope'"):
        describe(model, preset="nope")


def test_01_dry_run_prints_the_group_table_of_the_configs_model(capsys):
    """quick_c10's preresnet18 (width 1/4): its 8 block groups with the paper preset's choice on
    stderr, the places that are no group after them; stdout stays the JSON report."""
    import json
    from pathlib import Path
    from conftest import stage
    config = Path(__file__).resolve().parents[1] / "yaml" / "quick_c10.yaml"
    stage("01_pretrain_loft").main(["--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    assert json.loads(out)["arch"]["name"] == "preresnet18"
    lines = err.splitlines()
    assert lines[0].split() == ["group", "width", "producers", "consumers", "chosen"]
    assert lines[2].split() == ["layer1.1.conv1", "16", "layer1.1.conv1", "layer1.1.conv2", "prune", "only:",
                                "stage", "1", "(partitioned", "only", "if", "asked)"]
    assert lines[3].split()[:2] == ["layer2.0.conv1", "32"]
    assert lines[3].endswith("no: first block of its stage (strided or widening)")
    assert lines[8].split() == ["layer4.1.conv1", "128", "layer4.1.conv1", "layer4.1.conv2", "partition", "+", "prune"]
    assert lines[9] == "8 channel groups; not groups (shared channels), 5 places:"
    assert lines[10].split() == ["conv1", "add"] and lines[-1].split()[0] == "head.fc"


class Reductions(nn.Module):
    """conv → mean over the channels, broadcast back (a spatial gate); conv2 → mean of everything."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        x = self.conv2(x * x.mean(1, keepdim=True))
        return self.conv3(x * x.mean()).mean((2, 3))


def test_reductions_over_the_channels_end_a_group():
    rejected = dict(discover(Reductions()).rejected)
    assert set(rejected) >= {"conv", "conv2"}
    assert "product broadcast across the channels" in rejected["conv"]
    assert "Mean over the channels" in rejected["conv2"]


def test_a_torch_pruning_failure_is_one_line_naming_it():
    """torch-pruning 1.6.1 cannot map ShuffleNetV2's channel shuffle (view → transpose → view):
    the refusal names the library and where it failed, not the model's forward, and what still runs."""
    with pytest.raises(UserError) as err:
        discover(tvm.shufflenet_v2_x0_5(num_classes=10))
    assert str(err.value) == ("cannot discover channel groups of ShuffleNetV2: Torch-Pruning's DependencyGraph "
                              "fails in update_reshape_index_mapping (ZeroDivisionError: integer division or "
                              "modulo by zero); LoFT, structured pruning and the filter distance need them, so use "
                              "pretrain.method=dense or localsgd and prune.kind=magnitude for this model")
