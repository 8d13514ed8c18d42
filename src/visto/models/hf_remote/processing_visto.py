"""visto's processor for transformers (custom code written by `visto export`): images and
questions in, the model's inputs out, as `visto chat` prepares them (the `<image>` run, the
answer's `<focus>` slots, left padding). Imports visto.

    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor(images=[image], text=["What colour is the circle?"])
    ids = model.generate(**inputs, max_new_tokens=16)
    print(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:]))
"""

from __future__ import annotations

import os
from typing import Any


class VistoProcessor:
    def __init__(self, processor: Any) -> None:
        self.processor = processor  # visto.data.processor.Processor
        self.tokenizer = processor.tokenizer

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        pass  # AutoProcessor asks every custom-code processor; this one is already in auto_map

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> VistoProcessor:
        from transformers.utils import cached_file

        from visto.data.processor import Processor

        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only",
                                      "subfolder") if k in kwargs}  # fmt: skip
        cached_file(pretrained_model_name_or_path, "tokenizer.json", **hub)
        path = cached_file(pretrained_model_name_or_path, "processor.json", **hub)
        return cls(Processor.load(os.path.dirname(path)))

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> list[str]:
        """processor.json, tokenizer.json, processor_config.json and this file, so that
        AutoProcessor (and the model, which reads the tokenizer) load the directory again."""
        import json
        import shutil

        os.makedirs(save_directory, exist_ok=True)
        self.processor.save(save_directory)
        config = os.path.join(save_directory, "processor_config.json")
        with open(config, "w") as f:
            json.dump({"processor_class": "VistoProcessor",
                       "auto_map": {"AutoProcessor": "processing_visto.VistoProcessor"}}, f, indent=2)  # fmt: skip
        shutil.copyfile(__file__, os.path.join(save_directory, "processing_visto.py"))
        return [config]

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        """One prompt per text (a question; `<image>` is put before it when the text has none
        and an image is given), each with its image (or a list of images, or None)."""
        from transformers import BatchFeature

        from visto.data.sample import Sample, Turn

        texts = [text] if isinstance(text, str) else list(text or [])
        if images is None:
            images = [None] * len(texts)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(images)} images: give one image (or a list, or None) per text")
        samples = []
        for i, (question, image) in enumerate(zip(texts, images, strict=True)):
            pictures = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
            if pictures and "<image>" not in question:
                question = "<image>\n" * len(pictures) + question
            samples.append(Sample(str(i), pictures, [Turn("user", question)]))
        batch = self.processor.prompt_batch(samples)
        return BatchFeature({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                             "pixel_values": batch.pixel_values,
                             "image_sample_index": batch.image_sample_index})  # fmt: skip

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        ids = [int(i) for i in ids]
        return self.tokenizer.decode(ids, skip_special=skip_special_tokens)
