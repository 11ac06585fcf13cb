"""Reliability: atomic checkpoints under kill -9, refused malicious/truncated files, total config
validation (property-based), finished runs not overwritten, non-finite loss stops cleanly."""
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.checkpoint import load_checkpoint, save_atomic
from common.errors import UserError
from conftest import REPO, TINY, _merge, stage


class RunsCode:
    """Unpickling this object would run a shell command (the attack weights_only stops)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": {}, "payload": RunsCode(marker)}, bad)
    with pytest.raises(UserError, match="evil.pt: refused"):
        load_checkpoint(bad)
    assert not marker.exists()
    # the same object through plain pickle does run the command: the test can fail
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(RunsCode(marker)))
    pickle.loads(plain.read_bytes())
    assert marker.exists()


def test_truncated_and_foreign_files_are_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_atomic({"model": {"w": torch.randn(1000)}, "arch": {"name": "x"}}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path in (trunc, text):
        with pytest.raises(UserError) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", made_by="python 01_pretrain_loft.py --config X")


SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
from common.checkpoint import save_atomic
print("ready", flush=True)
i = 0
while True:
    i += 1
    save_atomic({{"model": {{"w": torch.full((200_000,), float(i))}}, "arch": {{}}, "epoch": i}}, {path!r})
"""


def test_no_half_written_checkpoint_is_ever_visible_under_kill_9(tmp_path):
    path = tmp_path / "ck.pt"
    for attempt in range(12):
        p = subprocess.Popen([sys.executable, "-c", SAVER.format(repo=str(REPO), path=str(path))],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * attempt)  # kill at a different moment of the save loop each time
        p.send_signal(signal.SIGKILL)
        p.wait()
        if path.exists():
            ck = load_checkpoint(path)
            assert torch.all(ck["model"]["w"] == ck["epoch"])  # complete and self-consistent
    assert path.exists()


# ----------------------------------------------------------- config fuzzing
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
    from common.data import load_cifar10
    from conftest import DATA
    return load_cifar10(DATA, train=True).subset(torch.arange(96)), load_cifar10(DATA, False).subset(torch.arange(50))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
    monkeypatch.setattr(pretrain, "load_dataset", lambda dcfg, train: tiny_data[0] if train else tiny_data[1]
                        if os.path.isdir(dcfg.root) else (_ for _ in ()).throw(UserError(f"data.root={dcfg.root}: missing")))
    import common.pretrain as P
    for cls in (P.Loft, P.Dense):
        monkeypatch.setattr(cls, "train_epoch", lambda self, epoch: 0.0)
    run = root / "run"
    try:
        pretrain.main(["--config", str(cfg), "--run-dir", str(run)])
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        assert not (run / "pretrain").exists() or not any((run / "pretrain").iterdir())
    else:
        assert (run / "pretrain/epoch_001.pt").exists()


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    from conftest import run_cli
    cfg = tiny_config(pretrain={"epochs": 2, "lr": 9.0, "weight_decay": 0.9, "method": "dense"})
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert r.returncode == 2 and "non-finite loss" in r.stderr and "step" in r.stderr
    assert len([l for l in re.split(r"[\r\n]", r.stderr) if l.startswith("error:")]) == 1
    assert load_checkpoint(tmp_path / "r/pretrain/epoch_000.pt")["epoch"] == 0
