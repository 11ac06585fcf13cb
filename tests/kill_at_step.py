"""Run a stage script and SIGKILL its whole process group at the start of training step
$KILL_AT_STEP: a crash at a chosen point of the run, however fast the machine is (a timed kill
can come after a fast GPU has finished). Used by tests/test_faults.py, as
    python tests/kill_at_step.py 01_pretrain_loft.py --config ...      (or as the launcher's script)
"""
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.train import SGDStep  # noqa: E402

KILL_AT_STEP = int(os.environ["KILL_AT_STEP"])
step = SGDStep.__call__


def step_or_die(self, t, chunks):
    if t == KILL_AT_STEP:
        os.killpg(os.getpgrp(), signal.SIGKILL)  # the launcher and every rank, as kill -9 of the job
    return step(self, t, chunks)


SGDStep.__call__ = step_or_die
args = sys.argv[1:]
script = next(a for a in args if not a.startswith("--local_rank"))  # the launcher puts its flag first
args.remove(script)
sys.argv = [script] + args
runpy.run_path(script, run_name="__main__")
