"""Entry-point wrapper: a `UserError` becomes one line on stderr and exit code 2; so does a
file-system error (no permission, full disk, read-only folder) that escaped the stage's own checks."""
from __future__ import annotations

import errno
import os
import shlex
import sys

from common.config import is_file_callable
from common.errors import UserError

# errors about where files go, not bugs: the user fixes them by freeing space or choosing a folder
FILESYSTEM_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENOTDIR,
                     errno.EISDIR, errno.EEXIST}


def python_command() -> str:
    """The interpreter running this stage, as hints name it: relative to the working folder when it
    lies inside it (`.venv/bin/python` after the README's install), else its full path. Its `python`
    name where that is the same interpreter: under the DeepSpeed launcher sys.executable is the
    `python3` of the launcher script's first line."""
    exe = sys.executable or "python"
    plain = os.path.join(os.path.dirname(exe), "python")
    if os.path.basename(exe) != "python" and os.path.exists(plain) and os.path.samefile(plain, exe):
        exe = plain
    rel = os.path.relpath(exe)
    return exe if rel.startswith("..") else rel


def stage_command(script: str, args, cfg, *extra: str) -> str:
    """The full command line that runs `script` on the same config, run folder and overrides as
    `args` (a parsed stage command line), for hints that say which command makes a missing file.
    It starts with this process's PYTHONPATH when `cfg` (the stage's config) brings its model as
    package.module:callable, which every stage imports from there."""
    words = [python_command(), script, "--config", str(args.config)]
    if args.run_dir:
        words += ["--run-dir", str(args.run_dir)]
    for item in args.set:
        words += ["--set", item]
    path = os.environ.get("PYTHONPATH")
    from_path = path and any(not is_file_callable(name) for name in cfg.importable)
    return (f"PYTHONPATH={shlex.quote(path)} " if from_path else "") + shlex.join(words + list(extra))


def _close_progress_bars():
    """A bar interrupted by the error would otherwise share its terminal line with the message."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def run_stage(main, argv=None) -> int:
    try:
        main(argv)
    except UserError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if isinstance(e, OSError) and e.errno in FILESYSTEM_ERRORS:
            _close_progress_bars()
            print(f"error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
            sys.exit(2)
        from common.dist import is_peer_failure
        rank = os.environ.get("RANK")
        if rank is None or not is_peer_failure(e):
            raise
        _close_progress_bars()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"error: rank {rank}: a collective failed — another rank died, hung past dist.timeout_s or lost "
              f"its connection ({first}); checkpoints on disk are intact, rerun with --resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)  # leave at once: interpreter shutdown could wait on the broken process group
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
