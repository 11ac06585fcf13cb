"""One writer per stage folder (common/runs.py lock_stage_dir): a second run into a folder that
another process is writing exits 2 naming it (pid, host, since when); a lock left by a process
killed with SIGKILL is taken over with one line; another host's lock is honoured."""
import json
import signal
import socket
import subprocess
import time

import pytest
import yaml

from common.errors import UserError
from conftest import pruned_lineage, run_cli, stage, start_cli


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "[WARNING]" not in l]


def main_of(script, cfg, run, *extra):
    stage(script).main(["--config", str(cfg), "--run-dir", str(run), *extra])


def wait_for(ready, process, seconds=300):
    t0 = time.time()
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.time() - t0 < seconds
        time.sleep(0.1)


def test_a_second_run_exits_2_naming_the_first_and_a_killed_runs_lock_is_taken_over(tiny_config, tmp_path, capfd):
    cfg, run = tiny_config(pretrain={"epochs": 500}), tmp_path / "race"
    lock = run / "pretrain/.lock"
    first = start_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(run)])
    try:
        wait_for(lambda: (run / "pretrain/epoch_000.pt").is_file(), first)   # the first is writing
        second = run_cli(["01_pretrain_loft.py", "--config", str(cfg), "--run-dir", str(run), "--set", "seed=1"])
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)                                     # kill -9: its lock stays behind
        first.wait()
    lines = error_lines(second.stderr)
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"{run / 'pretrain'} is being written by pid {first.pid} on {socket.gethostname()} since " in lines[0]
    assert yaml.safe_load((run / "pretrain/config.yaml").read_text())["seed"] == 0  # nothing of the second's
    assert json.loads(lock.read_text())["pid"] == first.pid

    capfd.readouterr()
    main_of("01_pretrain_loft", cfg, run, "--force", "--set", "seed=1", "--set", "pretrain.epochs=1")
    notes = [l for l in capfd.readouterr().err.splitlines() if "taking it over" in l]
    assert len(notes) == 1 and f"pid {first.pid} on {socket.gethostname()}" in notes[0], notes
    assert "no longer running" in notes[0]
    assert not lock.exists()                                                   # given back at the end
    assert yaml.safe_load((run / "pretrain/config.yaml").read_text())["seed"] == 1
    assert sorted(p.name for p in (run / "pretrain").glob("epoch_*.pt")) == ["epoch_000.pt", "epoch_001.pt"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    return pruned_lineage(tmp_path_factory.mktemp("locks"), {"pretrain": {"epochs": 1},
                                                             "finetune": {"epochs": 1, "batch_size": 32}})


def hold(folder, pid, host):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"pid": pid, "host": host, "since": "2024-05-01 09:30:00"}))


@pytest.mark.parametrize("script, folder, extra", [
    ("01_pretrain_loft", "pretrain", ["--resume"]),
    ("02_filter_distance", "distance", []),
    ("03_prune", "prune_l1_p50", ["--force"]),
    ("04_finetune", "finetune_l1_p50_finetune", []),
])
def test_every_stage_refuses_a_folder_another_live_process_is_writing(pruned, script, folder, extra):
    cfg, run = pruned
    other = subprocess.Popen(["sleep", "60"])
    try:
        hold(run / folder, other.pid, socket.gethostname())
        before = {p.name: p.read_bytes() for p in (run / folder).iterdir()}
        with pytest.raises(UserError, match=rf"is being written by pid {other.pid} on {socket.gethostname()} "
                                            r"since 2024-05-01 09:30:00; wait for it to end"):
            main_of(script, cfg, run, *extra)
        assert {p.name: p.read_bytes() for p in (run / folder).iterdir()} == before  # its lock and files as they were
    finally:
        other.kill()
        other.wait()
        (run / folder / ".lock").unlink()


def test_another_hosts_lock_is_honoured_and_a_finished_stage_gives_its_lock_back(pruned):
    cfg, run = pruned
    hold(run / "prune_x", 4242, "node-elsewhere")
    with pytest.raises(UserError, match=r"by pid 4242 on node-elsewhere since 2024-05-01 09:30:00 \(another host.*"
                                        r"delete .*prune_x/\.lock"):
        main_of("03_prune", cfg, run, "--tag", "x")
    (run / "prune_x/.lock").unlink()
    main_of("03_prune", cfg, run, "--tag", "x")
    assert sorted(p.name for p in (run / "prune_x").iterdir() if not p.name.startswith("events")) == \
        ["config.yaml", "ticket.pt"]
