"""Defects a new user hit, one test (or a few) each: resume of a finished stage, a full disk,
relocatable run folders, unreadable configs, a batch larger than the data set, folders left by
failed stages, and the config checked before torch loads (corrupt vs malicious checkpoints and a
real full file system: tests/test_checkpoint.py)."""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from common.cli import run_stage
from common.config import load_config
from common.errors import UserError
from conftest import REPO, TINY, _merge, run_cli, stage

FT = {"pretrain": {"epochs": 2}, "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.05}}


def main_of(script, cfg, run, *extra, sets=()):
    args = ["--config", str(cfg), "--run-dir", str(run), *extra]
    for s in sets:
        args += ["--set", s]
    stage(script).main(args)


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "[WARNING]" not in l]


def files_with_mtimes(folder):
    """Every file under `folder`: its bytes and modification time (a rewrite with equal bytes shows too)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_lineage(tmp_path_factory):
    """01 (2 epochs) → 03 (structured 50 %) → 04 (1 epoch, finetune) in root/run, finished."""
    root = tmp_path_factory.mktemp("defects")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(_merge(TINY, FT)))
    run = root / "run"
    main_of("01_pretrain_loft", cfg, run)
    main_of("03_prune", cfg, run)
    main_of("04_finetune", cfg, run)
    return cfg, run


@pytest.fixture
def run_copy(finished_lineage, tmp_path):
    cfg, run = finished_lineage
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return cfg, copy


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


# ------------------------------------------------------------ 4: corrupt vs carrying code: tests/test_checkpoint.py


# ------------------------------------------------------------ 5: unreadable configs
UNREADABLE = {
    "latin-1 bytes": (b"seed: 0\nname: caf\xe9\n", "not UTF-8"),
    "a directory": (None, "is a directory"),
    "bad YAML": (b"seed: [0\n", "not valid YAML"),
    "a list": (b"- seed\n- 0\n", "must be a mapping"),
    "binary": (bytes(range(256)), "not UTF-8"),
}


@pytest.mark.parametrize("what", list(UNREADABLE))
def test_an_unreadable_config_is_one_line_naming_the_file(tmp_path, what):
    content, message = UNREADABLE[what]
    path = tmp_path / "bad.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_a_non_utf8_config_is_one_line_exit_2_for_a_stage(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(UNREADABLE["latin-1 bytes"][0])
    r = run_cli(["01_pretrain_loft.py", "--config", str(path), "--run-dir", str(tmp_path / "r")])
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "not UTF-8" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------ 6: a batch larger than the data set
@pytest.mark.parametrize("method, data", [("loft", "full"), ("loft", "shard"), ("localsgd", "full")])
def test_a_batch_larger_than_the_data_set_names_both_numbers(tiny_config, tmp_path, method, data):
    cfg = tiny_config(pretrain={"method": method, "data": data, "batch_size": 1000, "local_iters": 4})
    with pytest.raises(UserError) as e:
        main_of("01_pretrain_loft", cfg, tmp_path / "r")
    text = str(e.value)
    assert "batch_size" in text and "1000" in text and "640" in text, text


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


# ------------------------------------------------------------ 8: the config is checked before torch loads
CHECK_FIRST = """
import importlib, sys
sys.path.insert(0, {repo!r})
from common.errors import UserError
stage = importlib.import_module({script!r})
try:
    stage.main(["--config", {cfg!r}, "--run-dir", {run!r}, "--set", {setting!r}])
except UserError as e:
    print("refused:", e)
print("heavy:", sorted(m for m in ("torch", "torchvision", "deepspeed") if m in sys.modules))
"""


@pytest.mark.parametrize("setting, message", [("pretrain.epochz=3", "unknown config key 'pretrain.epochz'"),
                                              ("pretrain.workers=1", "LoFT needs at least 2 workers")])
@pytest.mark.parametrize("script", ["01_pretrain_loft", "02_filter_distance", "03_prune", "04_finetune"])
def test_a_config_error_is_refused_before_torch_is_imported(tiny_config, tmp_path, script, setting, message):
    code = CHECK_FIRST.format(repo=str(REPO), script=script, cfg=str(tiny_config()), run=str(tmp_path / "r"),
                              setting=setting)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    refusal = next((l for l in r.stdout.splitlines() if l.startswith("refused: ")), "")
    assert message in refusal, r.stdout + r.stderr
    assert "heavy: []" in r.stdout, r.stdout
