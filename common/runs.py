"""Run folders: one writer at a time, refuse to clobber a finished stage, CSV metrics, the saved config."""
from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from common.checkpoint import ResumeState, cannot_write, load, write_text_atomic
from common.config import Config
from common.cli import python_command
from common.errors import UserError


# ------------------------------------------------------------------ one writer per stage folder
LOCK_FILE = ".lock"   # FOLDER/.lock: {"pid", "host", "since"} of the stage writing FOLDER now
_held: list[tuple[Path, str, list[Path]]] = []  # (lock, its text, folders made for it) of the running main


def unlocks_at_end(main):
    """A stage's `main`: every lock `lock_stage_dir` took in it is given back when it returns or raises."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        depth = len(_held)
        try:
            return main(*args, **kwargs)
        finally:
            while len(_held) > depth:
                _release(*_held.pop())
    return run


def lock_stage_dir(folder: Path, env=None):
    """Hold FOLDER/.lock until the stage's main ends (`unlocks_at_end`), rank 0 alone (`env` None:
    one process). A folder another live process is writing is refused in one line naming it (pid,
    host, since when); a lock whose process is gone (killed on this host) is taken over with one
    line. A lock from another host is honoured: its process cannot be checked from here. Folders
    made for the lock are removed again at the end if the stage wrote nothing into them."""
    from common.dist import agreed  # torch: a stage locks once its config has been checked
    with agreed(env, f"locking {folder}"):
        if env is None or env.is_main:
            _held.append(_acquire(Path(folder)))


def _acquire(folder: Path) -> tuple[Path, str, list[Path]]:
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if left empty
    lock = folder / LOCK_FILE
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now().isoformat(sep=" ", timespec="seconds")})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                _take_over_if_gone(lock)   # raises while its holder lives
                continue
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            return lock, mine, made
    except OSError as e:
        _remove_empty(made)
        raise cannot_write(folder, e) from None
    except BaseException:
        _remove_empty(made)
        raise


def _holder(lock: Path) -> dict | None:
    """The lock's {"pid", "host", "since"}; None once it is gone. A lock being written (created,
    not yet filled) is read again for up to a second."""
    for _ in range(20):
        try:
            return json.loads(lock.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            time.sleep(0.05)
    return {"pid": "?", "host": "?", "since": f"{datetime.fromtimestamp(lock.stat().st_mtime):%Y-%m-%d %H:%M:%S}"}


def _running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):  # another user's process, or a pid we cannot read: alive
        return True
    return True


def _take_over_if_gone(lock: Path):
    """Remove a lock whose process is gone (one line saying so); raise while its holder may still write."""
    holder = _holder(lock)
    if holder is None:
        return  # given back meanwhile: try again
    who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    if holder["host"] != socket.gethostname():
        raise UserError(f"{lock.parent} is being written by {who} (another host, so its process cannot be "
                        f"checked from here); if that process has ended, delete {lock}")
    if _running(holder["pid"]):
        raise UserError(f"{lock.parent} is being written by {who}; wait for it to end, or write elsewhere "
                        f"(another --run-dir or --tag); if pid {holder['pid']} is no stage of yours, delete {lock}")
    taken = lock.with_name(f"{LOCK_FILE}.{os.getpid()}")
    try:
        os.rename(lock, taken)   # atomic: of two takers, one moves it
    except FileNotFoundError:
        return
    if _holder(taken) != holder:  # another taker's fresh lock, moved by mistake: put it back
        os.rename(taken, lock)
        return
    taken.unlink()
    print(f"note: {lock} was left by {who}, which is no longer running; taking it over", file=sys.stderr)


def _release(lock: Path, mine: str, made: list[Path]):
    try:
        if lock.read_text() == mine:  # ours still (not deleted by hand and taken by another)
            lock.unlink()
    except FileNotFoundError:
        pass
    _remove_empty(made)


def _remove_empty(folders: list[Path]):
    """The folders made for a lock, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def outputs(path: Path) -> list[Path]:
    """What a stage folder holds besides its lock."""
    return [p for p in path.iterdir() if p.name != LOCK_FILE] if path.is_dir() else []


# ------------------------------------------------------------------ a stage folder's state
def check_stage_dir(path: Path, resume: bool, force: bool, is_main: bool = True) -> bool:
    """True when resuming. A folder holding outputs needs --resume (continue) or --force (start
    over; cleared later by `clear_stage_dir`, once every input has been checked). Also proves the
    folder writable now, so a permission problem is one line before any work is done."""
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    if resume:
        if not (path / "last.pt").is_file():
            raise UserError(f"--resume: {path / 'last.pt'} does not exist, nothing to resume")
    elif outputs(path) and not force:
        resumable = "pass --resume to continue, " if (path / "last.pt").is_file() else "no last.pt to resume; pass "
        raise UserError(f"{path} already holds outputs; {resumable}--force to start over"
                        f"{' or --tag to write beside it' if path.name.startswith('finetune_') else ''}")
    if is_main:
        check_writable(path)
    return resume


def check_writable(folder: Path):
    """Prove that files can be made in `folder` now, creating nothing: a missing folder is tried in
    its nearest existing parent, where the first write will create it. So a stage that fails
    before writing leaves no empty folder behind, and never touches one that was there before."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise cannot_write(folder, e) from None


def finished_before(out: Path, last_output: str) -> bool:
    """--resume of a run with no epoch left (rank 0 asks): True when it also wrote `last_output`,
    its final file, so the stage returns at once and every file stays as it is (comm.json's
    measured bytes above all). Without that file the run was stopped just before writing it, and
    the stage finishes it."""
    if not (out / last_output).is_file():
        return False
    print(f"{out}: already finished ({last_output} written, no epoch left); nothing to resume")
    return True


def clear_stage_dir(path: Path):
    """--force: remove the old outputs (not the lock); call only after every input and setting has been validated."""
    for p in outputs(path):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    path.mkdir(parents=True, exist_ok=True)


def write_csv(rows: list[dict], path: Path):
    """Rewrite the whole (small) CSV atomically; columns are the union of the rows' keys, in order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(buf.getvalue(), path)


def save_config(cfg_dict: dict, path: Path):
    write_text_atomic(yaml.safe_dump(cfg_dict, sort_keys=False), path)


def flat(cfg: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} → {'a.b': 1}."""
    out = {}
    for k, v in cfg.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differing_keys(saved: dict, now: dict) -> list[str]:
    a, b = flat(saved), flat(now)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_resume_config(saved: dict, now: dict, path: Path, section: str):
    """A run resumes only under the config it was made with (a key the code has gained since,
    left at its default, counts as the same). Two exceptions: the `dist` section
    (timeouts, threads) is about the machine, not the experiment; and `SECTION.epochs` may change
    under the constant schedule only: cosine and step schedules are functions of the total step
    count, so a longer run would follow another curve than its config.yaml says."""
    defaults, old = flat(Config().to_dict()), flat(saved)
    diff = [k for k in differing_keys(saved, now) if not k.startswith("dist.")   # a key the code gained since, at
            and not (k not in old and k in defaults and flat(now).get(k) == defaults[k])]  # its default: the same run
    if f"{section}.epochs" in diff and now[section]["schedule"] == "constant":
        diff.remove(f"{section}.epochs")
    if f"{section}.epochs" in diff:
        raise UserError(f"--resume: {section}.epochs was {saved[section]['epochs']} when {path} was made, now "
                        f"{now[section]['epochs']}; the {now[section]['schedule']} learning-rate schedule spans all "
                        "epochs, so it would change mid-run (only schedule: constant can be extended); "
                        "use --force to start over")
    if diff:
        raise UserError(f"--resume: {path} was made with a different config ({', '.join(diff)}); "
                        "use --force to start over")


def finished(out: Path, *next_commands: str):
    """A stage's last lines: where it wrote (TensorBoard reads the same folder) and what to run next."""
    tensorboard = Path(python_command()).with_name("tensorboard")  # the one installed beside this Python
    print(f"wrote {out}/  (scalars: {tensorboard if tensorboard.is_file() else 'tensorboard'} --logdir {out.parent})")
    for command in next_commands:
        print(f"next: {command}")


def check_analysis_dir(path: Path, now: dict, keys: tuple[str, ...], force: bool):
    """An analysis folder is recomputed freely under the same settings, but one made under other
    `keys` (dotted names or section prefixes) is replaced only with --force."""
    saved_file = path / "config.yaml"
    if saved_file.is_file() and not force:
        saved = yaml.safe_load(saved_file.read_text()) or {}
        diff = [k for k in differing_keys(saved, now) if k.startswith(keys)]
        if diff:
            shown = ", ".join(f"{k}={flat(saved).get(k)!r}" for k in diff)
            raise UserError(f"{path} holds results made with {shown}; pass --tag NAME to write beside it "
                            "or --force to replace it")
    check_writable(path)


def _checked_resume_state(path: Path, config: dict, section: str) -> ResumeState:
    ck = load(path, ResumeState)
    check_resume_config(ck.config, config, path, section=section)
    return ck


def resume_point(out: Path, trainer, cfg, section: str) -> tuple[ResumeState, int, list]:
    """The one resume of a training stage (01, 04): OUT/last.pt, checked to be made under this
    config, loaded into `trainer` (weights, optimizer, counters). Returns (the checkpoint, the
    epoch to continue with, the metrics rows so far). Rank 0 reads it and hands it to the other
    ranks, which need not see the run folder (no shared file system across nodes)."""
    from common.dist import on_main  # torch: imported once a stage's config has been checked
    path = out / "last.pt"
    ck = on_main(trainer.env, f"reading {path}", _checked_resume_state, path, cfg.to_dict(), section)
    trainer.load_state_dict(ck.trainer, weights=ck.model)
    return ck, ck.epoch + 1, list(ck.rows)
