"""Classification: name the main object, by asking a generative model or zero-shot with a
two-tower (CLIP-family) model.

Generative: the synthetic world's prompt ("What is the main object in this image? Answer
with its colour and shape."), or a choice among given labels; `parse` maps the answer to a
label. Zero-shot: `zero_shot(model, images, labels)` ranks the labels by the similarity of
image and prompt embeddings, with CLIP's prompt ensemble (the templates below, which
`visto.eval.twotower` scores with too).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from visto.data.sample import Turn
from visto.errors import UserError
from visto.tasks.common import first_line, user_turns

if TYPE_CHECKING:
    import torch

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


# ----------------------------------------------------------------------------- zero-shot

EmbedTexts = Callable[[list[str]], "torch.Tensor"]

# Prompt templates. CLIP (Radford et al. 2021, §3.1.4) found that "A photo of a {label}."
# beats the bare label, and that averaging the text embeddings of many templates
# ("prompt ensembling") adds more; `ensemble` is that idea at the scale of our world.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    # Generic photo prompts plus frames of the world's own captions ("One shape: a red
    # circle.", "An image with ...", "... on a plain background."): CLIP's advice to
    # write prompts that look like the training text.
    "ensemble": (
        "a photo of a {}.",
        "a picture of a {}.",
        "an image with a {}.",
        "one shape: a {}.",
        "a {} on a plain background.",
    ),
    # Phrasings that share no frame with the world's captions: what a model that learned the
    # concepts (not the caption grammar) should still match. Used by `visto eval --paraphrase`.
    "paraphrase": (
        "somewhere in this drawing you can spot a {}.",
        "look closely: a {} appears here.",
        "this artwork features one {}.",
        "my favourite thing in the scene is the {}.",
        "a rendering that includes a {}.",
    ),
}
DEFAULT_TEMPLATES = "ensemble"


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def fill_template(template: str, name: str) -> str:
    """template.format(name) with 'a' made 'an' before a vowel: the captions say "an orange
    circle", and a prompt that says "a orange circle" would be off-distribution for no reason."""
    return _A_BEFORE_VOWEL.sub(r"\1n ", template.format(name))


def class_text_embeddings(
    class_names: Sequence[str], embed_texts: EmbedTexts, templates: Sequence[str]
) -> torch.Tensor:
    """One unit vector per class: the mean of its normalized template embeddings, renormalized.

    This is CLIP's prompt ensemble (§3.1.4): averaging in embedding space costs one text
    embedding per class at test time, however many templates there are.
    """
    import torch.nn.functional as F

    assert class_names and templates, "need at least one class and one template"
    for t in templates:
        assert t.count("{}") == 1, f"template {t!r} must contain exactly one '{{}}'"
    prompts = [fill_template(t, name) for name in class_names for t in templates]
    emb = F.normalize(embed_texts(prompts).float(), dim=-1)  # (C*T, D)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(emb, dim=-1)


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
