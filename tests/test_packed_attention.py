"""The decoder's fast path for training batches (`PackedLayout`: the attention of a shared
prefix and of each exchange only, every other layer on the real tokens) computes what the
dense (T, T) mask computes: the same logits at every real position and the same gradients,
on random packed batches with several exchanges, with and without a shared prefix, with
right and left padding, with conditioning; and the loss on the scored rows only is the loss
over every row."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from torch import nn

from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.losses import IGNORE_INDEX, answer_loss, lm_loss
from visto.models import build_model
from visto.models.cogvlm import CogVLMConfig
from visto.models.flamingo import FlamingoConfig
from visto.models.llava import LlavaConfig
from visto.nn.attention import packed_layout
from visto.nn.language import Conditioning, DecoderConfig, DecoderLM


def random_packed_batch(gen: torch.Generator, B: int, T: int, left: bool = False):
    """(attention_mask, segment_ids, position_ids) of B rows: each row a shared prefix of
    random length (sometimes none) and 0-6 exchanges of random lengths (segment ids
    increasing, sometimes skipping one, as when an exchange did not fit), or (some rows) one
    plain causal sequence; padding after (or before, `left`) the real tokens."""
    mask = torch.zeros(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        n = int(torch.randint(T // 3, T + 1, (1,), generator=gen))
        a = T - n if left else 0
        mask[r, a : a + n] = 1
        pos[r, a : a + n] = torch.arange(n)
        if r % 4 == 3:
            continue  # a plain row: one causal sequence
        prefix = 0 if r % 4 == 1 else int(torch.randint(1, max(2, n // 3), (1,), generator=gen))
        p, k = a + prefix, 1
        while p < a + n:
            length = min(int(torch.randint(1, 12, (1,), generator=gen)), a + n - p)
            seg[r, p : p + length] = k
            pos[r, p : p + length] = prefix + torch.arange(length)  # positions restart
            p += length
            k += 1 + int(torch.rand(1, generator=gen) < 0.2)
    return mask, seg, pos


def forward_and_grads(lm: DecoderLM, fast: bool, embeds, mask, seg, pos, weights, **kw):
    lm.zero_grad(set_to_none=True)
    lm.fast_packing = fast
    x = embeds.clone().requires_grad_(True)
    logits, _ = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, segment_ids=seg, **kw)
    real = mask.bool()
    (logits[real] * weights).sum().backward()  # a loss on every real position
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = x.grad.clone()
    return logits[real].detach(), grads


def assert_same(lm, embeds, mask, seg, pos, **kw):
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(int(mask.sum()), lm.config.vocab_size, generator=gen)
    fast, g_fast = forward_and_grads(lm, True, embeds, mask, seg, pos, weights, **kw)
    dense, g_dense = forward_and_grads(lm, False, embeds, mask, seg, pos, weights, **kw)
    torch.testing.assert_close(fast, dense, atol=2e-5, rtol=1e-4)
    assert g_fast.keys() == g_dense.keys()
    for name in g_dense:
        scale = float(g_dense[name].abs().max()) + 1e-6
        torch.testing.assert_close(g_fast[name] / scale, g_dense[name] / scale, atol=2e-5, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def small_lm(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(DecoderConfig.preset("tiny", vocab_size=97)).train()


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_attention_equals_dense_mask(seed, left):
    gen = torch.Generator().manual_seed(seed)
    lm = small_lm(seed)
    B, T = 6, 48
    mask, seg, pos = random_packed_batch(gen, B, T, left)
    embeds = torch.randn(B, T, lm.config.hidden_size, generator=gen)
    layout = packed_layout(mask, seg, (B, T), unpad=True)
    assert layout is not None and layout.tokens is not None  # the fast path is taken
    assert len(layout.tokens) == int(mask.sum())
    assert_same(lm, embeds, mask, seg, pos)


def test_packed_attention_with_conditioning_keeps_the_padding():
    """Conditioning reads (B, T) positions: the attention is blocked, the padding stays."""
    gen = torch.Generator().manual_seed(5)
    lm = small_lm(5)
    B, T, C = 5, 40, lm.config.hidden_size
    mask, seg, pos = random_packed_batch(gen, B, T)
    embeds = torch.randn(B, T, C, generator=gen)
    assert packed_layout(mask, seg, (B, T), unpad=False).tokens is None
    gate = nn.Linear(C, C)
    expert = nn.Module()  # CogVLM-like: an expert q and MLP up projection per layer
    expert.self_attn = nn.Module()
    expert.self_attn.q_proj = nn.Linear(C, C, bias=False)
    expert.mlp = nn.Module()
    expert.mlp.up_proj = nn.Linear(C, lm.config.intermediate_size, bias=False)
    lm.add_module("gate", gate)  # their gradients are compared with the decoder's
    lm.add_module("expert", expert)
    is_image = torch.zeros(B, T, dtype=torch.bool)
    is_image[:, 1:4] = True
    cond = Conditioning(before_layer={1: gate}, experts=[expert] * lm.config.num_layers,
                        expert_mask=is_image)  # fmt: skip
    assert_same(lm, embeds, mask, seg, pos, conditioning=cond)


def test_padding_only_and_unpacked_rows():
    """No segments at all: a padded batch of plain causal rows takes the fast path too."""
    gen = torch.Generator().manual_seed(3)
    lm = small_lm(3)
    B, T = 4, 30
    mask, _, _ = random_packed_batch(gen, B, T)
    mask[0] = 1
    embeds = torch.randn(B, T, lm.config.hidden_size, generator=gen)
    assert_same(lm, embeds, mask, None, None)


def test_other_shapes_fall_back_to_the_dense_mask():
    B, T = 2, 12
    mask = torch.ones(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[0, 3:6], seg[0, 6:9], seg[0, 9:] = 1, 2, 1  # exchange 1 in two runs
    assert packed_layout(mask, seg, (B, T), unpad=True) is None
    seg[0, 9:] = 0  # a prefix token after an exchange
    assert packed_layout(mask, seg, (B, T), unpad=True) is None
    seg[0, 9:] = 3
    holes = mask.clone()
    holes[1, 4] = 0  # a row whose real tokens are not one span
    assert packed_layout(holes, seg, (B, T), unpad=True) is None
    assert packed_layout(mask, seg, (B, T), unpad=True) is not None
    lm = small_lm(4)
    embeds = torch.randn(B, T, lm.config.hidden_size)
    seg[0, 9:] = 1
    assert_same(lm, embeds, mask, seg, None)  # the dense mask both ways: still equal


def test_layout_computes_no_masked_block():
    """A quickstart-like batch (16 rows, a 12-token prefix, 20 exchanges of ~25 tokens):
    the blocks hold a small part of the dense mask's B * T * T scores."""
    gen = torch.Generator().manual_seed(0)
    B, T = 16, 512
    mask = torch.zeros(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        p, k = 12, 1
        while p < T - 40:
            length = int(torch.randint(20, 31, (1,), generator=gen))
            seg[r, p : p + length] = k
            p, k = p + length, k + 1
        mask[r, :p] = 1
    layout = packed_layout(mask, seg, (B, T), unpad=True)
    scores = sum(g.shape[0] * g.shape[1] * g.shape[2] for g in layout.groups)
    assert scores < 0.12 * B * T * T, scores / (B * T * T)
    # every real token is the query of one slot, and its slot reads it back
    slots = torch.cat([g.queries for g in layout.groups])
    assert torch.equal(slots[layout.inverse], torch.arange(int(mask.sum())))


# ----------------------------------------------------------------------------- the loss


def dense_lm_loss(logits, labels):
    V = logits.shape[-1]
    shifted = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), shifted, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)


def test_loss_on_scored_rows_equals_the_loss_over_every_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 17, 50, generator=gen)
    labels = torch.randint(0, 50, (3, 17), generator=gen)
    labels[torch.rand(3, 17, generator=gen) < 0.6] = IGNORE_INDEX
    fast_in, dense_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    fast, dense = answer_loss(fast_in, labels), dense_lm_loss(dense_in, labels)
    torch.testing.assert_close(fast["loss"], dense)
    torch.testing.assert_close(lm_loss(logits, labels), dense)
    fast["loss"].backward()
    dense.backward()
    torch.testing.assert_close(fast_in.grad, dense_in.grad)
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    acc = ((logits[:, :-1].argmax(-1) == target) & scored).sum() / scored.sum()
    torch.testing.assert_close(fast["token_acc"], acc)
    nothing = torch.full_like(labels, IGNORE_INDEX)
    empty = lm_loss(fast_in, nothing)
    assert float(empty.detach()) == 0.0 and empty.requires_grad  # no NaN, a gradient path


# ----------------------------------------------------------------------------- families


QAS = [("What colour is the square?", "red"), ("How many squares?", "one"),
       ("Is it big?", "yes no"), ("Where is it?", "left top")]  # fmt: skip
FAMILIES = {"llava": LlavaConfig, "cogvlm": CogVLMConfig, "flamingo": FlamingoConfig}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = [q + " " + a for q, a in QAS] * 5
    train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loss_and_gradients_equal_the_dense_mask(family, tokenizer_dir):
    """A family's training step on a packed batch (two packed rows of different lengths, one
    plain row): the same loss and gradients both ways (CogVLM's expert and Flamingo's
    cross-attention keep the padding; LLaVA runs on the real tokens)."""
    model = build_model(family, FAMILIES[family].preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0)
    model.train()
    if family == "flamingo":  # open the tanh gates: the image must reach the decoder
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                block.alpha_cross_attn.fill_(1.0)
                block.alpha_dense.fill_(0.5)
    image = Image.new("RGB", (48, 32), (200, 30, 30))
    turns = []
    for j, (q, a) in enumerate(QAS):
        turns += [Turn("user", f"<image>\n{q}" if j == 0 else q), Turn("assistant", a)]
    packed = Sample(id="p", images=[image], turns=turns, independent_turns=True)
    short = dataclasses.replace(packed, id="q", turns=turns[:4])
    plain = dataclasses.replace(packed, id="r", turns=turns[:2], independent_turns=False)
    batch = model.collate([packed, short, plain])
    assert batch["segment_ids"] is not None and not bool(batch["attention_mask"].all())
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for fast in (True, False):
        model.language_model.fast_packing = fast
        for p in params:
            p.grad = None
        loss = model(batch)["loss"]
        loss.backward()
        results[fast] = (loss.detach(), [None if p.grad is None else p.grad.clone() for p in params])
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for g_fast, g_dense in zip(results[True][1], results[False][1], strict=True):
        assert (g_fast is None) == (g_dense is None)
        if g_dense is not None:
            torch.testing.assert_close(g_fast, g_dense, atol=1e-5, rtol=1e-4)
