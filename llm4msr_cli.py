"""The `llm4msr` console script.

A thin dispatcher: offline/ and online/ each register their own subcommands, so neither imports the other.
Heavy modules (torch, transformers) are imported inside the command handlers, not here.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from offline.cli import register as register_offline
    from online.cli import register as register_online

    parser = argparse.ArgumentParser(
        prog="llm4msr",
        description="LLM-enhanced multi-scenario recommendation: data, knowledge, training and serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_offline(sub)
    register_online(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a CLI prints one clear line; -v shows the traceback
        from shared.errors import UserFacingError

        if isinstance(exc, UserFacingError) and not args.verbose:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
