"""Expert models a vision-language model can call as tools (OCR, segment, detect), and the
registry that holds them.

    from visto.tools import default_registry, load_tools
    tools = load_tools("ocr")                       # built-ins by name
    tools = load_tools("ocr,my_pkg.tools:brightness")   # plus your own Tool objects
    tools = load_tools("segment,detect")            # a clipseg checkpoint (runs/clipseg-synth)
    tools = load_tools("segment=runs/seg/checkpoint")   # ... or the one you name
    tools.run("ocr", "{}", image).text              # the result as the model reads it

See registry.py for adding a tool in a few lines.
"""

from __future__ import annotations

import importlib

from visto.errors import UserError
from visto.tools.registry import (
    NO_ARGUMENTS,
    Tool,
    ToolOutput,
    ToolRegistry,
    ToolResult,
    argument_problems,
)


def default_registry() -> ToolRegistry:
    """The built-in experts: `ocr` (PP-OCRv4, offline), `segment` and `detect` (a clipseg
    checkpoint at visto.tools.clipseg.DEFAULT_CHECKPOINT, loaded on the first call). Each runs
    in a tool process of its own (Tool.process: "ocr", "clipseg"), killed at a call's timeout."""
    from visto.tools.clipseg import detect_tool, segment_tool
    from visto.tools.ocr import ocr_tool

    return ToolRegistry([ocr_tool, segment_tool(), detect_tool()])


def load_tools(spec: str) -> ToolRegistry:
    """Tools from a comma-separated list: built-in names, `segment=CKPT` / `detect=CKPT` for a
    clipseg checkpoint of yours, and `module:attribute` naming a `Tool` (or a `ToolRegistry`,
    all of whose tools are taken) that Python can import. A clipseg checkpoint is checked now."""
    from visto.tools.clipseg import EXPERT_TOOLS, expert_tool

    builtin, chosen = default_registry(), ToolRegistry()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, path = item.partition("=")
        if name.strip() in EXPERT_TOOLS:
            chosen.add(expert_tool(name.strip(), path.strip() or None))
            continue
        if eq:
            raise UserError(f"{item!r}: only {' and '.join(EXPERT_TOOLS)} take a checkpoint "
                            "(NAME=CKPT)")  # fmt: skip
        if ":" not in item:
            chosen.add(builtin.get(item))
            continue
        module_name, _, attribute = item.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise UserError(f"cannot load the tool {item!r}: {e}") from None
        if isinstance(found, ToolRegistry):
            for name in found.names:
                chosen.add(found.get(name))
        elif isinstance(found, Tool):
            chosen.add(found)
        else:
            raise UserError(f"{item!r} is a {type(found).__name__}, not a visto.tools.Tool or "
                            "ToolRegistry")  # fmt: skip
    if not chosen.names:
        raise UserError(f"no tools in {spec!r}; built-in tools: {', '.join(builtin.names)}")
    return chosen


__all__ = ["NO_ARGUMENTS", "Tool", "ToolOutput", "ToolRegistry", "ToolResult",
           "argument_problems", "default_registry", "load_tools"]  # fmt: skip
