"""The losses every family trains with.

    clip_loss      symmetric InfoNCE over in-batch pairs (CLIP, Radford et al. 2021, Fig. 3)
    siglip_loss    pairwise sigmoid loss with a learnable bias (SigLIP, Zhai et al. 2023, Alg. 1)
    itm_loss       image-text matching as binary classification (ALBEF/BLIP, Li et al. 2021)
    lm_loss        next-token cross-entropy on shifted labels, -100 = no loss (transformers'
                   convention; the processor leaves labels unshifted)

Embeddings given to the contrastive losses are L2-normalized (B, D); `logit_scale` is the
multiplier itself (already exp'd and clamped by the model), not its log.

Duplicates: in a world where "One shape: a red circle." describes many images, a batch often
holds the same caption (or the same image) twice. Plain InfoNCE then asks image i to prefer
text i over an identical text k, which no model can do, and pushes apart what should match.
`positives` (B, B) marks every matching pair (`pair_positives` builds it from caption and
image ids): the contrastive losses keep the diagonal as the target and drop the other
positives from the negatives (the "elimination" variant of false negative cancellation,
Huynh et al. 2022); SigLIP's loss labels them +1 instead.

Hard negatives (NegCLIP, Yuksekgonul et al. 2023, section 4): `negative_emb` (N, D) are extra
texts that have no image, e.g. a caption with one attribute word swapped. They join the texts
each image is ranked against (image->text runs over B + N texts; text->image stays over the
B images, a negative has no image to find) and, in SigLIP's loss, are N more pairs per image
labelled -1. `negative_positives` (B, N) marks a negative that happens to match an image (the
swap made another image's very caption, or this one's): left out, or labelled +1, likewise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def contrastive_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """(B, D), (N, D) -> (B, N) scaled cosine similarities; row i is image i against all texts
    (N = B for the batch's own captions, or the N extra hard negatives)."""
    assert image_emb.ndim == text_emb.ndim == 2 and image_emb.shape[1] == text_emb.shape[1], (
        f"embeddings must be (B, D) and (N, D), got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
    )
    return logit_scale * image_emb @ text_emb.t()


def pair_positives(*group_ids: Tensor) -> Tensor:
    """(B,) id tensors (e.g. caption ids, image ids) -> (B, B) bool: pair (i, j) matches when
    any of the ids agree (same caption text, or the same image). The diagonal is always True."""
    assert group_ids, "need at least one id tensor"
    B = group_ids[0].shape[0]
    out = torch.eye(B, dtype=torch.bool, device=group_ids[0].device)
    for ids in group_ids:
        assert ids.shape == (B,), f"ids must all be (B,) = ({B},), got {tuple(ids.shape)}"
        out |= ids[:, None] == ids[None, :]
    return out


def batch_ids(keys: list[str]) -> Tensor:
    """Keys -> (B,) ints, equal where the keys are equal (first-seen order)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def _drop_other_positives(logits: Tensor, positives: Tensor | None) -> Tensor:
    """logits with every off-diagonal positive set to -inf: not a negative, not a target."""
    if positives is None:
        return logits
    assert positives.shape == logits.shape and positives.dtype == torch.bool, (
        f"positives must be a (B, B) bool mask, got {tuple(positives.shape)} {positives.dtype}"
    )
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(positives & ~eye, float("-inf"))


def _negative_logits(
    image_emb: Tensor, negative_emb: Tensor, logit_scale: Tensor, negative_positives: Tensor | None
) -> Tensor:
    """(B, N) scaled similarities of every image to every extra negative, after checking the
    (B, N) mask of the negatives that match an image."""
    logits = contrastive_logits(image_emb, negative_emb, logit_scale)  # (B, N)
    if negative_positives is not None:
        assert negative_positives.shape == logits.shape and negative_positives.dtype == torch.bool, (
            f"negative_positives must be a {tuple(logits.shape)} bool mask, got "
            f"{tuple(negative_positives.shape)} {negative_positives.dtype}"
        )
    return logits


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    positives: Tensor | None = None,
    negative_emb: Tensor | None = None,
    negative_positives: Tensor | None = None,
) -> Tensor:
    """Mean of image->text and text->image cross-entropy, the matching pair on the diagonal.

    `positives` (B, B) bool: other pairs that also match (identical captions, the same image);
    they are left out of the negatives of both directions (see the module docstring).
    `negative_emb` (N, D): extra text-only negatives in the image->text softmax, minus those
    `negative_positives` (B, N) marks as matching (see the module docstring)."""
    logits = contrastive_logits(image_emb, text_emb, logit_scale)  # (B, B)
    logits = _drop_other_positives(logits, positives)
    targets = torch.arange(logits.shape[0], device=logits.device)
    t2i = F.cross_entropy(logits.t(), targets)
    if negative_emb is not None:
        extra = _negative_logits(image_emb, negative_emb, logit_scale, negative_positives)
        if negative_positives is not None:
            extra = extra.masked_fill(negative_positives, float("-inf"))
        logits = torch.cat([logits, extra], dim=1)  # (B, B + N)
    return (F.cross_entropy(logits, targets) + t2i) / 2


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    positives: Tensor | None = None,
    negative_emb: Tensor | None = None,
    negative_positives: Tensor | None = None,
) -> Tensor:
    """Every (image, text) pair is a binary question "do they match?": +1 on the diagonal
    (and on every pair `positives` marks), -1 elsewhere;
    -sum(log sigmoid(label * (t * x.y + b))) / B, as in the paper's Algorithm 1.
    `negative_emb` (N, D): B x N more pairs, labelled -1 (+1 where `negative_positives`)."""
    logits = contrastive_logits(image_emb, text_emb, logit_scale) + logit_bias  # (B, B)
    B = logits.shape[0]
    match = torch.eye(B, device=logits.device, dtype=torch.bool)
    if positives is not None:
        assert positives.shape == (B, B) and positives.dtype == torch.bool, positives.shape
        match = match | positives
    if negative_emb is not None:
        extra = _negative_logits(image_emb, negative_emb, logit_scale, negative_positives)
        logits = torch.cat([logits, extra + logit_bias], dim=1)  # (B, B + N)
        if negative_positives is None:
            negative_positives = torch.zeros_like(extra, dtype=torch.bool)
        match = torch.cat([match, negative_positives], dim=1)
    labels = 2 * match.to(logits.dtype) - 1  # (B, B [+ N]) of +-1
    return -F.logsigmoid(labels * logits).sum() / B


def itm_loss(logits: Tensor, is_match: Tensor) -> Tensor:
    """logits (B,) for "this image and text match", is_match (B,) of 0/1 -> mean binary CE."""
    assert logits.shape == is_match.shape, (tuple(logits.shape), tuple(is_match.shape))
    return F.binary_cross_entropy_with_logits(logits, is_match.to(logits.dtype))


def _scored(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The logits (n, V) of the positions whose next label is scored, and those labels (n,):
    only these rows go through the softmax (an answer-only batch scores a few of its
    positions), in row-major order."""
    assert logits.ndim == 3 and labels.shape == logits.shape[:2], (
        f"logits must be (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
        f"{tuple(labels.shape)}"
    )
    B, T, V = logits.shape
    scored = labels[:, 1:] != ignore_index  # (B, T-1): position t predicts labels[t + 1]
    b, t = scored.nonzero(as_tuple=True)
    picked = logits.reshape(B * T, V).index_select(0, b * T + t)  # (n, V)
    return picked, labels[b, t + 1]


def scored_rows(x: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """The rows (n, C) of per-position values x (B, T, C) whose next label is scored, and those
    labels (n,), row-major: a family hands its last hidden states here and runs its LM head on
    the n rows only (LLaVA's, CogVLM's and Fuyu's `forward`), not on every position of the
    batch: the same loss, without the head's matmul and softmax over padding and prompts."""
    return _scored(x, labels, ignore_index)


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict labels[t + 1].

    The mean is over the labelled tokens of the whole batch; a batch with none gives 0 (with
    a gradient path), not NaN, so one fully truncated sample cannot poison a run.
    """
    picked, targets = _scored(logits, labels, ignore_index)
    total = F.cross_entropy(picked.float(), targets, reduction="sum")
    return total / max(targets.numel(), 1)


def answer_loss(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """What a generative family's forward returns: {"loss": `lm_loss`, "token_acc": the share
    of labelled next tokens that the argmax gets right (no gradient)}."""
    return scored_answer_loss(*_scored(logits, labels, IGNORE_INDEX))


def scored_answer_loss(picked: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """`answer_loss` on the scored positions' logits (n, V) and their labels (n,) alone (a
    family that computes its head only there: `Llava.forward`)."""
    loss = F.cross_entropy(picked.float(), targets, reduction="sum") / max(targets.numel(), 1)
    with torch.no_grad():
        hits = (picked.argmax(dim=-1) == targets).sum()
        token_acc = hits / max(targets.numel(), 1)
    return {"loss": loss, "token_acc": token_acc}
