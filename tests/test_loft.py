"""LoFT round mechanics: partition, extract, aggregate, subnetwork function (SPEC 2)."""
import pytest
import torch

from common.dist import Comm, DistEnv, workers_of_rank
from common.errors import UserError
from common.loft import draw_partition, worker_arch
from common.narrowing import SlicePlan
from reference_round import aggregate, extract
from common.models import build_model
from common.selection import partitioned_blocks

ARCH = {"name": "preresnet18", "num_classes": 10, "width": 0.25}


def setup(arch=ARCH):
    torch.manual_seed(0)
    model = build_model(arch)
    blocks = partitioned_blocks(model)
    state = model.state_dict()
    return model, blocks, state, SlicePlan.of(blocks, state)


@pytest.mark.parametrize("S", [2, 3, 4, 5])
def test_partition_disjoint_covering_balanced_and_shared(S):
    _, blocks, _, _ = setup()
    part = draw_partition(blocks, S, seed=3, round_=7)
    for b in blocks:
        sets = part[b.name]
        assert len(sets) == S
        allidx = torch.cat(sets)
        assert sorted(allidx.tolist()) == list(range(b.mid))           # cover, disjoint
        sizes = [len(s) for s in sets]
        assert max(sizes) - min(sizes) <= 1
    again = draw_partition(blocks, S, seed=3, round_=7)                 # what another rank draws
    assert all(torch.equal(x, y) for b in blocks for x, y in zip(part[b.name], again[b.name]))
    other = draw_partition(blocks, S, seed=3, round_=8)
    assert any(not torch.equal(x, y) for b in blocks for x, y in zip(part[b.name], other[b.name]))


def test_partitioned_blocks_are_blocks_1_on_of_stages_2_to_4():
    _, blocks, _, _ = setup()
    assert [b.name for b in blocks] == ["layer2.1", "layer3.1", "layer4.1"]
    model = build_model(ARCH)
    assert [b.name for b in partitioned_blocks(model, partition_stage1=True)][0] == "layer1.1"


@pytest.mark.parametrize("S", [2, 3, 4])
def test_extract_then_aggregate_without_training_is_identity(S):
    _, blocks, state, plan = setup()
    part = draw_partition(blocks, S, 0, 0)
    results = {w: extract(state, plan, part, w) for w in range(S)}
    new = aggregate(state, plan, part, results, Comm(DistEnv()), S)
    for k, v in state.items():
        if S in (2, 4) or not v.is_floating_point():
            assert torch.equal(new[k], v), k
        else:  # a mean of 3 equal floats can round in the last bit
            torch.testing.assert_close(new[k], v, rtol=1e-7, atol=0)


def naive_aggregate(state, plan, part, results, S):
    """Second implementation: channel by channel with Python loops."""
    new = {}
    for k, v in state.items():
        if k in plan.entries:
            ((block, dim, _),) = plan.entries[k]   # a zoo entry lies on one group
            out = v.clone()
            for w in range(S):
                for j, c in enumerate(part[block][w].tolist()):
                    if dim == 0:
                        out[c] = results[w][k][j]
                    else:
                        out[:, c] = results[w][k][:, j]
            new[k] = out
        elif v.is_floating_point():
            acc = torch.zeros_like(v)
            for w in range(S):
                acc = acc + results[w][k]
            new[k] = acc / S
        else:
            new[k] = sum(results[w][k] for w in range(S)) // S
    return new


@pytest.mark.parametrize("S", [2, 4])
def test_aggregate_places_owner_values_and_averages_shared(S):
    _, blocks, state, plan = setup()
    part = draw_partition(blocks, S, 0, 5)
    gen = torch.Generator().manual_seed(1)
    results = {}
    for w in range(S):  # "training": every worker moves every float entry differently
        sub = extract(state, plan, part, w)
        results[w] = {k: (v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 10)
                      for k, v in sub.items()}
    new = aggregate(state, plan, part, results, Comm(DistEnv()), S)
    ref = naive_aggregate(state, plan, part, results, S)
    for k in state:
        torch.testing.assert_close(new[k], ref[k], rtol=1e-6, atol=1e-6)
    # the placement is exact: each partitioned channel is its owner's value, bit for bit
    for k, ((block, dim, _),) in plan.entries.items():
        for w in range(S):
            assert torch.equal(new[k].index_select(dim, part[block][w]), results[w][k])


def test_subnetwork_is_the_full_model_with_other_channels_removed():
    """Subnetwork (eval) == full model whose conv2 inputs outside the worker's sets are zeroed.
    The implementation applies no output scaling, so the match is exact up to float rounding."""
    model, blocks, state, plan = setup()
    gen = torch.Generator().manual_seed(2)
    for k, v in state.items():  # non-trivial BN statistics
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            v.copy_(torch.randn(v.shape, generator=gen) * 0.1)
    model.load_state_dict(state)
    part = draw_partition(blocks, 3, 0, 1)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    for w in range(3):
        sub = build_model(worker_arch(ARCH, part, w))
        sub.load_state_dict(extract(state, plan, part, w))
        masked = build_model(ARCH)
        mstate = {k: v.clone() for k, v in state.items()}
        for b in blocks:
            keep = torch.zeros(b.mid, dtype=torch.bool)
            keep[part[b.name][w]] = True
            mstate[f"{b.name}.conv2.weight"][:, ~keep] = 0
        masked.load_state_dict(mstate)
        y_sub, y_mask = sub.eval()(x), masked.eval()(x)
        torch.testing.assert_close(y_sub, y_mask, rtol=1e-5, atol=1e-5)
        n_sub = sum(p.numel() for p in sub.parameters())
        assert n_sub < sum(p.numel() for p in model.parameters())  # physically narrower
        assert sub.get_submodule("layer4.1").conv1.out_channels == len(part["layer4.1"][w])


def test_workers_of_rank_needs_a_multiple():
    assert workers_of_rank(4, DistEnv(rank=1, world=2)) == [2, 3]
    with pytest.raises(UserError, match="not a multiple"):
        workers_of_rank(3, DistEnv(rank=0, world=2))


def test_a_combine_rule_is_the_methods_own_one_function_edit(tiny_config, tmp_path, monkeypatch):
    """Replacing LoFT's combine rule (take worker 0's copy instead of the mean) changes LoFT's
    weights and leaves Local SGD's bit for bit as they were."""
    import importlib
    import common.pretrain as P
    pretrain = importlib.import_module("01_pretrain_loft")

    def weights(method, name):
        cfg = tiny_config(name=name, pretrain={"epochs": 1, "method": method})
        pretrain.main(["--config", str(cfg), "--run-dir", str(tmp_path / name)])
        return torch.load(tmp_path / name / "pretrain/epoch_001.pt", weights_only=True)["model"]

    before = {m: weights(m, f"{m}_mean") for m in ("loft", "localsgd")}
    monkeypatch.setattr(P.Loft, "combine", staticmethod(lambda stacked: stacked[0].clone()))
    after = {m: weights(m, f"{m}_first") for m in ("loft", "localsgd")}
    assert any(not torch.equal(before["loft"][k], after["loft"][k]) for k in before["loft"])
    assert all(torch.equal(before["localsgd"][k], after["localsgd"][k]) for k in before["localsgd"])
