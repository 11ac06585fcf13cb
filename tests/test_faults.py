"""Faults: killed runs resume exactly; a dead peer rank ends the other with a clear message; the
resume of a finished stage changes no file; a full disk is one line that keeps earlier epochs; a
failed stage leaves no folder it created."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.cli import run_stage
from common.errors import UserError
from conftest import (CPU_RANKS, REPO, deepspeed_launcher, error_lines, files_with_mtimes, free_port, main_of,
                      run_cli, stage)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def saved_epoch(path):
    try:
        return int(torch.load(path, weights_only=True)["epoch"]) if path.exists() else -1
    except Exception:
        return -1


def killed_in_epoch_2(cmd, last_pt, steps_per_epoch, seed, launcher=None):
    """Run `cmd` (a stage script and its arguments) under tests/kill_at_step.py, which SIGKILLs
    the process group at a seeded step inside epoch 2; check that it died there, by the signal,
    with epoch 1's checkpoint written and epoch 2's not."""
    step = steps_per_epoch + random.Random(seed).randrange(steps_per_epoch)
    full = (launcher or [sys.executable]) + [str(REPO / "tests/kill_at_step.py")] + cmd
    p = subprocess.run(full, cwd=REPO, env={**ENV, "KILL_AT_STEP": str(step)}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, start_new_session=True, timeout=300)
    # a launcher outlives its killed ranks and reports them with its own non-zero exit
    assert p.returncode == -signal.SIGKILL if launcher is None else p.returncode != 0, p.returncode
    assert saved_epoch(last_pt) == 1                         # epoch 1 written, epoch 2 (the last) not


def same_weights(a, b):
    x, y = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    return all(torch.equal(x[k], y[k]) for k in x)


def test_kill_9_of_01_in_one_process_and_under_two_ranks_then_resume(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"epochs": 2}, dist=CPU_RANKS)
    base = ["01_pretrain_loft.py", "--config", str(cfg)]
    ref = tmp_path / "ref"
    assert run_cli(base + ["--run-dir", str(ref)]).returncode == 0
    one = tmp_path / "one"
    killed_in_epoch_2(base + ["--run-dir", str(one)], one / "pretrain/last.pt", 20, seed=1)
    r = run_cli(base + ["--run-dir", str(one), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert same_weights(ref / "pretrain/epoch_002.pt", one / "pretrain/epoch_002.pt")
    two = tmp_path / "two"
    killed_in_epoch_2(base + ["--run-dir", str(two)], two / "pretrain/last.pt", 20, seed=2,
                      launcher=deepspeed_launcher(2))
    r = run_cli(base + ["--run-dir", str(two), "--resume"], deepspeed_launcher(2))
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert same_weights(ref / "pretrain/epoch_002.pt", two / "pretrain/epoch_002.pt")


def test_kill_9_of_04_then_resume(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"epochs": 1}, finetune={"epochs": 2, "batch_size": 32, "lr": 0.05})
    run = tmp_path / "run"
    for name in ("01_pretrain_loft", "03_prune", "04_finetune"):   # the upstream and the reference, in process
        stage(name).main(["--config", str(cfg), "--run-dir", str(run)])
    base = ["04_finetune.py", "--config", str(cfg), "--run-dir", str(run)]
    ref = tmp_path / "ref.pt"
    (run / "finetune_l1_p50_finetune/final.pt").rename(ref)
    out = run / "finetune_l1_p50_finetune"
    killed_in_epoch_2(base + ["--force"], out / "last.pt", 20, seed=3)
    r = run_cli(base + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert same_weights(ref, out / "final.pt")


def test_a_dead_peer_ends_the_other_rank_with_a_clear_message_and_resume_works(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"epochs": 3}, dist={**CPU_RANKS, "timeout_s": 30})
    run = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "01_pretrain_loft.py", "--config", str(cfg), "--run-dir",
                                       str(run)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    while saved_epoch(run / "pretrain/last.pt") < 1:
        assert time.time() - t0 < 300 and procs[0].poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    procs[1].kill()
    t_kill = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert time.time() - t_kill < 30 + 15  # within dist.timeout_s (and in practice at once)
    assert procs[0].returncode == 3, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "rank 0" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    assert saved_epoch(run / "pretrain/last.pt") >= 1  # the last checkpoint is intact
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(run), "--resume"],
                deepspeed_launcher(2))
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert saved_epoch(run / "pretrain/last.pt") == 3


# ------------------------------------------------------------ 1: resume of a finished stage
def test_resume_of_a_finished_pretraining_changes_no_file(run_copy, capsys):
    cfg, run = run_copy
    before = files_with_mtimes(run / "pretrain")
    measured = json.loads((run / "pretrain/comm.json").read_text())["measured_payload_bytes"]
    assert measured > 0
    main_of("01_pretrain_loft", cfg, run, "--resume")
    assert files_with_mtimes(run / "pretrain") == before
    assert "already finished" in capsys.readouterr().out

def test_resume_of_a_finished_finetuning_changes_no_file(run_copy, capsys):
    cfg, run = run_copy
    out = run / "finetune_l1_p50_finetune"
    before = files_with_mtimes(out)
    main_of("04_finetune", cfg, run, "--resume")
    assert files_with_mtimes(out) == before
    assert "already finished" in capsys.readouterr().out

# ------------------------------------------------------------ 2: a full disk
def enospc_from_the_zip_writer(obj, f, *args, **kwargs):
    """What torch.save raised on a full tmpfs through our writer (torch 2.x): a RuntimeError of
    its zip writer, raised while handling the OSError of the failed write."""
    f.write(b"PK\x03\x04 partial")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

def stream_writer_failed(obj, f, *args, **kwargs):
    """The message users report from full disks, with no OSError attached."""
    f.write(b"PK\x03\x04 partial")
    raise RuntimeError("[enforce fail at inline_container.cc:471] . PytorchStreamWriter failed writing file "
                       "data/77: file write failed")

@pytest.mark.parametrize("failing_save", [enospc_from_the_zip_writer, stream_writer_failed])
def test_a_full_disk_in_torch_save_is_one_line_exit_2_and_keeps_earlier_epochs(tiny_config, tmp_path, monkeypatch,
                                                                             capsys, failing_save):
    cfg = tiny_config(pretrain={"epochs": 1, "schedule": "constant"})
    run = tmp_path / "r"
    main_of("01_pretrain_loft", cfg, run)
    before = files_with_mtimes(run / "pretrain")
    capsys.readouterr()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage("01_pretrain_loft").main, ["--config", str(cfg), "--run-dir", str(run), "--resume",
                                                   "--set", "pretrain.epochs=2"])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert exit_.value.code == 2 and len(lines) == 1, err
    assert "epoch_002.pt: cannot write" in lines[0] and "Traceback" not in err
    after = files_with_mtimes(run / "pretrain")
    assert {name: after.get(name) for name in before} == before  # every earlier file as it was
    assert not [p for p in after if p.name.endswith(".tmp") or p.name == "epoch_002.pt"]

# ------------------------------------------------------------ 7: failed stages leave no folders
def test_a_failed_01_leaves_no_folder_it_created(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(data={"root": str(empty)})
    with pytest.raises(UserError, match="no cifar-10-batches-py"):
        main_of("01_pretrain_loft", cfg, tmp_path / "runs" / "new")
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "mine"
    existing.mkdir()  # the user's folder: it stays
    with pytest.raises(UserError, match="no cifar-10-batches-py"):
        main_of("01_pretrain_loft", cfg, existing)
    assert existing.is_dir() and not any(existing.iterdir())

def test_failed_02_and_03_leave_no_tagged_folder(finished_lineage, tiny_config, tmp_path):
    cfg, run = finished_lineage
    with pytest.raises(UserError, match="no pretraining checkpoints"):
        main_of("02_filter_distance", cfg, run, "--tag", "cmp", "--compare", str(tmp_path / "no_run"))
    assert not (run / "distance_cmp").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="no pretraining checkpoints"):
        main_of("03_prune", tiny_config(), bare, "--tag", "x")
    assert bare.is_dir() and not any(bare.iterdir())
