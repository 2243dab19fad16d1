"""The `openset` console script: one subcommand per job (serve, export, bench, train-demo, eval-demo).

Each subcommand lives next to the code it drives and registers itself through an
`add_command(subparsers)` function (adding one or more subcommands) listed in `COMMANDS` below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that define `add_command(subparsers) -> None`; each adds one subcommand whose parser
# sets `func` to the callable that runs it (returning an exit status).
COMMANDS: list[str] = ["service.serve_command", "export.commands", "models.demo.commands"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openset",
        description="OpenSet: open-vocabulary segmentation, referring, captioning and retrieval serving.",
    )
    subparsers = parser.add_subparsers(title="subcommands", metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
