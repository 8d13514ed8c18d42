"""Device and dtype are chosen once, at the edge, and passed down."""

from __future__ import annotations

import torch


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given ("cpu", "cuda", "cuda:1"), else cuda when present, else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~50x slower on our CPUs), bf16 on GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
