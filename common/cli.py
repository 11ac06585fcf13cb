"""Entry-point wrapper: a `UserError` becomes one line on stderr and exit code 2."""
from __future__ import annotations

import sys

from common.errors import UserError


def run_stage(main, argv=None) -> int:
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
