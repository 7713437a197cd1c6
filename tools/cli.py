"""The `shadowplex` command line (the requester side). Skeleton: only `demo` and `--version`."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

PROG = "shadowplex"


def _version() -> str:
    try:
        return version("shadowplex")  # single source: pyproject.toml [project] version
    except PackageNotFoundError:
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """Usage errors: exit 2 with exactly one line on stderr, no usage dump, no traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (try '{PROG} --help')\n")


def _cmd_demo(args: argparse.Namespace) -> int:
    print("demo: not built yet")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Linux user-space snapshot provider (VSS-like).")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demonstration")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
