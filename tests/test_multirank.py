"""Ranks under a launcher (gloo on the CPU, two processes started by hand with a free port, as a
launcher would): data prepared once per node, rank 0's failures shared, a resume where rank 1
cannot see the run folder, mpirun/srun rank variables, dist.deterministic both ways."""
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from common.dist import configure_kernels, launcher_ranks
from common.errors import UserError
from conftest import CPU_RANKS, DATA, REPO, TINY, _merge, free_port, stage

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def start_ranks(script, args_of_rank, rank_env=None, world=2):
    """`world` processes running `script` (a file) with args_of_rank(r); each told its rank the way
    torchrun does (RANK, ...) unless rank_env(r, port) gives the variables."""
    port = str(free_port())
    procs = []
    for r in range(world):
        ranks = rank_env(r, port) if rank_env else {
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **ranks}
        procs.append(subprocess.Popen([sys.executable, str(script), *args_of_rank(r)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=300):
    """[(exit code, stdout, stderr, seconds from start to exit)] of every process."""
    t0, ended = time.time(), {}
    while len(ended) < len(procs):
        if time.time() - t0 > timeout:
            for p in procs:
                p.kill()
            outputs = [p.communicate() for p in procs]
            raise AssertionError(f"ranks still running after {timeout} s; their output: {outputs}"[-4000:])
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.time() - t0
        time.sleep(0.05)
    return [(p.returncode, *p.communicate(), ended[i]) for i, p in enumerate(procs)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def write_config(path, **overrides):
    path.write_text(yaml.safe_dump(_merge(TINY, {"dist": CPU_RANKS, **overrides})))
    return path


# ----------------------------------------------------------------------------- 1: data preparation
PREPARE = '''
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torchvision
from common.config import load_config
from common.dist import setup_distributed, teardown
from common.evaluation import load_splits

class FakeDownload:  # torchvision.datasets.CIFAR10(root, train, download): a slow copy of the release into root
    def __init__(self, root, train, download):
        with open({log!r}, "a") as f:
            f.write(os.environ["RANK"] + "\\n")
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir()
        for source in sorted(Path({source!r}).iterdir()):
            time.sleep(0.3)  # a rank that did not wait would find a half-made folder, or none
            (folder / source.name).symlink_to(source)

torchvision.datasets.CIFAR10 = FakeDownload
env = setup_distributed(device="cpu", threads_per_rank=1)
train, test, _ = load_splits(load_config({config!r}, []), env)
print("rank", env.rank, "local", env.local_rank, "of", env.world, "images", len(train), len(test))
print("nccl", os.environ["TORCH_NCCL_BLOCKING_WAIT"], os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"])
teardown(env)
'''


def test_only_local_rank_0_downloads_the_data_the_other_rank_waits_and_mpirun_variables_work(tmp_path):
    """Two ranks started the way mpirun starts them (OMPI_COMM_WORLD_* only): the download (a patched
    torchvision class copying the real release slowly) runs once, on local rank 0; rank 1 reads the
    finished folder; no temporary folder is left; the NCCL variables are set."""
    root = tmp_path / "data"
    log = tmp_path / "downloads.log"
    cfg = write_config(tmp_path / "c.yaml", data={**TINY["data"], "root": str(root)})
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE.format(repo=str(REPO), log=str(log), source=str(DATA / "cifar-10-batches-py"),
                                     config=str(cfg)))

    def mpirun(r, port):
        return {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}

    results = finish(start_ranks(script, lambda r: [], rank_env=mpirun))
    for r, (code, out, err, _) in enumerate(results):
        assert code == 0, err[-2000:]
        assert f"rank {r} local {r} of 2 images 640 200" in out
        assert "nccl 1 1" in out  # the NCCL error handling is set before the process group (docs/multigpu.md)
    assert log.read_text().split() == ["0"]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]


def test_a_failed_preparation_on_rank_0_ends_both_ranks_with_one_line_each(tmp_path):
    """data.root holds a CIFAR-10 folder without data_batch_3: rank 0's check refuses it naming the
    file, and rank 1, waiting for it, ends at once with one line naming rank 0's error."""
    folder = tmp_path / "data/cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (DATA / "cifar-10-batches-py").iterdir():
        if f.name != "data_batch_3":
            (folder / f.name).symlink_to(f)
    cfg = write_config(tmp_path / "c.yaml", data={**TINY["data"], "root": str(tmp_path / "data")},
                       dist={**CPU_RANKS, "timeout_s": 120})
    results = finish(start_ranks(REPO / "01_pretrain_loft.py",
                                 lambda r: ["--config", str(cfg), "--run-dir", str(tmp_path / "run")]))
    for code, _, err, _ in results:
        assert code == 2 and "Traceback" not in err, err[-2000:]
        lines = error_lines(err)
        assert len(lines) == 1 and "no data_batch_3" in lines[0], err[-2000:]
    assert error_lines(results[1][2])[0].startswith("error: rank 0 failed preparing data.root=")
    assert abs(results[0][3] - results[1][3]) < 30  # together, not rank 1 after dist.timeout_s


# ------------------------------------------------------------------------ 2: rank 0 fails saving
FAIL_SAVE = '''
import errno, os, runpy, sys
sys.path.insert(0, {repo!r})
import common.checkpoint as checkpoint
real = checkpoint._write_atomic

def full_disk_on_rank_0(path, write):  # the atomic writer meets a full disk writing epoch_001.pt on rank 0
    if os.environ["RANK"] == "0" and os.path.basename(path) == "epoch_001.pt":
        def write(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(path, write)

checkpoint._write_atomic = full_disk_on_rank_0
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_rank_0_failing_in_its_save_ends_both_ranks_promptly_with_one_line_each(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", dist={**CPU_RANKS, "timeout_s": 120})
    script = tmp_path / "fail_save.py"
    script.write_text(FAIL_SAVE.format(repo=str(REPO)))
    run = tmp_path / "run"
    results = finish(start_ranks(script, lambda r: [str(REPO / "01_pretrain_loft.py"), "--config", str(cfg),
                                                    "--run-dir", str(run)]))
    (code0, _, err0, t0), (code1, _, err1, t1) = results
    assert code0 != 0 and code1 != 0
    assert "Traceback" not in err0 + err1, (err0 + err1)[-3000:]
    lines0, lines1 = error_lines(err0), error_lines(err1)
    assert len(lines0) == 1 and "epoch_001.pt: cannot write (No space left on device)" in lines0[0], err0
    assert len(lines1) == 1 and lines1[0].startswith("error: rank 0 failed saving epoch 1:"), err1
    assert "No space left on device" in lines1[0]
    assert abs(t1 - t0) < 30  # rank 1 learns it at once, not after dist.timeout_s (120 s)
    assert (run / "pretrain/epoch_000.pt").is_file() and not (run / "pretrain/epoch_001.pt").exists()


# ---------------------------------------------------------------- 3: no shared file system, launchers
def test_resume_under_two_ranks_where_rank_1_cannot_see_the_run_folder(tmp_path):
    """Rank 1 is given a run folder that does not exist (its node has no shared file system): the
    2-epoch run and its --resume to epoch 3 (constant schedule) still work, rank 0 alone reading and
    writing; the result is bit for bit the uninterrupted 3-epoch run's."""
    cfg = write_config(tmp_path / "c.yaml", pretrain={**TINY["pretrain"], "schedule": "constant"})
    ref = tmp_path / "ref"
    stage("01_pretrain_loft").main(["--config", str(cfg), "--run-dir", str(ref), "--set", "pretrain.epochs=3"])
    run, unseen = tmp_path / "run", tmp_path / "not_on_this_node"

    def args(extra):
        return lambda r: [*["--config", str(cfg), "--run-dir", str(run if r == 0 else unseen)], *extra]

    for extra in ([], ["--resume", "--set", "pretrain.epochs=3"]):
        results = finish(start_ranks(REPO / "01_pretrain_loft.py", args(extra)))
        for code, out, err, _ in results:
            assert code == 0, (out + err)[-2000:]
    assert "resuming after epoch 2" in results[0][1]
    a = torch.load(ref / "pretrain/epoch_003.pt", weights_only=True)["model"]
    b = torch.load(run / "pretrain/epoch_003.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not unseen.exists()


def test_04_under_two_ranks_resumes_where_rank_1_cannot_see_its_output_folder(tmp_path):
    """04's writes and resume go through rank 0 alone too: rank 1 reads only the ticket (given by
    path) and its output folder does not exist on its side."""
    from conftest import pruned_lineage
    cfg, run = pruned_lineage(tmp_path, {"pretrain": {"epochs": 1}, "dist": CPU_RANKS,
                                         "finetune": {"batch_size": 32, "lr": 0.05, "schedule": "constant"}})
    unseen = tmp_path / "not_on_this_node"

    def args(*extra):
        return lambda r: ["--config", str(cfg), "--run-dir", str(run if r == 0 else unseen), "--ticket",
                          str(run / "prune_l1_p50/ticket.pt"), "--set", "finetune.mode=finetune", *extra]

    for extra in (["--set", "finetune.epochs=1"], ["--resume", "--set", "finetune.epochs=2"]):
        for code, out, err, _ in finish(start_ranks(REPO / "04_finetune.py", args(*extra))):
            assert code == 0, (out + err)[-2000:]
    out = run / "finetune_l1_p50_finetune"
    assert torch.load(out / "final.pt", weights_only=True)["epoch"] == 2
    assert [row["epoch"] for row in torch.load(out / "last.pt", weights_only=True)["rows"]] == [1, 2]
    assert not unseen.exists()


def test_mpirun_and_srun_rank_variables_map_onto_the_launcher_ones():
    master = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    mpi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert launcher_ranks({**mpi, **master}) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                 "LOCAL_WORLD_SIZE": "2"}
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8"}
    assert launcher_ranks({**srun, **master}) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                  "LOCAL_WORLD_SIZE": "4"}
    # DeepSpeed / torchrun already set RANK: their variables win, nothing is mapped
    assert launcher_ranks({**mpi, **master, "RANK": "0"}) == {}
    # a batch script's plain `python` (SLURM variables, no srun step) is one process
    assert launcher_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) == {}
    assert launcher_ranks({}) == {}
    # one srun task needs no rendezvous address
    assert launcher_ranks({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0",
                           "SLURM_STEP_TASKS_PER_NODE": "1"})["WORLD_SIZE"] == "1"
    with pytest.raises(UserError, match="started by mpirun as 4 ranks but MASTER_ADDR / MASTER_PORT") as e:
        launcher_ranks(mpi)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="started by srun but its variables give no LOCAL_WORLD_SIZE"):
        launcher_ranks({**srun, **master, "SLURM_STEP_TASKS_PER_NODE": "4,3"})  # uneven nodes


# --------------------------------------------------------------------------------- 4: determinism
def test_deterministic_is_set_both_ways_in_one_process_and_raises_instead_of_warning(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        configure_kernels(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        configure_kernels(torch.device("cpu"), deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_the_models_global_pool_is_a_mean_with_adaptive_pooling_bits_on_the_cpu():
    """No AdaptiveAvgPool2d left in any model (its CUDA backward raises under dist.deterministic),
    and the mean over (H, W) that replaced it gives adaptive pooling's bits, forward and backward."""
    from common.models import ARCH_NAMES, build_model
    for name in ARCH_NAMES:
        model = build_model({"name": name, "num_classes": 10, "width": 0.125})
        assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules()), name
    gen = torch.Generator().manual_seed(0)
    for shape in [(32, 16, 4, 4), (8, 64, 7, 7), (4, 24, 14, 14)]:
        x = torch.randn(*shape, generator=gen)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        pooled_a = torch.nn.functional.adaptive_avg_pool2d(a, 1)
        pooled_b = b.mean((2, 3), keepdim=True)
        grad = torch.randn(pooled_a.shape, generator=gen)
        pooled_a.backward(grad), pooled_b.backward(grad)
        assert torch.equal(pooled_a, pooled_b) and torch.equal(a.grad, b.grad)
