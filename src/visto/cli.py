"""The `visto` command. Thin: each sub-command lives in `visto/commands/<name>.py`.

A command module defines `ORDER` (its place in `--help`), `register(subparsers)` which adds
its parser and sets `run=<function(args) -> int | None>`. Modules import heavy libraries
(torch, lancedb, ...) inside their run functions so that `visto --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import threading
from contextlib import contextmanager

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
    with _remember_ctrl_c() as ctrl_c:
        try:
            code = args.run(args)
        except KeyboardInterrupt:
            return _interrupted()
        except Exception as e:
            if ctrl_c.pressed:  # C code that Ctrl-C cut short replaced the KeyboardInterrupt
                return _interrupted()
            if not isinstance(e, UserError):
                raise
            print(f"visto: error: {e}", file=sys.stderr)
            return 2
    return int(code or 0)


class _CtrlC:
    pressed = False


@contextmanager
def _remember_ctrl_c():
    """Ctrl-C raises KeyboardInterrupt as Python's own handler does, and is remembered: a
    library whose C code it interrupts may replace the KeyboardInterrupt by an error of its
    own (torch loading a checkpoint: "could not determine the shape of object type ..."),
    which must still end the command as an interruption, not as a wrong diagnosis."""
    ctrl_c = _CtrlC()
    previous = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is not signal.default_int_handler
    ):
        yield ctrl_c  # someone else's handler (or a thread, where none can be set): theirs
        return

    def on_sigint(signum, frame):
        ctrl_c.pressed = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted() -> int:
    print("visto: interrupted", file=sys.stderr)
    # CPython remembers a KeyboardInterrupt that left code run by exec() (dataclasses build
    # their methods so; Ctrl-C during an import lands there) even when we catch it, and then
    # kills itself with SIGINT at exit instead of exiting with our code (caller sees -2, not
    # 130). Running any exec'd code clears that memory.
    exec("")
    return 130


if __name__ == "__main__":
    sys.exit(main())
