"""The `visto` command. Thin: each sub-command lives in `visto/commands/<name>.py`.

A command module defines `ORDER` (its place in `--help`), `register(subparsers)` which adds
its parser and sets `run=<function(args) -> int | None>`. Modules import heavy libraries
(torch, lancedb, ...) inside their run functions so that `visto --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rich_argparse import RawDescriptionRichHelpFormatter

import visto
import visto.commands
from visto.errors import UserError

DESCRIPTION = """\
visto builds, trains, evaluates and serves vision-language models,
end to end, offline, on a laptop CPU.

Start here:
  visto quickstart                 the whole pipeline on the built-in synthetic world
  visto data synth --out runs/world --n 2000
  visto data show runs/world       look at the data before you train on it
  visto <command> --help           every command explains its options and shows examples
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visto", description=DESCRIPTION, formatter_class=RawDescriptionRichHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"visto {visto.__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    modules = [
        importlib.import_module(f"visto.commands.{m.name}")
        for m in pkgutil.iter_modules(visto.commands.__path__)
        if not m.name.startswith("_")
    ]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        code = args.run(args)
    except UserError as e:
        print(f"visto: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visto: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
