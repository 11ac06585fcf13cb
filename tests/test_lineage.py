"""Issue 15: lineage safety (validate before clearing, content hashes, folder names, resume rules),
one-line file-system errors, file modes, hints, TensorBoard scalars, progress output, run reports."""
import errno
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

from common.checkpoint import FinetunedTicket, PretrainEpoch, Ticket, load
from common.cli import python_command, run_stage
from common.errors import UserError
from common.models import build_model
from conftest import REPO, TINY, _merge, run_cli, stage

FT = {"pretrain": {"epochs": 2}, "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.05}}


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "[WARNING]" not in l]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main_of(script, cfg, run, *extra, sets=()):
    args = ["--config", str(cfg), "--run-dir", str(run), *extra]
    for s in sets:
        args += ["--set", s]
    stage(script).main(args)


def make_lineage(root):
    """01 (2 epochs) → 03 structured 50 % and magnitude keep-20 %."""
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(_merge(TINY, FT)))
    run = root / "run"
    main_of("01_pretrain_loft", cfg, run)
    main_of("03_prune", cfg, run)
    main_of("03_prune", cfg, run, sets=("prune.kind=magnitude", "prune.ratio=0.8"))
    return cfg, run


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    return make_lineage(tmp_path_factory.mktemp("lineage"))


@pytest.fixture
def own_copy(lineage, tmp_path):
    """A copy for tests that add outputs; its tickets read the copy's own pretraining run (paths
    are stored relative to the run folder)."""
    cfg, run = lineage
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return cfg, copy


# ------------------------------------------------------------------ 1: validate before clearing
@pytest.mark.parametrize("setting, message", [("data.root={empty}", "no cifar-10-batches-py/"),
                                              ("pretrain.workers=64", "exceeds the narrowest")])
def test_a_refused_force_leaves_the_stage_folder_intact(own_copy, tmp_path, setting, message):
    cfg, run = own_copy
    (tmp_path / "empty").mkdir()
    before = snapshot(run / "pretrain")
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(run), "--force",
                 "--set", setting.format(empty=tmp_path / "empty")])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert snapshot(run / "pretrain") == before


def test_a_refused_force_of_04_leaves_its_folder_intact(own_copy):
    cfg, run = own_copy
    main_of("04_finetune", cfg, run)
    out = run / "finetune_l1_p50_finetune"
    before = snapshot(out)
    with pytest.raises(UserError, match="exceeds the 640 training images"):  # found by the trainer, after the ticket
        main_of("04_finetune", cfg, run, "--force", sets=("finetune.batch_size=100000",))
    assert snapshot(out) == before


# ------------------------------------------------------------------ 2: changed upstream → refusal
def test_a_ticket_refuses_to_rewind_onto_a_redone_pretraining_run(tmp_path):
    cfg, run = make_lineage(tmp_path)
    ticket = load(run / "prune_l1_p50/ticket.pt", Ticket)
    assert ticket.lineage["source"]["path"].endswith("epoch_002.pt")
    assert sorted(ticket.pretrain_sha256) == ["0", "1", "2"]
    main_of("01_pretrain_loft", cfg, run, "--force", sets=("seed=5",))
    for mode in ("rewind", "finetune"):  # rewind: epoch 1 changed; finetune: the ticket's source changed
        with pytest.raises(UserError, match=r"epoch_00[12]\.pt changed since .*ticket\.pt") as e:
            main_of("04_finetune", cfg, run, sets=(f"finetune.mode={mode}", "finetune.rewind_epoch=1"))
        assert "03_prune.py" in str(e.value) and "--force" in str(e.value) and "\n" not in str(e.value)
    assert not any(run.glob("finetune_*/*.pt"))
    main_of("03_prune", cfg, run, "--force", sets=("seed=5",))  # the remedy the message names
    main_of("04_finetune", cfg, run, sets=("seed=5", "finetune.mode=rewind", "finetune.rewind_epoch=1"))
    result = json.loads((run / "finetune_l1_p50_rewind_k1/result.json").read_text())
    import hashlib
    assert result["lineage"]["rewind"]["sha256"] == hashlib.sha256((run / "pretrain/epoch_001.pt").read_bytes()).hexdigest()
    assert result["lineage"]["ticket"]["sha256"] == hashlib.sha256((run / "prune_l1_p50/ticket.pt").read_bytes()).hexdigest()


def test_resume_of_04_refuses_a_ticket_that_changed_since_it_started(own_copy):
    cfg, run = own_copy
    main_of("04_finetune", cfg, run)
    main_of("03_prune", cfg, run, "--force", "--from", str(run / "pretrain/epoch_001.pt"))  # same config, other bytes
    with pytest.raises(UserError, match="ticket.pt or its rewind checkpoint changed since"):
        main_of("04_finetune", cfg, run, "--resume")


# ------------------------------------------------------------------ 3: folder names and --tag
def test_rewind_epochs_and_tags_get_their_own_folders(own_copy):
    cfg, run = own_copy
    for k in (0, 1):
        main_of("04_finetune", cfg, run, sets=("finetune.mode=rewind", f"finetune.rewind_epoch={k}"))
    main_of("04_finetune", cfg, run, "--tag", "short_lr", sets=("finetune.lr=0.01",))
    for name in ("finetune_l1_p50_rewind_k0", "finetune_l1_p50_rewind_k1", "finetune_short_lr"):
        assert (run / name / "result.json").is_file(), name
    a, b = (load(run / f"finetune_l1_p50_rewind_k{k}/final.pt", FinetunedTicket) for k in (0, 1))
    assert not torch.equal(a.model["layer2.1.conv1.weight"], b.model["layer2.1.conv1.weight"])
    with pytest.raises(UserError, match="already holds outputs.*--tag"):
        main_of("04_finetune", cfg, run, sets=("finetune.mode=rewind", "finetune.rewind_epoch=1", "finetune.lr=0.2"))


def test_02_keeps_an_analysis_made_with_another_ratio(own_copy):
    cfg, run = own_copy
    main_of("02_filter_distance", cfg, run)
    before = snapshot(run / "distance")
    with pytest.raises(UserError, match=r"distance holds results made with prune.ratio=0.5; pass --tag"):
        main_of("02_filter_distance", cfg, run, sets=("prune.ratio=0.8",))
    main_of("02_filter_distance", cfg, run, "--tag", "p80", sets=("prune.ratio=0.8",))
    assert snapshot(run / "distance") == before
    assert json.loads((run / "distance_p80/summary.json").read_text())["prune_ratio"] == 0.8


# ------------------------------------------------------------------ 4: parameters in result.json
def test_result_json_counts_trainable_total_and_nonzero_parameters_in_every_mode(own_copy):
    cfg, run = own_copy
    masked = load(run / "prune_mag_r20/ticket.pt", Ticket)
    for mode in ("rise", "rewind", "finetune"):
        main_of("04_finetune", cfg, run, "--ticket", str(run / "prune_mag_r20/ticket.pt"),
                sets=(f"finetune.mode={mode}", "finetune.rewind_epoch=1"))
        out = run / f"finetune_mag_r20_{mode}{'_k1' if mode != 'finetune' else ''}"
        result = json.loads((out / "result.json").read_text())
        final = load(out / "final.pt", FinetunedTicket)
        names = [n for n, _ in build_model(final.arch).named_parameters()]
        total = sum(final.model[n].numel() for n in names)
        losers = sum(int((~m).sum()) for m in masked.mask.values())
        assert result["params_total"] == total
        assert result["params_trainable"] == total - losers == masked.params_after
        assert result["params_nonzero"] == sum(int((final.model[n] != 0).sum()) for n in names)
        if mode == "rise":  # losers stay at their nonzero epoch-1 values
            assert result["params_nonzero"] > result["params_trainable"]
        else:
            assert result["params_nonzero"] <= result["params_trainable"]
    main_of("04_finetune", cfg, run, sets=("finetune.mode=scratch",))
    result = json.loads((run / "finetune_l1_p50_scratch/result.json").read_text())
    structured = load(run / "prune_l1_p50/ticket.pt", Ticket)
    assert result["params_trainable"] == result["params_total"] == structured.params_after


# ------------------------------------------------------------------ 5: resume and the schedule
def test_resume_with_more_epochs_under_a_cosine_schedule_names_the_key(own_copy):
    cfg, run = own_copy
    r = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(run), "--resume",
                 "--set", "pretrain.epochs=3"])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "pretrain.epochs was 2" in lines[0] and "cosine" in lines[0]
    with pytest.raises(UserError, match=r"different config \(pretrain.lr\)"):
        main_of("01_pretrain_loft", cfg, run, "--resume", sets=("pretrain.lr=0.2",))
    assert not (run / "pretrain/epoch_003.pt").exists()


def test_resume_may_extend_a_constant_schedule_to_the_same_weights(tiny_config, tmp_path):
    cfg = tiny_config(pretrain={"epochs": 1, "schedule": "constant"})
    main_of("01_pretrain_loft", cfg, tmp_path / "cut")
    main_of("01_pretrain_loft", cfg, tmp_path / "cut", "--resume", sets=("pretrain.epochs=2",))
    main_of("01_pretrain_loft", cfg, tmp_path / "full", sets=("pretrain.epochs=2",))
    a, b = (load(tmp_path / f"{r}/pretrain/epoch_002.pt", PretrainEpoch).model for r in ("cut", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ 6: one line for file-system trouble
def test_an_unwritable_run_folder_is_one_line(tiny_config, tmp_path):
    if os.geteuid() == 0:  # root writes through any mode bits: use a folder no one may create
        target = "/sys/loft_test_run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = str(locked / "run")
    r = run_cli(["01_pretrain_loft.py", "--config", str(tiny_config()), "--run-dir", target])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "cannot write" in lines[0] and target in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_full_disk_during_a_stage_is_one_line_exit_2(lineage, tmp_path, monkeypatch, capsys):
    """The writer's own line (tests/test_checkpoint.py) ends a whole stage: exit 2, no traceback."""
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    cfg, _ = lineage
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage("01_pretrain_loft").main, ["--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(error_lines(err)) == 1 and "No space left on device" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong shape"])
def test_a_corrupt_cifar_batch_is_one_line_naming_the_file(tiny_config, tmp_path, damage):
    from conftest import DATA
    folder = tmp_path / "data/cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (DATA / "cifar-10-batches-py").iterdir():
        (folder / f.name).symlink_to(f)
    bad = folder / "data_batch_3"
    bad.unlink()
    original = (DATA / "cifar-10-batches-py/data_batch_3").read_bytes()
    import pickle
    bad.write_bytes({"truncate": original[:len(original) // 3], "garbage": os.urandom(4096),
                     "wrong shape": pickle.dumps({b"data": b"\0" * 100, b"labels": [1]})}[damage])
    r = run_cli(["01_pretrain_loft.py", "--config", str(tiny_config(data={"root": str(tmp_path / "data")})),
                 "--run-dir", str(tmp_path / "r")])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and str(bad) in lines[0] and "CIFAR batch" in lines[0], r.stderr


# ------------------------------------------------------------------ 7: file modes
# (the writer itself: tests/test_checkpoint.py)
def test_every_file_of_a_stage_is_0644_under_umask_022(lineage, tmp_path):
    cfg, _ = lineage
    old = os.umask(0o022)
    try:
        main_of("01_pretrain_loft", cfg, tmp_path / "r", sets=("pretrain.epochs=1",))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "r/pretrain").iterdir()]
    assert len(files) >= 7 and all(p.stat().st_mode & 0o777 == 0o644 for p in files), \
        {p.name: oct(p.stat().st_mode & 0o777) for p in files}


# ------------------------------------------------------------------ 8: hints
def test_hints_quote_the_full_command_and_name_what_a_file_is(lineage, tmp_path):
    cfg, run = lineage
    with pytest.raises(UserError) as e:
        main_of("04_finetune", cfg, run, sets=("prune.ratio=0.3", "seed=0"))
    assert f"python 03_prune.py --config {cfg} --run-dir {run} --set prune.ratio=0.3 --set seed=0" in str(e.value)
    with pytest.raises(UserError) as e:
        main_of("04_finetune", cfg, run, "--ticket", str(run / "pretrain/epoch_002.pt"))
    assert "a pretraining checkpoint (epoch 2), not a ticket" in str(e.value) and "--from" in str(e.value)


def test_a_relative_data_root_error_names_the_absolute_path(tiny_config, tmp_path):
    r = run_cli(["01_pretrain_loft.py", "--config", str(tiny_config(data={"root": "no_such_data"})),
                 "--run-dir", str(tmp_path / "r")])
    assert r.returncode == 2 and str(REPO / "no_such_data") in r.stderr


# ------------------------------------------------------------------ 9: seeing results
def scalars(folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_stage_scalars(own_copy):
    cfg, run = own_copy
    import csv
    rows = list(csv.DictReader(open(run / "pretrain/metrics.csv")))
    got = scalars(run / "pretrain")
    for tag in ("train_loss", "test_acc", "comm_bytes", "train_flops"):
        assert got[tag] == {int(r["epoch"]): pytest.approx(float(r[tag]), rel=1e-6) for r in rows}, tag
    import math
    steps = 640 // 32  # per worker and epoch; the cosine schedule runs over 2 epochs
    assert got["lr"][1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / (2 * steps))))
    main_of("04_finetune", cfg, run)
    tuned = scalars(run / "finetune_l1_p50_finetune")
    assert {"train_loss", "test_acc", "lr", "comm_bytes", "train_flops"} <= set(tuned)
    main_of("02_filter_distance", cfg, run)
    summary = json.loads((run / "distance/summary.json").read_text())
    dist = scalars(run / "distance")["distance_to_final"]
    assert dist == {int(e): pytest.approx(v, abs=1e-5) for e, v in summary["distance_to_final"].items()}


# the bar on a terminal: tests/test_progress.py
def test_a_stage_logged_to_a_file_has_no_carriage_returns_and_one_line_per_epoch(lineage, tmp_path, monkeypatch,
                                                                                  capfd):
    cfg, _ = lineage
    main_of("01_pretrain_loft", cfg, tmp_path / "r")
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert [l.split(":")[0] for l in out.splitlines() if l.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    assert f"wrote {tmp_path / 'r/pretrain'}/" in out and f"next: {python_command()} 02_filter_distance.py" in out


# ------------------------------------------------------------------ 10: the report over seeds
def test_report_over_a_run_tree_with_two_seeds(tiny_config, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import report
    cfg = tiny_config(pretrain={"epochs": 1}, finetune={"epochs": 1, "batch_size": 32, "lr": 0.05})
    tree = tmp_path / "runs"
    for seed in (0, 1):
        for script in ("01_pretrain_loft", "03_prune", "04_finetune"):
            main_of(script, cfg, tree / f"tiny_s{seed}", sets=(f"seed={seed}",))
    report.main([str(tree)])
    md = (tree / "report.md").read_text()
    assert md.count("\n## ") == 1 and "loft-2: preresnet18" in md and "Seeds [0, 1]" in md
    results = [json.loads((tree / f"tiny_s{s}/finetune_l1_p50_finetune/result.json").read_text()) for s in (0, 1)]
    accs = [r["final_test_acc"] for r in results]
    row = next(l for l in md.splitlines() if l.startswith("| l1_p50_finetune |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    assert (tree / "report.png").stat().st_size > 0


def test_resume_accepts_a_run_made_before_a_config_key_existed_at_its_default():
    from common.config import Config
    from common.runs import check_resume_config
    now = Config().to_dict()
    saved = Config().to_dict()
    del saved["pretrain"]["compile"]                            # a run made before pretrain.compile existed
    check_resume_config(saved, now, Path("last.pt"), "pretrain")
    now["pretrain"]["compile"] = True                           # not the behaviour the run was made with
    with pytest.raises(UserError, match=r"different config \(pretrain.compile\)"):
        check_resume_config(saved, now, Path("last.pt"), "pretrain")


# ------------------------------------------------------------ 3: relocatable run folders
def test_a_copied_run_repretrained_makes_04_refuse_the_stale_ticket(run_copy):
    cfg, run = run_copy  # the ticket in the copy was made from the original's epoch files
    main_of("01_pretrain_loft", cfg, run, "--force", sets=("seed=5",))
    for mode in ("finetune", "rewind"):
        with pytest.raises(UserError, match=r"copy/pretrain/epoch_00[12]\.pt changed since .*ticket\.pt") as e:
            main_of("04_finetune", cfg, run, "--force", sets=(f"finetune.mode={mode}", "finetune.rewind_epoch=1"))
        assert "\n" not in str(e.value)
    r = run_cli(["04_finetune.py", "--config", str(cfg), "--run-dir", str(run), "--force"])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "changed since" in lines[0], r.stderr

def test_a_moved_run_tree_rewinds_from_its_own_files(run_copy, tmp_path):
    cfg, copy = run_copy
    moved = tmp_path / "archive" / "moved"
    moved.parent.mkdir()
    shutil.move(copy, moved)
    stored = torch.load(moved / "prune_l1_p50/ticket.pt", weights_only=True)  # as on disk
    assert stored["pretrain_dir"] == "pretrain" and stored["lineage"]["source"]["path"] == "pretrain/epoch_002.pt"
    main_of("04_finetune", cfg, moved, "--force", sets=("finetune.mode=rewind", "finetune.rewind_epoch=1"))
    result = json.loads((moved / "finetune_l1_p50_rewind_k1/result.json").read_text())
    assert result["lineage"]["rewind"]["path"] == str(moved / "pretrain/epoch_001.pt")
    # the epoch file it rewound to is the moved tree's: damaging it there is noticed
    (moved / "pretrain/epoch_001.pt").write_bytes((moved / "pretrain/epoch_000.pt").read_bytes())
    with pytest.raises(UserError, match=r"moved/pretrain/epoch_001\.pt changed since"):
        main_of("04_finetune", cfg, moved, "--force", sets=("finetune.mode=rewind", "finetune.rewind_epoch=1"))
