"""The GPU-first training core: batches made on the device, persistent LoFT workers, fused workers,
the channels_last step, device selection and (on CUDA) deterministic resume (a non-finite loss:
tests/test_reliability.py)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, TINY, interrupt_in_epoch, stage
from common.config import load_config
from common.data import Stream, _gen, load_cifar, normalize
from common.dist import Comm, DistEnv, setup_distributed
from common.errors import UserError
from common.loft import draw_partition, worker_arch
from common.narrowing import SlicePlan
from reference_round import aggregate, extract
from common.models import build_model
from common.pretrain import Loft, fresh_momentum
from common.schedule import schedule_of
from common.train import SGDStep, lr_at, make_sgd

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cifar():
    return load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(1000))


def reference_batch(data, batch, seed, stream_id, t):
    """Step t's batch computed image by image on the CPU, from the documented recipe: the pass's
    permutation, then per image a crop of the 4-pixel zero-padded image and a flip."""
    steps = len(data) // batch
    p, i = divmod(t, steps)
    idx = torch.randperm(len(data), generator=_gen(seed, stream_id, p))[i * batch:(i + 1) * batch]
    gen = _gen(seed, stream_id, t, 1)
    dy = torch.randint(0, 9, (batch,), generator=gen)
    dx = torch.randint(0, 9, (batch,), generator=gen)
    flip = torch.rand(batch, generator=gen) < 0.5
    out = []
    for n, j in enumerate(idx.tolist()):
        img = F.pad(data.images[j], (4, 4, 4, 4))[:, dy[n]:dy[n] + 32, dx[n]:dx[n] + 32]
        out.append(img.flip(2) if flip[n] else img)
    return normalize(torch.stack(out), data.mean, data.std), data.labels[idx]


def test_stream_batch_is_the_documented_augmentation(cifar):
    s = Stream(cifar, 50, 3, 1)
    for t in (0, 7, 19, 20, 45):  # across pass boundaries (20 steps a pass)
        x, y = s.batch(t)
        ex, ey = reference_batch(cifar, 50, 3, 1, t)
        assert torch.equal(x, ex) and torch.equal(y, ey), t


@cuda
def test_a_batch_drawn_on_cuda_equals_the_cpu_batch_bit_for_bit(cifar):
    cpu, gpu = Stream(cifar, 50, 3, 1), Stream(cifar.to("cuda"), 50, 3, 1)
    for t in (0, 7, 21):
        (xc, yc), (xg, yg) = cpu.batch(t), gpu.batch(t)
        assert xg.device.type == "cuda"
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def rebuild_round(state, cfg, arch, blocks, train_set, r, momentum=None):
    """The previous implementation of a round: a new subnetwork module and optimizer per worker
    and round, loaded by load_state_dict, trained by a plain loop; then the real aggregate."""
    pc = cfg.pretrain
    plan, part = SlicePlan.of(blocks, state), draw_partition(blocks, pc.workers, cfg.seed, r)
    comm, results, moms = Comm(DistEnv()), {}, {}
    for w in range(pc.workers):
        sub = build_model(worker_arch(arch, part, w))
        sub.load_state_dict(extract(state, plan, part, w))
        opt = make_sgd(sub, pc.lr, pc.momentum, pc.weight_decay)
        named = dict(sub.named_parameters())
        if momentum is not None:
            mom = extract(momentum, plan, part, w)
            for k, p in named.items():
                opt.state[p]["momentum_buffer"] = mom[k].clone()
        stream = Stream(train_set, pc.batch_size, cfg.seed, w)
        sub.train()
        for t in range(r * pc.local_iters, (r + 1) * pc.local_iters):
            for g in opt.param_groups:
                g["lr"] = lr_at(t, schedule_of(pc, len(train_set) // pc.batch_size, pc.local_iters))
            x, y = stream.batch(t)
            loss = F.cross_entropy(sub(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[w] = sub.state_dict()
        if momentum is not None:
            moms[w] = {k: opt.state[p]["momentum_buffer"] for k, p in named.items()}
    new = aggregate(state, plan, part, results, comm, pc.workers)
    if momentum is not None:
        momentum = aggregate(momentum, plan, part, moms, comm, pc.workers)
    return new, momentum, comm.bytes_sent


@pytest.mark.parametrize("carry_momentum", [False, True])
def test_persistent_workers_give_the_rebuild_paths_weights_and_bytes(cifar, carry_momentum, tmp_path):
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "pretrain": {**TINY["pretrain"], "workers": 4,
                                                          "carry_momentum": carry_momentum}}))
    cfg = load_config(path)
    arch = {"name": "preresnet18", "num_classes": 10, "width": 0.125}
    torch.manual_seed(0)
    init = build_model(arch).state_dict()
    comm = Comm(DistEnv())
    loft = Loft(cfg, arch, init, cifar, DistEnv(), comm)
    state, momentum, ref_bytes = dict(init), loft.momentum, 0
    for r in range(3):  # several rounds: the persistent modules are reused with new partitions
        loft.run_round(r)
        state, momentum, b = rebuild_round(state, cfg, arch, loft.blocks, cifar, r, momentum)
        ref_bytes += b
    for k in state:
        torch.testing.assert_close(loft.state[k], state[k], rtol=0, atol=1e-6, msg=k)
    if carry_momentum:
        for k in momentum:
            torch.testing.assert_close(loft.momentum[k], momentum[k], rtol=0, atol=1e-6, msg=k)
    assert comm.bytes_sent == ref_bytes > 0


def test_channels_last_step_equals_the_default_layout(cifar):
    cfg = load_config(None, ["pretrain.lr=0.05"])
    x, y = Stream(cifar, 32, 0, 0).batch(0)
    torch.manual_seed(0)
    a = build_model({"name": "preresnet18", "num_classes": 10, "width": 0.125})
    b = build_model({"name": "preresnet18", "num_classes": 10, "width": 0.125})
    b.load_state_dict(a.state_dict())
    cfg_cl = load_config(None, ["pretrain.lr=0.05", "pretrain.channels_last=true"])
    step_a = SGDStep(a, cfg.pretrain, "cpu", schedule_of(cfg.pretrain, 10))
    step_b = SGDStep(b, cfg_cl.pretrain, "cpu", schedule_of(cfg_cl.pretrain, 10))
    la, lb = step_a(0, [(x, y)]), step_b(0, [(x, y)])  # one update: only summation order differs
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert b.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-3, atol=1e-4, msg=k)


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)


def test_more_ranks_than_gpus_is_one_line_naming_the_counts_and_the_ways_out(monkeypatch, tiny_config, tmp_path,
                                                                             capsys):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(UserError, match=r"2 ranks on this host but 1 CUDA GPU") as e:
        setup_distributed(device="auto")
    assert "plain `python`" in str(e.value) and "dist.device=cpu" in str(e.value)
    from common.cli import run_stage
    run = tmp_path / "r"
    with pytest.raises(SystemExit) as code:
        run_stage(stage("01_pretrain_loft").main, ["--config", str(tiny_config()), "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and err.startswith("error: 2 ranks on this host")
    assert not run.exists()  # refused before anything was written


def test_device_cpu_is_chosen_even_with_gpus_visible(monkeypatch):
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    from common.dist import pick_device
    assert pick_device("cpu", 1, 2) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="dist.device=cuda: no CUDA GPU"):
        pick_device("cuda", 0, 1)


@cuda
def test_on_cuda_with_deterministic_kernels_resumed_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    pretrain = stage("01_pretrain_loft")
    cfg = tiny_config(pretrain={"epochs": 3, "bf16": True, "channels_last": True},
                      dist={"device": "cuda", "deterministic": True})
    for name in ("a", "b"):
        pretrain.main(["--config", str(cfg), "--run-dir", str(tmp_path / name)])
    undo = interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(["--config", str(cfg), "--run-dir", str(tmp_path / "c")])
    undo()
    pretrain.main(["--config", str(cfg), "--run-dir", str(tmp_path / "c"), "--resume"])
    final = [torch.load(tmp_path / n / "pretrain/epoch_003.pt", weights_only=True)["model"] for n in "abc"]
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), f"two runs differ at {k}"
        assert torch.equal(final[0][k], final[2][k]), f"resumed differs at {k}"


@pytest.fixture
def native_conv():
    """oneDNN's grouped kernels sum in another order than its plain ones (~1e-6 a step); PyTorch's
    native CPU kernels run a grouped convolution group by group, so the comparison sees the fused
    logic, not kernel choice."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@pytest.mark.parametrize("method,S,carry", [("loft", 2, False), ("loft", 4, True), ("localsgd", 2, False)])
def test_a_fused_round_equals_the_sequential_round(cifar, tmp_path, method, S, carry, native_conv):
    """Each worker's trained tensors, the aggregated global state and the bytes, fused vs in turn.
    One round of one local step: the grouped kernels sum in another order (~1e-7), and at this
    tiny width and lr 0.05 that difference grows ~10x per step (ReLU kinks, BN), so longer rounds
    are compared step by step in the next test."""
    import yaml
    arch = {"name": "preresnet18", "num_classes": 10, "width": 0.125}
    torch.manual_seed(0)
    init = build_model(arch).state_dict()
    states, results, sent = {}, {}, {}
    for fused in (False, True):
        path = tmp_path / f"{fused}.yaml"
        path.write_text(yaml.safe_dump({**TINY, "pretrain": {**TINY["pretrain"], "method": method, "workers": S,
                                                              "carry_momentum": carry, "fused_workers": fused,
                                                              "local_iters": 1}}))
        cfg = load_config(path)
        comm = Comm(DistEnv())
        loft = stage("01_pretrain_loft") and __import__("common.pretrain", fromlist=["METHODS"]).METHODS[method](
            cfg, arch, init, cifar, DistEnv(), comm)
        loft.run_round(0)
        results[fused] = {w: {k: v.clone() for k, v in st.items()} for w, st in loft.workers.module_states.items()}
        states[fused], sent[fused] = (loft.state, loft.momentum), comm.bytes_sent
    for w in results[False]:
        for k, v in results[False][w].items():
            assert (results[True][w][k].double() - v.double()).abs().max() <= 1e-5, (w, k, (results[True][w][k].double() - v.double()).abs().max())
    for seq, fus in zip(*(states[f] for f in (False, True))):
        for k in (seq or {}):
            assert (fus[k].double() - seq[k].double()).abs().max() <= 1e-5, (k, (fus[k].double() - seq[k].double()).abs().max())
    assert sent[True] == sent[False] > 0


def test_fused_steps_equal_sequential_steps_from_equal_weights(cifar, tmp_path, native_conv):
    """Within a K-step round: re-synchronise the weights and momentum before every step; each
    fused step then gives every worker the weights its own step gives (1e-6)."""
    import yaml
    arch = {"name": "preresnet18", "num_classes": 10, "width": 0.125}
    torch.manual_seed(0)
    init = build_model(arch).state_dict()
    sides = {}
    for fused in (False, True):
        path = tmp_path / f"{fused}.yaml"
        path.write_text(yaml.safe_dump({**TINY, "pretrain": {**TINY["pretrain"], "workers": 2, "fused_workers": fused}}))
        sides[fused] = Loft(load_config(path), arch, init, cifar, DistEnv(), Comm(DistEnv()))
    seq, fus = sides[False].workers, sides[True].workers
    part = draw_partition(sides[False].blocks, 2, 0, 0)
    for side in sides.values():
        side.exchange.begin_round(part)
        side.exchange.load(side.flat)
        fresh_momentum(side.workers.momentum_flats)
    for t in range(4):
        with torch.no_grad():
            for w, state in seq.module_states.items():
                for k, v in state.items():
                    fus.module_states[w][k].copy_(v)
            for w, momentum in seq.momentum_states.items():
                for k, v in momentum.items():
                    fus.momentum_states[w][k].copy_(v)
        torch.testing.assert_close(fus.train(range(t, t + 1)), seq.train(range(t, t + 1)), rtol=1e-6, atol=1e-5)
        for w, state in seq.module_states.items():
            for k, v in state.items():
                torch.testing.assert_close(fus.module_states[w][k], v, rtol=0, atol=1e-6, msg=f"step {t} worker {w} {k}")


@pytest.fixture
def float64(monkeypatch):
    """Training in float64: the batches are cast after normalising and new tensors default to
    float64, so the models are built in it."""
    import common.data
    normalize_fp32 = common.data.normalize
    monkeypatch.setattr(common.data, "normalize", lambda images, mean, std: normalize_fp32(images, mean, std).double())
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def test_fused_workers_after_an_epoch_equal_the_workers_in_turn_in_float64(tmp_path, float64, native_conv):
    """A whole epoch (4 rounds of 5 steps) at the tiny config's lr 0.05, in float64: the grouped
    kernels then add in the same order as the plain ones, so the fused and sequential workers give
    the same loss and the same global state bit for bit (in fp32 the ~1e-7 per-step kernel
    difference grows ~10x a step at this lr, which no fixed tolerance over an epoch can bound)."""
    import yaml
    cifar640 = load_cifar(DATA, "cifar10", train=True, download=False).subset(torch.arange(640))
    arch = {"name": "preresnet18", "num_classes": 10, "width": 0.125}
    torch.manual_seed(0)
    init = build_model(arch).state_dict()
    assert init["conv1.weight"].dtype == torch.float64
    out = {}
    for fused in (False, True):
        path = tmp_path / f"{fused}.yaml"
        path.write_text(yaml.safe_dump({**TINY, "pretrain": {**TINY["pretrain"], "epochs": 1, "fused_workers": fused}}))
        loft = Loft(load_config(path), arch, init, cifar640, DistEnv(), Comm(DistEnv()))
        out[fused] = loft.train_epoch(1), loft.round, loft.state
    (loss_seq, rounds_seq, seq), (loss_fus, rounds_fus, fus) = out[False], out[True]
    assert rounds_seq == rounds_fus == 4 and loss_seq == loss_fus
    changed = [k for k in seq if not torch.equal(seq[k], init[k])]
    assert len(changed) > len(seq) // 2                            # the epoch trained
    assert [k for k in seq if not torch.equal(seq[k], fus[k])] == []


def test_fused_workers_refuse_uneven_widths(tiny_config, tmp_path):
    cfg = tiny_config(name="odd", pretrain={"epochs": 1, "fused_workers": True, "workers": 3})
    with pytest.raises(UserError, match=r"fused_workers: block layer2.1 has 16 channels, not divisible by"):
        stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(tmp_path / "odd")])
    assert not (tmp_path / "odd/pretrain/epoch_000.pt").exists()


def test_shard_streams_are_disjoint_and_cover_each_pass(cifar):
    S, B = 4, 25  # 1000 images: 250 a shard, 10 steps a pass
    streams = [Stream(cifar, B, 5, w, shard=(w, S)) for w in range(S)]
    assert all(s.steps_per_pass == 10 for s in streams)
    for p in (0, 1):
        seen = torch.cat([s.indices(p * 10 + i) for s in streams for i in range(10)])
        assert sorted(seen.tolist()) == list(range(1000)), p          # every image once per pass
    first = torch.cat([streams[0].indices(i) for i in range(10)])
    again = torch.cat([streams[0].indices(10 + i) for i in range(10)])
    assert set(first.tolist()) != set(again.tolist())                  # a new split every pass


def test_shard_divides_the_rounds_and_the_bytes_by_s(tiny_config, tmp_path):
    pretrain = stage("01_pretrain_loft")
    import csv
    import json
    out = {}
    for data in ("full", "shard"):
        cfg = tiny_config(name=data, pretrain={"epochs": 2, "workers": 2, "local_iters": 5, "data": data})
        pretrain.main(["--config", str(cfg), "--run-dir", str(tmp_path / data)])
        rows = list(csv.DictReader(open(tmp_path / data / "pretrain/metrics.csv")))
        out[data] = ([int(r["rounds"]) for r in rows], json.loads((tmp_path / data / "pretrain/comm.json").read_text()),
                     int(rows[-1]["train_flops"]))
    # 640 images, batch 32: 20 steps a pass per worker (4 rounds of K=5) in full, 10 (2 rounds) in shard
    assert out["full"][0] == [4, 8] and out["shard"][0] == [2, 4]
    full, shard = out["full"][1], out["shard"][1]
    assert shard["measured_payload_bytes"] * 2 == full["measured_payload_bytes"]
    assert shard["analytic_ps_bytes"]["rounds"] == 4 and shard["analytic_ps_bytes"]["loft"] * 2 == full["analytic_ps_bytes"]["loft"]
    assert out["full"][2] == 2 * out["shard"][2]                       # S x fewer training FLOPs: dense's
    with pytest.raises(UserError, match="pretrain.data: shard splits each pass"):
        load_config(tiny_config(name="dense", pretrain={"method": "dense", "data": "shard"}))
