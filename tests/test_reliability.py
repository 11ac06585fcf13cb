"""Reliability: a non-finite loss stops cleanly and keeps the last good checkpoint (atomic and
refused checkpoints: tests/test_checkpoint.py; config fuzzing: tests/test_config_fuzz.py)."""
import re

from common.checkpoint import PretrainEpoch, load


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    from conftest import run_cli
    cfg = tiny_config(pretrain={"epochs": 2, "lr": 9.0, "weight_decay": 0.9, "method": "dense"})
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert r.returncode == 2 and "non-finite loss" in r.stderr and "step" in r.stderr
    assert len([l for l in re.split(r"[\r\n]", r.stderr) if l.startswith("error:")]) == 1
    assert load(tmp_path / "r/pretrain/epoch_000.pt", PretrainEpoch).epoch == 0
