"""Grouped convolutions (groups g > 1, not depthwise): the channels a grouped conv produces or reads
are a group of g segments (ChannelGroup.segments), cut by keeping as many channels of each, so the
conv stays g dense conv groups. Narrowed = masked, a keep uneven across segments is refused, L1
pruning ranks per segment, and LoFT's partition gives every worker as many channels of each
segment (the round exchange against the reference: tests/test_round_exchange.py)."""
import pytest
import torch
import torch.nn as nn

from byom_model import tiny_resnext
from common.errors import UserError
from common.groups import discover, reason_kinds
from common.loft import draw_partition
from common.models import build_model, count_params
from common.narrowing import SlicePlan, masked, narrow, select_channels
from common.prune import prune_filters
from common.selection import block_refs
from test_groups import randomised


def aligned_keep(groups, seed: int = 1) -> dict:
    """A random half (at least one) of every segment of every group, sorted."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        per = g.width // g.segments
        keep[g.name] = torch.cat([torch.randperm(per, generator=gen)[:max(1, per // 2)] + i * per
                                  for i in range(g.segments)]).sort().values
    return keep


class MixedGroups(nn.Module):
    """A 4-group conv feeding a 2-group one (segments: their lcm), then a depth multiplier conv
    (groups = its 8 inputs: one channel per conv group, which no keep could narrow; its 16 outputs,
    2 per conv group, are a group)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g4, self.g2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.Conv2d(16, 8, 3, padding=1, groups=2)
        self.multiplier = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.g2(torch.relu(self.g4(torch.relu(self.bn(self.conv(x))))))
        return self.head(self.multiplier(x).mean((2, 3)))


def test_the_groups_of_grouped_convs():
    """A ResNeXt block's conv1 group is read per conv group by conv2 (a grouped consumer); conv2's
    own group, with the SE gate of the RegNetY-like block, is produced per conv group."""
    by = discover(tiny_resnext()).by_name()
    assert [(n, g.width, g.segments, g.grouped) for n, g in by.items()] == [
        ("0", 16, 1, ()), ("4.conv1", 16, 4, (("4.conv2", 4),)), ("4.conv2", 16, 4, ()),
        ("5.conv1", 32, 4, (("5.conv2", 4),)), ("5.conv2", 32, 4, ()), ("5.se.0", 8, 1, ())]
    assert by["5.conv2"].producers == (("5.conv2", 0), ("5.se.2", 0))
    found = discover(MixedGroups())
    assert [(g.name, g.segments, g.grouped) for g in found.groups] == [
        ("conv", 4, (("g4", 4),)), ("g4", 4, (("g2", 2),)), ("multiplier", 8, ())]
    assert dict(found.rejected)["g2"] == "grouped conv (multiplier, groups=8: 1 channel per conv group)"


@pytest.mark.parametrize("make", [tiny_resnext, MixedGroups], ids=["resnext-regnety", "mixed-groups"])
def test_narrowed_equals_masked_and_the_state_cut_is_the_round_exchange_cut(make):
    """Every group cut to a random half of each segment at once, in float64: the narrowed model
    equals the masked one, each grouped conv keeps its g, and its state is the full state cut by
    SlicePlan / select_channels (what LoFT moves and 04 rewinds to)."""
    torch.manual_seed(0)
    model = randomised(make())
    found = discover(model)
    keep = aligned_keep(found.groups)
    refs = block_refs(model)
    model = model.double()
    small, ref = narrow(model, found.groups, keep), masked(model, found.groups, keep)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=0, atol=1e-12)
        assert float((ref(x) - model(x)).abs().max()) > 1e-3
    full = dict(model.named_modules())
    assert all(m.groups == full[n].groups and m.in_channels % m.groups == 0
               for n, m in small.named_modules() if isinstance(m, nn.Conv2d))
    state = model.state_dict()
    cut = select_channels(state, SlicePlan.of(refs, state), {b.name: keep[b.group.name] for b in refs})
    assert all(torch.equal(cut[k], v) for k, v in small.state_dict().items())


def test_a_keep_uneven_across_conv_groups_is_refused_in_one_line():
    model = tiny_resnext()
    found = discover(model)
    with pytest.raises(UserError) as err:
        narrow(model, found.groups, {"4.conv1": torch.tensor([0, 1, 4, 8, 12, 13])})
    assert str(err.value) == ("group 4.conv1: a grouped conv reads its 16 channels as 4 conv groups of 4; keep as "
                              "many of each (kept 1 to 2)")


def test_the_partition_gives_each_worker_as_many_channels_of_every_segment():
    refs = block_refs(tiny_resnext())
    for S in (2, 3):
        part = draw_partition(refs, S, seed=0, round_=5)
        for b in refs:
            per = b.mid // b.group.segments
            sets = part[b.name]
            assert torch.equal(torch.cat(sets).sort().values, torch.arange(b.mid))
            for s in sets:
                counts = torch.bincount(s // per, minlength=b.group.segments)
                assert (counts == counts[0]).all() and torch.equal(s, s.sort().values)
            assert max(map(len, sets)) - min(map(len, sets)) <= b.group.segments


def test_l1_pruning_of_resnext50_removes_a_substantial_share_and_keeps_the_conv_groups():
    """torchvision's resnext50_32x4d at ratio 0.5 with the paper preset (blocks [1:] of every
    stage; both inner groups of each): each conv group keeps half its filters, ranked inside it, the
    grouped convs keep groups=32, and the ticket is rebuilt from its arch (first_channels)."""
    arch = {"name": "torchvision.resnext50_32x4d", "num_classes": 10, "width": 1.0, "kwargs": {},
            "input_shape": [3, 32, 32]}
    torch.manual_seed(0)
    model = randomised(build_model(arch, frozenset({arch["name"]})))
    pruned = prune_filters(model, arch, 0.5)
    share = 1 - count_params(pruned.model) / count_params(model)
    print(f"resnext50_32x4d, L1 at 50 %: {100 * share:.1f} % of the parameters removed")
    assert share > 0.25
    assert all(m.groups == 32 for n, m in pruned.model.named_modules() if isinstance(m, nn.Conv2d) and
               n.endswith("conv2"))
    blocks = {b.name: b for b in block_refs(model)}
    for name, kept in pruned.kept.items():   # the top half of each conv group by L1
        g = blocks[name].group
        norms = model.state_dict()[f"{name}.weight"].double().abs().flatten(1).sum(1).view(32, -1)
        expected = norms.argsort(dim=1, descending=True, stable=True)[:, :norms.shape[1] // 2]
        assert torch.equal(kept, (expected + torch.arange(32)[:, None] * norms.shape[1]).flatten().sort().values)
        assert g.segments == 32
    rebuilt = build_model(pruned.arch, frozenset({arch["name"]}))
    rebuilt.load_state_dict(pruned.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), pruned.model(x))


def test_timm_regnety_004_narrowed_equals_masked_and_l1_removes_half_its_parameters():
    arch = {"name": "timm.regnety_004", "num_classes": 10, "width": 1.0, "kwargs": {}, "input_shape": [3, 32, 32],
            "groups": {"preset": "all", "include": [], "exclude": []}}
    torch.manual_seed(0)
    model = randomised(build_model(arch))
    found = discover(model)
    assert sum(g.segments > 1 for g in found.groups) == 32   # 16 blocks: conv1's and conv2's groups
    keep = aligned_keep(found.groups)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(narrow(model, found.groups, keep).double()(x),
                                   masked(model, found.groups, keep).double()(x), rtol=0, atol=1e-10)
    share = 1 - count_params(prune_filters(model, arch, 0.5).model) / count_params(model)
    print(f"regnety_004, L1 at 50 % (all groups): {100 * share:.1f} % of the parameters removed")
    assert share > 0.4


def test_a_grouped_conv_with_one_channel_per_conv_group_is_still_a_reason():
    kinds = reason_kinds(dict(discover(MixedGroups()).rejected)["g2"])
    assert kinds == ["grouped conv"]


def test_fused_workers_train_a_grouped_model_as_the_workers_in_turn(tmp_path):
    """A fused grouped conv is S·g conv groups, worker s's the g of block s: one round of one step
    gives each worker's tensors as the workers in turn do (PyTorch's native CPU kernels, which run a
    grouped conv group by group; ~1e-7 from summation order)."""
    from common.data import load_cifar
    from conftest import DATA
    from test_round_exchange import RESNEXT, loft_of
    cifar = load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(64))
    results = {}
    with torch.backends.mkldnn.flags(enabled=False):
        for fused in (False, True):
            loft = loft_of(tmp_path, cifar, RESNEXT, workers=2, local_iters=1, fused_workers=fused)
            before = {k: v.clone() for k, v in loft.state.items()}
            loft.run_round(0)
            results[fused] = loft.state
    assert float((results[True]["5.conv2.weight"] - before["5.conv2.weight"]).abs().max()) > 1e-4   # trained
    assert max(float((results[True][k].double() - v.double()).abs().max()) for k, v in results[False].items()) < 1e-5


def test_more_workers_than_channels_per_conv_group_is_one_line(tmp_path):
    from common.data import load_cifar
    from conftest import DATA
    from test_round_exchange import RESNEXT, loft_of
    cifar = load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(64))
    with pytest.raises(UserError, match=r"^pretrain.workers=5 exceeds the narrowest partitioned block "
                                        r"\(4 channels per conv group of 4\)$"):
        loft_of(tmp_path, cifar, RESNEXT, workers=5)
