"""transformers configuration of a visto model exported with custom code (`visto export`).

The visto checkpoint's own config travels under "visto" (family, model config, processor
settings); the wrapper (modeling_visto.py) builds visto's model from it."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class VistoConfig(PretrainedConfig):
    model_type = "visto"

    def __init__(self, visto: dict[str, Any] | None = None, image_token_id: int | None = None, **kwargs: Any) -> None:
        self.visto = visto or {}
        self.image_token_id = image_token_id
        kwargs.setdefault("tie_word_embeddings", False)  # as visto's decoder config says
        kwargs.setdefault("use_cache", False)  # no KV cache: generate recomputes the sequence
        super().__init__(**kwargs)
