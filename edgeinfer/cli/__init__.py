"""`edgeinfer` command line: a thin layer over the Python API.

Each subcommand lives in edgeinfer/cli/<name>.py and exposes `register(subparsers)`;
the handler it sets returns an exit code. Flags shared by several subcommands are
defined once, in edgeinfer/cli/args.py. A failure the user causes (an EdgeInferError)
is printed as one line and exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from edgeinfer.errors import EdgeInferError

COMMANDS = ("export", "generate", "chat", "inspect", "bench", "devices")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeinfer",
        description="Run large language models on devices that cannot hold them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"cli.{name}"):
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except EdgeInferError as exc:
        print(f"edgeinfer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgeinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
