"""Run folders: refuse to clobber a finished stage, CSV metrics, the saved config."""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import yaml

from common.checkpoint import write_text_atomic
from common.errors import UserError


def prepare_stage_dir(path: Path, resume: bool, force: bool, is_main: bool) -> bool:
    """True when resuming. A folder holding outputs needs --resume (continue) or --force (start over)."""
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    if resume:
        if not (path / "last.pt").is_file():
            raise UserError(f"--resume: {path / 'last.pt'} does not exist, nothing to resume")
        return True
    if path.exists() and any(path.iterdir()):
        if not force:
            raise UserError(f"{path} already holds outputs; pass --resume to continue or --force to start over")
        if is_main:
            shutil.rmtree(path)
    return False


def write_csv(rows: list[dict], path: Path):
    """Rewrite the whole (small) CSV atomically; columns are the union of the rows' keys, in order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(buf.getvalue(), path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_config(cfg_dict: dict, path: Path):
    write_text_atomic(yaml.safe_dump(cfg_dict, sort_keys=False), path)


def check_resume_config(saved: dict, now: dict, path: Path, section: str):
    """A run resumes only under the config it was made with (its epoch count may grow; the
    `dist` section — timeouts, threads — is about the machine, not the experiment)."""
    saved = {**saved, section: {**saved[section], "epochs": now[section]["epochs"]}, "dist": now["dist"]}
    if saved != now:
        diff = [f"{sec}.{k}" if isinstance(now[sec], dict) else sec
                for sec in now for k in (now[sec] if isinstance(now[sec], dict) else [None])
                if _value(saved, sec, k) != _value(now, sec, k)]
        raise UserError(f"--resume: {path} was made with a different config ({', '.join(sorted(diff))}); "
                        "use --force to start over")


def _value(cfg: dict, section: str, key):
    node = cfg.get(section)
    return node.get(key) if isinstance(node, dict) else node
