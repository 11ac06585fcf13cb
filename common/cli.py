"""Entry-point wrapper: a `UserError` becomes one line on stderr and exit code 2."""
from __future__ import annotations

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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
