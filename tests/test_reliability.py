"""Reliability: a non-finite loss stops cleanly in one line naming where, and keeps the last good
checkpoint (atomic and refused checkpoints: tests/test_checkpoint.py; config fuzzing:
tests/test_config_fuzz.py)."""
import re

import pytest

from common.checkpoint import PretrainEpoch, load
from conftest import run_cli


@pytest.mark.parametrize("method, where", [("loft", r"round \d+ \(steps \d+-\d+\)"), ("dense", r"steps \d+-\d+")])
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path,
                                                                                     method, where):
    cfg = tiny_config(pretrain={"epochs": 2, "lr": 9.0, "weight_decay": 0.9, "method": method})
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    errors = [line for line in re.split(r"[\r\n]", r.stderr) if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(rf"non-finite loss at {where}", errors[0]), errors[0]
    assert load(tmp_path / "r/pretrain/epoch_000.pt", PretrainEpoch).epoch == 0
