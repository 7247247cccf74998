"""``python -m labkit.localapi``: run the local API (what LocalAPIServer starts).

The flags are :mod:`.options`'s, the same as ``labkit local-api``'s.
"""

from __future__ import annotations

import sys

from ..errors import LabkitError
from .options import run


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except LabkitError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
