"""The one checkpoint format (common/checkpoint.py): every kind of file records its kind and reads
back as its record; a file of another kind, or a missing, corrupt or code-carrying one, is one line
naming it; files written before the kind was recorded (commit 4da787e, tests/fixtures) still load
and the stages carry on from them; writes are atomic and follow the umask."""
import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from common.checkpoint import (FinetunedTicket, PretrainEpoch, ResumeState, Ticket, field_values, load, save,
                               write_text_atomic)
from common.errors import UserError
from conftest import DATA, REPO, stage

OLD = REPO / "tests/fixtures/files_4da787e"   # a run folder written by the code of commit 4da787e


def same(a, b) -> bool:
    """Equal values, tensors equal in dtype, shape and every element."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def records(run: Path) -> dict:
    """One record of each kind, as the stages fill them, by their file under `run`."""
    model = {"conv.weight": torch.arange(6.0).view(2, 3), "bn.num_batches_tracked": torch.tensor(3)}
    arch = {"name": "resnet20", "num_classes": 10, "width": 0.125}
    epoch_file = str(run / "pretrain/epoch_002.pt")
    ticket = dict(model=model, arch=arch, epoch=2, prune_kind="magnitude", ratio=0.5, scope="global",
                  source=epoch_file, source_kind="pretrain_epoch", source_epoch=2, pretrain_dir=str(run / "pretrain"),
                  params_before=6, params_after=3, flops_before=10, flops_after=10, flops_before_sparse=10,
                  flops_after_sparse=5, mask={"conv.weight": model["conv.weight"] > 2}, train_flops=7,
                  lineage_flops=7, config={"seed": 0}, lineage={"source": {"path": epoch_file, "sha256": "ab"}},
                  pretrain_sha256={"0": "cd", "2": "ab"})
    return {
        "pretrain/epoch_002.pt": PretrainEpoch(model=model, arch=arch, epoch=2, method="loft", test_acc=50.0,
                                               train_flops=7),
        "pretrain/last.pt": ResumeState(model=model, arch=arch, epoch=2, rows=[{"epoch": 1}, {"epoch": 2}],
                                        trainer={"round": 8, "momentum": {"conv.weight": torch.ones(2, 3)}},
                                        config={"seed": 0}, comm_bytes=99, consecutive=[0.5]),
        "prune_mag_r50/ticket.pt": Ticket(**ticket),
        "finetune_mag_r50_rise_k1/final.pt": FinetunedTicket(
            **ticket, finetune_mode="rise", ticket=str(run / "prune_mag_r50/ticket.pt"), test_acc=60.0,
            finetune_lineage={"ticket": {"path": str(run / "prune_mag_r50/ticket.pt"), "sha256": "ef"},
                              "rewind": None}),
    }


def saved(run: Path, name: str) -> Path:
    save(records(run)[name], run / name)
    return run / name


# ------------------------------------------------------------------ 1: kinds
@pytest.mark.parametrize("name", list(records(Path("run"))))
def test_every_kind_of_file_records_its_kind_and_reads_back_as_its_record(tmp_path, name):
    run = tmp_path / "run"
    record = records(run)[name]
    save(record, run / name)
    stored = torch.load(run / name, weights_only=True)        # plain tensors and values
    assert stored["kind"] == record.KIND
    back = load(run / name, type(record))
    assert type(back) is type(record) and same(field_values(back), field_values(record))
    if isinstance(record, Ticket):   # stored relative to the run folder, read back as openable paths
        assert stored["pretrain_dir"] == "pretrain" and stored["lineage"]["source"]["path"] == "pretrain/epoch_002.pt"


MIXED_UP = [  # (file, the kinds wanted, the command that makes one, the line)
    ("pretrain/epoch_002.pt", (Ticket, FinetunedTicket), "python 03_prune.py --config c.yaml",
     "{path}: a pretraining checkpoint (epoch 2), not a ticket (ticket.pt) or a fine-tuned ticket (final.pt); "
     "make one from it: python 03_prune.py --config c.yaml --from {path}"),
    ("prune_mag_r50/ticket.pt", PretrainEpoch, "python 01_pretrain_loft.py --config c.yaml",
     "{path}: a ticket (magnitude), not a pretraining checkpoint (epoch_EEE.pt) "
     "(run: python 01_pretrain_loft.py --config c.yaml)"),
    ("pretrain/last.pt", (Ticket, FinetunedTicket), "python 03_prune.py --config c.yaml",
     "{path}: resume state (last.pt) after epoch 2, not a ticket (ticket.pt) or a fine-tuned ticket (final.pt) "
     "(run: python 03_prune.py --config c.yaml)"),
    ("finetune_mag_r50_rise_k1/final.pt", ResumeState, None,
     "{path}: a fine-tuned ticket (rise), not resume state (last.pt)"),
    ("prune_mag_r50/ticket.pt", FinetunedTicket, None,
     "{path}: a ticket (magnitude), not a fine-tuned ticket (final.pt)"),
]


@pytest.mark.parametrize("name, wanted, made_by, line", MIXED_UP)
def test_a_file_of_another_kind_is_one_line_naming_what_it_is_and_what_was_wanted(tmp_path, name, wanted, made_by,
                                                                                  line):
    path = saved(tmp_path / "run", name)
    with pytest.raises(UserError) as e:
        load(path, wanted, made_by=made_by)
    assert str(e.value) == line.format(path=path)


def test_missing_foreign_and_incomplete_files_are_one_line_each(tmp_path):
    made_by = "python 03_prune.py --config c.yaml"
    with pytest.raises(UserError) as e:
        load(tmp_path / "ticket.pt", Ticket, made_by=made_by)
    assert str(e.value) == f"{tmp_path / 'ticket.pt'}: no such file; wanted a ticket (ticket.pt) (run: {made_by})"
    torch.save({"w": torch.ones(3)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError) as e:
        load(tmp_path / "foreign.pt", Ticket)
    assert str(e.value) == f"{tmp_path / 'foreign.pt'}: not a checkpoint of this toolkit, not a ticket (ticket.pt)"
    torch.save({"kind": "pretrain_epoch", "model": {}}, tmp_path / "cut.pt")
    with pytest.raises(UserError) as e:
        load(tmp_path / "cut.pt", PretrainEpoch)
    assert str(e.value) == (f"{tmp_path / 'cut.pt'}: a pretraining checkpoint (epoch_EEE.pt) without arch, epoch: "
                            "damaged, or made by other code")


# ------------------------------------------------------------------ 2: corrupt, or carrying code
@pytest.mark.parametrize("content", ["random bytes", "random bytes after a pickle header", "truncated", "text"])
def test_a_corrupt_file_says_corrupt_in_one_line_naming_it(tmp_path, content):
    good = saved(tmp_path / "run", "pretrain/epoch_002.pt")
    bad = tmp_path / "damaged.pt"
    bad.write_bytes({"random bytes": random.Random(0).randbytes(4096),
                     "random bytes after a pickle header": b"\x80\x02" + random.Random(1).randbytes(4096),
                     "truncated": good.read_bytes()[:700], "text": b"hello"}[content])
    with pytest.raises(UserError) as e:
        load(bad, PretrainEpoch)
    text = str(e.value)
    assert text.startswith(f"{bad}: corrupt") and "refused" not in text and "code" not in text and "\n" not in text


class RunsCode:
    """Unpickling this object would run a shell command (the attack weights_only stops)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_a_file_carrying_code_is_refused_in_one_line_and_the_code_does_not_run(tmp_path, writer):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    obj = {"kind": "pretrain_epoch", "model": {}, "arch": {}, "epoch": 0, "x": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj, protocol=int(writer[-1])))
    with pytest.raises(UserError) as e:
        load(evil, PretrainEpoch)
    text = str(e.value)
    assert text.startswith(f"{evil}: refused") and "system" in text and "corrupt" not in text
    assert "weights_only" not in text and "\x1b" not in text and "\n" not in text  # no foreign advice, no colour
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCode(marker)))   # the same object through plain pickle does run: the test can fail
    assert marker.exists()


# ------------------------------------------------------------------ 3: files written before the kind was recorded
OLD_FILES = {"pretrain/epoch_001.pt": PretrainEpoch, "pretrain/last.pt": ResumeState,
             "prune_l1_p50/ticket.pt": Ticket, "prune_mag_r20/ticket.pt": Ticket,
             "finetune_l1_p50_finetune/final.pt": FinetunedTicket, "finetune_l1_p50_finetune/last.pt": ResumeState}


@pytest.fixture
def old_run(tmp_path):
    """A copy of the files 4da787e wrote (the tests add files beside them)."""
    return Path(shutil.copytree(OLD / "run", tmp_path / "run"))


@pytest.mark.parametrize("name, record_type", OLD_FILES.items())
def test_a_file_written_by_4da787e_loads_as_its_kind(old_run, name, record_type):
    stored = torch.load(old_run / name, weights_only=True)
    record = load(old_run / name, record_type)
    assert type(record) is record_type and same(record.model, stored["model"]) and record.epoch == 1
    if record_type is PretrainEpoch:
        assert record.method == "loft" and record.train_flops == stored["train_flops"] > 0
    elif record_type is ResumeState:
        assert same(record.trainer, stored["method"]) and record.rows == stored["rows"]  # renamed since
    else:
        assert record.prune_kind == stored["kind"] in ("l1", "magnitude")              # renamed since
        assert record.source_kind is None and record.pretrain_dir == str(old_run / "pretrain")
        assert record.lineage["source"]["path"] == str(old_run / "pretrain/epoch_001.pt")
    others = [t for t in (PretrainEpoch, ResumeState, Ticket, FinetunedTicket) if t is not record_type]
    what = {PretrainEpoch: f"a pretraining checkpoint (epoch {record.epoch})",
            ResumeState: f"resume state (last.pt) after epoch {record.epoch}",
            Ticket: f"a ticket ({getattr(record, 'prune_kind', '')})",
            FinetunedTicket: f"a fine-tuned ticket ({getattr(record, 'finetune_mode', '')})"}[record_type]
    with pytest.raises(UserError, match=re.escape(f"{what}, not ")):
        load(old_run / name, tuple(others))


def test_the_stages_carry_on_from_files_written_by_4da787e_and_record_their_kinds(old_run, tmp_path):
    cfg = tmp_path / "c.yaml"   # the config the files were made with, on this machine's data
    config = yaml.safe_load((OLD / "config.yaml").read_text())
    cfg.write_text(yaml.safe_dump({**config, "data": {**config["data"], "root": str(DATA)}}))
    args = ["--config", str(cfg), "--run-dir", str(old_run)]
    stage("04_finetune").main([*args, "--ticket", str(old_run / "prune_l1_p50/ticket.pt"),  # an old ticket, old epoch
                               "--set", "finetune.mode=rewind", "--set", "finetune.rewind_epoch=1",
                               "--set", "finetune.schedule_from=fresh"])
    old_final = old_run / "finetune_l1_p50_finetune/final.pt"
    stage("03_prune").main([*args, "--from", str(old_final), "--tag", "l1_it2"])  # an old fine-tuned ticket
    new = tmp_path / "new"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(new)])
    written = {"finetune_l1_p50_rewind_k1/final.pt": "finetuned_ticket", "finetune_l1_p50_rewind_k1/last.pt":
               "resume_state", "prune_l1_it2/ticket.pt": "ticket"}
    assert {name: torch.load(old_run / name, weights_only=True)["kind"] for name in written} == written
    assert {name: torch.load(new / name, weights_only=True)["kind"] for name in ("pretrain/epoch_000.pt",
            "pretrain/epoch_001.pt", "pretrain/last.pt")} == {"pretrain/epoch_000.pt": "pretrain_epoch",
                                                              "pretrain/epoch_001.pt": "pretrain_epoch",
                                                              "pretrain/last.pt": "resume_state"}
    result = json.loads((old_run / "finetune_l1_p50_rewind_k1/result.json").read_text())
    assert result["lineage"]["rewind"]["path"] == str(old_run / "pretrain/epoch_001.pt") and result["kind"] == "l1"
    again = load(old_run / "prune_l1_it2/ticket.pt", Ticket)
    first = load(old_final, FinetunedTicket)
    assert again.source_kind == "finetuned_ticket" and again.pretrain_sha256 == first.pretrain_sha256
    assert all(set(again.kept[b].tolist()) <= set(first.kept[b].tolist()) for b in first.kept)
    # a ticket pruned from a fine-tuned one is remade from it (its recorded source kind says so)
    old_final.write_bytes(old_final.read_bytes() + b"\0")
    remade = rf"remake it: .*03_prune.py .*--from {re.escape(str(old_final))} --tag l1_it2 --force"
    with pytest.raises(UserError, match=rf"{re.escape(str(old_final))} changed since .*{remade}"):
        stage("04_finetune").main([*args, "--ticket", str(old_run / "prune_l1_it2/ticket.pt")])


# ------------------------------------------------------------------ 4: atomic writes
SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
from common.checkpoint import PretrainEpoch, save
print("ready", flush=True)
i = 0
while True:
    i += 1
    save(PretrainEpoch(model={{"w": torch.full((200_000,), float(i))}}, arch={{}}, epoch=i), {path!r})
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
            ck = load(path, PretrainEpoch)
            assert torch.all(ck.model["w"] == ck.epoch)  # complete and self-consistent
    assert path.exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    good = saved(tmp_path, "pretrain/epoch_002.pt")
    before = good.read_bytes()
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="epoch_002.pt: cannot write .No space left on device.") as e:
        save(PretrainEpoch(model={"w": torch.zeros(3)}, arch={}, epoch=3), good)
    assert "\n" not in str(e.value) and good.read_bytes() == before
    assert [p.name for p in good.parent.iterdir()] == ["epoch_002.pt"]  # no temp file left behind


def test_a_real_full_filesystem_is_one_line_and_keeps_the_previous_file(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        save(PretrainEpoch(model={"w": torch.ones(10)}, arch={}, epoch=0), small / "ck.pt")
        before = (small / "ck.pt").read_bytes()
        with pytest.raises(UserError, match=r"ck\.pt: cannot write \(No space left on device\)") as e:
            save(PretrainEpoch(model={"w": torch.ones(200_000)}, arch={}, epoch=1), small / "ck.pt")  # 800 kB, 256 kB
        assert "\n" not in str(e.value) and (small / "ck.pt").read_bytes() == before
        assert [p.name for p in small.iterdir()] == ["ck.pt"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save(PretrainEpoch(model={}, arch={}, epoch=0), tmp_path / "a.pt")
        write_text_atomic("x", tmp_path / "b.txt")
        open(tmp_path / "plain", "w").close()  # what an ordinary open gives: the reference
    finally:
        os.umask(old)
    for name in ("a.pt", "b.txt", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
