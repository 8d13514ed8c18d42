"""visto: build, train, evaluate and serve vision-language models."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `visto.load` imports torch on first use only, so that `import visto` (and `visto --help`)
    # stays instant.
    if name == "load":
        from visto.checkpoint import load

        return load
    raise AttributeError(f"module 'visto' has no attribute {name!r}")
