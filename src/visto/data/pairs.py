"""Image-text pairs out of samples, as the contrastive families (CLIP, SigLIP) and BLIP-2's
first stage train on them: the caption a sample pairs with its image, and the key that says
which samples show the same image (the losses do not push apart what is in fact a match;
`visto.losses.pair_positives`)."""

from __future__ import annotations

from visto.data.sample import IMAGE_PLACEHOLDER, Sample
from visto.errors import UserError


def caption_of(sample: Sample) -> str:
    """The text paired with a sample's image: truth["caption"] (or the first of
    truth["captions"]) where the source has one, else the last assistant turn."""
    truth = sample.truth or {}
    text = truth.get("caption")
    if not text and truth.get("captions"):
        text = truth["captions"][0]
    if not text:
        answers = [t.content for t in sample.turns if t.role == "assistant"]
        text = answers[-1] if answers else ""
    text = text.replace(IMAGE_PLACEHOLDER, "").strip()
    if not text:
        raise UserError(
            f"sample {sample.id!r} has no caption for CLIP training: it needs truth['caption'] "
            "or an assistant turn (use caption data, e.g. tasks ['caption'])"
        )
    return text


def image_key(sample: Sample) -> str:
    """What identifies a sample's image across samples: the source's image id (the synthetic
    world gives each caption of an image its own sample), else the sample id."""
    truth = sample.truth or {}
    return str(truth.get("image_id") or sample.id)
