"""A visto model as a transformers model (custom code written by `visto export`).

This file imports visto and runs visto's own model: it loads with `trust_remote_code=True`
wherever visto is installed (`pip install visto`); vLLM does not serve it.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model(input_ids=..., pixel_values=..., attention_mask=...)   # out.logits (B, T, V)
    ids = model.generate(input_ids=..., pixel_values=..., attention_mask=..., max_new_tokens=16)

`logits` are, at every position, what visto's generation engine samples the next token from:
the decoder's logits, and inside an answer, with a pointer head, log-probabilities with the
answer's `<focus>` slots mixed in (`visto.models.remote_code.sequence_logits`). There is no KV
cache: `generate` recomputes the whole sequence at each step (the same greedy tokens as visto's
engine, slower). Inputs come from processing_visto.VistoProcessor (`AutoProcessor`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_visto import VistoConfig


class VistoForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = VistoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []
    _supports_cache_class = False
    # visto's decoder ties its head to the embeddings when its config says so (as
    # tie_word_embeddings in config.json): save_pretrained writes the embeddings once
    _tied_weights_keys = {"model.language_model.lm_head.weight": "model.language_model.model.embed_tokens.weight"}

    def __init__(self, config: VistoConfig) -> None:
        super().__init__(config)
        from visto.models.remote_code import build_visto

        self.model = build_visto(config.visto)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # visto initialises its own modules; the weights come from model.safetensors

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from transformers.utils import cached_file

        from visto.models.remote_code import attach_processor, rebuilt

        # transformers builds the module on the meta device and loads the saved tensors; what
        # visto computes at construction and does not save (rotary frequencies, ...) is built
        # again by visto itself, with the loaded weights.
        model.model = rebuilt(model.model, model.config.visto)

        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only",
                                      "subfolder") if k in kwargs}  # fmt: skip
        cached_file(pretrained_model_name_or_path, "tokenizer.json", **hub)
        directory = cached_file(pretrained_model_name_or_path, "processor.json", **hub)
        attach_processor(model.model, os.path.dirname(directory))
        return model

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any:
        # The tensors under visto's own names, as the export wrote them (transformers would
        # "revert" key renames it never applied to this model).
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        from visto.models.remote_code import sequence_logits

        logits = sequence_logits(self.model, input_ids, pixel_values, attention_mask, image_sample_index)
        loss = None
        if labels is not None:  # next-token cross-entropy, -100 ignored
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None, image_sample_index: torch.Tensor | None = None, **kwargs: Any,
    ) -> dict[str, Any]:  # fmt: skip
        # No cache: every step reads the whole sequence and the images again.
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": pixel_values, "image_sample_index": image_sample_index}  # fmt: skip
