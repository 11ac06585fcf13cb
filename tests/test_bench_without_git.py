"""bench/ runs where `git` is not installed (the lent GPU machine): the commit stamp is "unknown"."""
import shutil
import subprocess
import sys

from conftest import REPO


def test_the_commit_stamp_is_unknown_with_one_note_where_git_is_absent(tmp_path):
    (tmp_path / "bin").mkdir()  # PATH holds no git (python is called by its full path)
    code = "import sys; sys.path.insert(0, 'bench'); from lib import machine; print(machine())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PATH": str(tmp_path / "bin")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("commit unknown")
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "git" in notes[0] and "Traceback" not in r.stderr
    if shutil.which("git") and (REPO / ".git").exists():  # with git, the real hash
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        with_git = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert with_git.stdout.strip().endswith(f"commit {head.stdout.strip()}")
