"""Entry-point wrapper: a `UserError` becomes one line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys

from common.errors import UserError


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
