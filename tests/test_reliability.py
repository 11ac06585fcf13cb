"""Reliability: atomic checkpoints under kill -9, refused malicious/truncated files, finished runs
not overwritten, non-finite loss stops cleanly (config fuzzing: tests/test_config_fuzz.py)."""
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoint import load_checkpoint, save_atomic
from common.errors import UserError
from conftest import REPO


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


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    from conftest import run_cli
    cfg = tiny_config(pretrain={"epochs": 2, "lr": 9.0, "weight_decay": 0.9, "method": "dense"})
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert r.returncode == 2 and "non-finite loss" in r.stderr and "step" in r.stderr
    assert len([l for l in re.split(r"[\r\n]", r.stderr) if l.startswith("error:")]) == 1
    assert load_checkpoint(tmp_path / "r/pretrain/epoch_000.pt")["epoch"] == 0
