"""Total config validation, property-based: any mutated config either runs or fails with one
line and leaves no run folder (hypothesis; skipped where it is not installed)."""
import os

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common.errors import UserError  # noqa: E402
from conftest import TINY, _merge, stage  # noqa: E402


KEYS = {
    "seed": st.integers(-5, 2**40),
    "model.arch": st.sampled_from(["preresnet18", "resnet18", "vgg16", "", 3]),
    "model.width": st.one_of(st.floats(-1, 40), st.just(float("nan")), st.just("wide")),
    "data.train_subset": st.integers(-10, 10**7),
    "data.root": st.sampled_from(["/nonexistent/cifar", None]),
    "pretrain.workers": st.integers(-2, 10**6),
    "pretrain.local_iters": st.integers(-1, 10**6),
    "pretrain.epochs": st.integers(-1, 3),
    "pretrain.batch_size": st.integers(-1, 10**7),
    "pretrain.lr": st.one_of(st.floats(-1, 1e6), st.sampled_from([float("nan"), float("inf")]), st.booleans()),
    "pretrain.method": st.sampled_from(["loft", "dense", "localsgd", "gpipe", "sgd"]),
    "prune.ratio": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "pretrain.unknown_knob": st.integers(),
    "bogus_section": st.just({"a": 1}),
}


def _set(d, dotted, value):
    *path, leaf = dotted.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[leaf] = value


@pytest.fixture(scope="module")
def tiny_data():
    from common.data import load_cifar
    from conftest import DATA
    return (load_cifar(DATA, "cifar10", train=True).subset(torch.arange(96)),
            load_cifar(DATA, "cifar10", False).subset(torch.arange(50)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), min_size=1, max_size=3), data=st.data())
def test_mutated_configs_either_run_or_fail_with_one_line_and_no_run_folder(mutations, data, tmp_path_factory,
                                                                             tiny_data, monkeypatch):
    pretrain = stage("01_pretrain_loft")
    values = _merge(TINY, {"pretrain": {"epochs": 1, "local_iters": 1, "batch_size": 8}, "data": {"eval_batch_size": 50}})
    for key in mutations:
        v = data.draw(KEYS[key], label=key)
        if key == "data.root" and v is None:
            continue
        _set(values, key, v)
    root = tmp_path_factory.mktemp("fuzz")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump(values))
    # real images, but few of them, and no training: the run's set-up and checks are under test
    import common.evaluation as E  # where 01 loads its splits
    monkeypatch.setattr(E, "load_dataset", lambda dcfg, train: tiny_data[0] if train else tiny_data[1]
                        if os.path.isdir(dcfg.root) else (_ for _ in ()).throw(UserError(f"data.root={dcfg.root}: missing")))
    import common.pretrain as P
    for cls in (P.Loft, P.Dense):
        monkeypatch.setattr(cls, "train_epoch", lambda self, epoch: 0.0)
    run = root / "run"
    try:
        pretrain.main(["--config", str(cfg), "--run-dir", str(run)])
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        assert not (run / "pretrain").exists()                  # a failed stage leaves no folder behind
    else:
        assert (run / "pretrain/epoch_001.pt").exists()
