"""``python -m labkit.localapi``: run the local API (what LocalAPIServer starts)."""

from __future__ import annotations

import argparse
import sys

from ..errors import LabkitError
from .server import add_arguments, options_from_args, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labkit.localapi",
        description="The labkit local API (Anthropic Messages + OpenAI Chat Completions on 127.0.0.1).",
    )
    add_arguments(parser)
    parser.add_argument("--port-file", help="Write the bound port to this file once listening.")
    parser.add_argument("--watch-parent", action="store_true", help="Exit when the parent process exits.")
    args = parser.parse_args(argv)
    try:
        engine, opts = options_from_args(args)
        serve(engine, host=args.host, port=args.port, port_file=args.port_file, watch_parent=args.watch_parent, **opts)
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
