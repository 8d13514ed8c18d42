"""Helpers shared by command modules."""

from __future__ import annotations

import argparse

from rich_argparse import RawDescriptionRichHelpFormatter


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A sub-command parser whose --help shows `description` (with its examples) verbatim."""
    return sub.add_parser(
        name, help=help, description=description, formatter_class=RawDescriptionRichHelpFormatter
    )
