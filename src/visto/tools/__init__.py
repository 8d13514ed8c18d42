"""Expert models a vision-language model can call as tools (OCR), and the registry that holds them.

    from visto.tools import default_registry, load_tools
    tools = load_tools("ocr")                       # built-ins by name
    tools = load_tools("ocr,my_pkg.tools:brightness")   # plus your own Tool objects
    tools.run("ocr", "{}", image).text              # the result as the model reads it

See registry.py for adding a tool in a few lines.
"""

from __future__ import annotations

import importlib

from visto.errors import UserError
from visto.tools.registry import NO_ARGUMENTS, Tool, ToolRegistry, ToolResult, argument_problems


def default_registry() -> ToolRegistry:
    """The built-in experts: `ocr` (PP-OCRv4, offline)."""
    from visto.tools.ocr import ocr_tool

    return ToolRegistry([ocr_tool])


def load_tools(spec: str) -> ToolRegistry:
    """Tools from a comma-separated list: built-in names, and `module:attribute` naming a `Tool`
    (or a `ToolRegistry`, all of whose tools are taken) that Python can import."""
    builtin, chosen = default_registry(), ToolRegistry()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
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


__all__ = ["NO_ARGUMENTS", "Tool", "ToolRegistry", "ToolResult", "argument_problems",
           "default_registry", "load_tools"]  # fmt: skip
