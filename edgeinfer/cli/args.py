"""The flags several subcommands share, defined once so that one flag means one thing
everywhere: -m/--model the model folder, -t/--threads compute threads (--io-threads
for reads), --json JSON on stdout (--json-file FILE writes a file), -n/--max-new-tokens the tokens to generate,
--verify a checksum mode from VERIFY_MODES."""
from __future__ import annotations

import argparse

from edgeinfer.errors import InvalidArgumentError
from edgeinfer.runtime.options import VERIFY_MODES

# The model folder given positionally (edgeinfer bench MODEL_DIR), kept beside -m.
LEGACY_MODEL = "legacy_model"


def add_model(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    p.add_argument("-m", "--model", default=None, metavar="MODEL_DIR",
                   help="model folder written by `edgeinfer export` (default: the built-in demo model)")
    if positional:
        p.add_argument(LEGACY_MODEL, nargs="?", default=None, metavar="MODEL_DIR", help=argparse.SUPPRESS)


def model_of(args) -> str | None:
    """The model folder from -m or the positional spelling; both at once must agree."""
    legacy = getattr(args, LEGACY_MODEL, None)
    if args.model is not None and legacy is not None and args.model != legacy:
        raise InvalidArgumentError(f"two model folders given ({legacy} and -m {args.model}): give one, with -m")
    return args.model if args.model is not None else legacy


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="compute threads (default: all cores)")


def add_json(p: argparse.ArgumentParser, what: str = "the output", *, file: bool = False) -> None:
    """--json prints JSON on stdout; with file=True also --json-file FILE (writes FILE)."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")
    if file:
        p.add_argument("--json-file", default=None, metavar="FILE", help=f"also write {what} as JSON to FILE")


def add_max_new_tokens(p: argparse.ArgumentParser, default: int, what: str) -> None:
    p.add_argument("-n", "--max-new-tokens", "--new-tokens", dest="max_new_tokens", type=int, default=default,
                   metavar="N", help=f"{what} (default {default})")


def add_verify(p: argparse.ArgumentParser, default: str, what: str) -> None:
    """--verify MODE; a bare --verify means "full"."""
    p.add_argument("--verify", nargs="?", const="full", default=default, choices=VERIFY_MODES,
                   help=f"{what}: full (every file's crc32), sampled (a few tensors per file) or none; "
                        f"a bare --verify is full (default {default})")
