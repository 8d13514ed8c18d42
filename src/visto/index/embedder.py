"""What the vector store needs from a model: `Embedder`, and the two that visto ships.

The store never imports a model family. Anything with `name`, `dim`, `embed_images` and
`embed_texts` (returning L2-normalized float32 arrays) can fill an index:

- `ModelEmbedder` wraps a visto checkpoint of the CLIP family (`visto.load(path)`); its
  `name` includes a fingerprint of the weights, so an index refuses queries embedded by a
  retrained or different checkpoint (their vectors live in another space).
- `PixelEmbedder` ("pixels") is a model-free baseline: an 8x8 colour thumbnail. It finds
  near-duplicate images without any training, and cannot embed text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from visto.errors import UserError

PIXELS = "pixels"  # the --model value that selects PixelEmbedder


@runtime_checkable
class Embedder(Protocol):
    name: str  # identifies the embedding space; an index only accepts queries from the same name
    dim: int

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(N, dim) float32, each row L2-normalized."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, each row L2-normalized, in the same space as the images."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    assert x.ndim == 2, f"expected (N, D) vectors, got shape {x.shape}"
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    assert np.all(np.isfinite(x)) and np.all(norms > 0), "vectors must be finite and non-zero"
    return x / norms


class PixelEmbedder:
    """An image as its `side` x `side` RGB thumbnail, mean-removed and L2-normalized."""

    def __init__(self, side: int = 8) -> None:
        self.side = side
        self.name = f"{PIXELS}-{side}x{side}"
        self.dim = side * side * 3

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        thumbs = [
            np.asarray(im.convert("RGB").resize((self.side, self.side), Image.BOX), np.float32)
            for im in images
        ]
        x = np.stack(thumbs).reshape(len(images), self.dim) / 255.0  # (N, side*side*3)
        x = x - x.mean(axis=1, keepdims=True)
        # A flat single-colour image has no direction after mean removal; nudge it so that
        # it still gets a (well-defined) vector instead of a division by zero.
        x[:, 0] += 1e-6
        return l2_normalize(x)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise UserError(
            "this index was built with the model-free 'pixels' embedder, which cannot embed "
            "text; search it with --image QUERY.png, or rebuild the index with a CLIP "
            "checkpoint (visto index build --model runs/clip/checkpoint ...)"
        )


def weights_fingerprint(checkpoint: Path) -> str:
    """sha256 over the checkpoint's weight files: a retrained checkpoint gets another name."""
    files = sorted(checkpoint.glob("*.safetensors")) or sorted(
        p for p in checkpoint.iterdir() if p.is_file() and p.suffix in (".bin", ".pt")
    )
    if not files:
        raise UserError(f"{checkpoint} holds no weight files (*.safetensors); is it a checkpoint?")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class ModelEmbedder:
    """A loaded CLIP-family visto model (it has `embed_images` and `embed_texts`)."""

    def __init__(self, model, name: str, batch_size: int = 64) -> None:
        import torch

        if not (hasattr(model, "embed_images") and hasattr(model, "embed_texts")):
            raise UserError(
                f"model {name} has no embed_images/embed_texts: index and search need a "
                "CLIP-family checkpoint (two towers that embed images and text)"
            )
        self.model = model
        self.name = name
        self.batch_size = batch_size
        with torch.no_grad():
            self.dim = int(model.embed_texts(["a probe"]).shape[-1])

    def _run(self, fn, items: list) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                out.append(fn(items[start : start + self.batch_size]).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))  # (N, dim)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return self._run(self.model.embed_images, images)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._run(self.model.embed_texts, texts)


def load_embedder(spec: str) -> Embedder:
    """`spec` is "pixels" or a checkpoint directory of the CLIP family."""
    if spec == PIXELS or spec.startswith(PIXELS + "-"):
        side = int(spec.split("-")[1].split("x")[0]) if "-" in spec else 8
        return PixelEmbedder(side)
    path = Path(spec)
    if not path.is_dir():
        raise UserError(
            f"model checkpoint not found: {spec}; pass a checkpoint directory "
            "(e.g. runs/clip/checkpoint) or 'pixels' for the model-free baseline"
        )
    try:
        from visto.checkpoint import load
    except ImportError as e:
        raise UserError(f"cannot load checkpoints in this install of visto: {e}") from None
    model = load(path)
    if hasattr(model, "eval"):
        model.eval()
    return ModelEmbedder(model, name=f"{path.resolve().name}@{weights_fingerprint(path)}")
