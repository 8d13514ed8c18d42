"""Classification: name the main object, by asking a generative model or zero-shot with a
two-tower (CLIP-family) model.

Generative: the synthetic world's prompt ("What is the main object in this image? Answer
with its colour and shape."), or a choice among given labels; `parse` maps the answer to a
label. Zero-shot: `zero_shot(model, images, labels)` ranks the labels by the similarity of
image and prompt embeddings, with CLIP's prompt ensemble (`visto.eval.twotower`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visto.data.sample import Turn
from visto.errors import UserError
from visto.tasks.common import first_line, user_turns

PROMPT = "What is the main object in this image? Answer with its colour and shape."


def build_prompt(labels: Sequence[str] | None = None) -> list[Turn]:
    if labels is None:
        return user_turns(PROMPT)
    if not labels:
        raise UserError("give at least one label to choose from")
    return user_turns(
        f"What is the main object in this image? Answer with one of: {', '.join(labels)}."
    )


def parse(answer: str, labels: Sequence[str] | None = None) -> str | None:
    """The answer's label: without `labels`, the first line lowercased without its period and
    article; with them, the longest label whose words all appear in that line in order
    (None when none does)."""
    line = first_line(answer).lower().rstrip(".").strip()
    words = line.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    if labels is None:
        return " ".join(words)
    found = [lab for lab in labels if _contains_in_order(words, lab.lower().split())]
    return max(found, key=lambda lab: len(lab.split())) if found else None


def _contains_in_order(words: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(words[i : i + n] == needle for i in range(len(words) - n + 1))


def zero_shot(
    model: Any,
    images: Sequence[Any],
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    top_k: int = 5,
) -> list[list[tuple[str, float]]]:
    """For each image, the `top_k` labels with probabilities (softmax of the model's scaled
    cosine similarities; CLIP, Radford et al. 2021, §3.1). `model` has embed_images and
    embed_texts; `current_logit_scale()` when it has one, else 100 (CLIP's cap)."""
    import torch
    import torch.nn.functional as F

    from visto.eval.twotower import DEFAULT_TEMPLATES, TEMPLATE_SETS, class_text_embeddings

    if not labels:
        raise UserError("give at least one label to classify into")
    if not images:
        return []
    templates = templates or TEMPLATE_SETS[DEFAULT_TEMPLATES]
    with torch.inference_mode():
        text = class_text_embeddings(list(labels), model.embed_texts, templates)  # (C, D)
        image = F.normalize(model.embed_images(list(images)).float(), dim=-1)  # (N, D)
        scale = (
            model.current_logit_scale().float() if hasattr(model, "current_logit_scale") else 100.0
        )
        probs = (scale * image @ text.to(image.device).T).softmax(dim=-1).cpu()  # (N, C)
    k = min(top_k, len(labels))
    values, indices = probs.topk(k, dim=-1)
    return [
        [(labels[int(i)], float(v)) for v, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values, indices, strict=True)
    ]
