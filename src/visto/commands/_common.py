"""Helpers shared by command modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich_argparse import RawDescriptionRichHelpFormatter


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A sub-command parser whose --help shows `description` (with its examples) verbatim."""
    return sub.add_parser(
        name, help=help, description=description, formatter_class=RawDescriptionRichHelpFormatter
    )


def load_for_inference(path: str | Path, device: str | None, int8: bool) -> Any:
    """visto.load as chat, serve and eval do it: an int8 checkpoint or `--int8` puts the model
    on the CPU unless --device says otherwise (int8 kernels are CPU ones), and `--int8`
    quantizes it (visto.nn.quantize), printing what went int8 to stderr."""
    import visto
    from visto.checkpoint import is_int8_checkpoint
    from visto.device import pick_device

    on_cpu = int8 or is_int8_checkpoint(path)
    model = visto.load(path, device=pick_device(device or ("cpu" if on_cpu else None)))
    if int8:
        from visto.nn.quantize import int8_summary, quantize_int8

        quantize_int8(model)
        print(int8_summary(model), file=sys.stderr)
    return model
