"""Pointer head (connectors/pointer.py): answers copy the `<focus>` slots' tokens, in
training and in every generation path."""

from __future__ import annotations

import pytest
import torch

from visto.connectors.pointer import CopySlots, PointerHead, answer_of_position
from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES
from visto.data.tokenizer import Tokenizer, train_tokenizer, with_focus_token
from visto.errors import UserError
from visto.models.llava import LlavaConfig
from visto.pretrained import build_model

TEXTS = [f"Which colour does the {s} have? Read the text. a {c} {s}, {z}" for s in SHAPE_NAMES
         for c in COLOUR_NAMES for z in SIZE_NAMES]  # fmt: skip


def test_the_mixture_is_a_distribution_and_empty_slots_change_nothing():
    torch.manual_seed(0)
    head = PointerHead(16, (2,))  # one run of 2 slots, then its end slot
    assert head.slots == 3
    hidden, logits, tokens = torch.randn(2, 16), torch.randn(2, 10), torch.tensor([1, 1])
    empty = CopySlots(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 2))
    torch.testing.assert_close(head(hidden, logits, empty, tokens), logits.log_softmax(-1))
    # slot 0 holds token 7; slot 1 is a box slot split 0.25 / 0.75 between tokens 3 and 4
    ids = torch.tensor([[7, 0], [3, 4], [0, 0]]).expand(2, 3, 2)
    weights = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 0.0]]).expand(2, 3, 2)
    slots = CopySlots(ids, weights)
    with torch.no_grad():
        head.keys.zero_()
        head.keys[1, 0] = 1.0
        head.query.weight.copy_(torch.eye(16) * 100)
        hidden = torch.zeros(2, 16)
        hidden[0, 0] = 1.0  # row 0 just wrote slot 0's token: slot 1 is next, and it asks for it
        out = head(hidden, logits, slots, torch.tensor([7, 1])).exp()
    torch.testing.assert_close(out.sum(-1), torch.ones(2))
    assert out[0, 4] == pytest.approx(0.75, abs=1e-3) and out[0, 3] == pytest.approx(0.25, abs=1e-3)
    # row 1's current token (1) is held by no slot and does not open the answer: nothing to copy
    torch.testing.assert_close(out[1], logits[1].softmax(-1))
    # a token that opens the answer makes the run's first slot eligible: score 0 beside the vocabulary
    head.start_id = 1
    with torch.no_grad():
        out = head(torch.zeros(2, 16), logits, slots, tokens).exp()
    z = logits[1].exp().sum() + 1
    assert out[1, 7] == pytest.approx(float((logits[1, 7].exp() + 1) / z), rel=1e-4)


def test_a_copy_goes_on_from_the_slot_holding_the_current_token_and_ends_with_its_run():
    from visto.connectors.pointer import copy_runs

    END, OPEN = 2, 1
    # one answer: a box run of 2 slots (full) and a read run of 3 slots holding 2 tokens
    box = (torch.tensor([[[5], [6]]]), torch.ones(1, 2, 1))
    read = (torch.tensor([[[8], [9], [0]]]), torch.tensor([[[1.0], [1.0], [0.0]]]))
    slots = copy_runs([box, read], END)
    assert slots.ids[0, :, 0].tolist() == [5, 6, END, 8, 9, END, 0]
    assert slots.weights[0, :, 0].tolist() == [1, 1, 1, 1, 1, 1, 0]
    empty_run = copy_runs([(torch.zeros(1, 2, 1, dtype=torch.long), torch.zeros(1, 2, 1))], END)
    assert empty_run.weights.sum() == 0  # nothing to copy: no end slot either
    head = PointerHead(4, (2, 3))
    head.start_id = OPEN
    with torch.no_grad():
        head.keys.zero_()  # only the successor feature scores
        logits = torch.full((1, 12), -30.0)
        nxt = lambda token: int(head(torch.zeros(1, 4), logits, slots, torch.tensor([token])).argmax())  # noqa: E731
    assert [nxt(8), nxt(9), nxt(5), nxt(6)] == [9, END, 6, END]
    assert nxt(OPEN) in (5, 8)  # the answer's first token: a run's first slot


def test_each_position_belongs_to_the_last_answer_opened_in_its_row():
    A = 9
    ids = torch.tensor([[1, A, 2, 3, A, 4], [1, 2, A, 5, 6, 7]])
    assert answer_of_position(ids, A).tolist() == [[-1, 0, 0, 0, 1, 1], [-1, -1, 2, 2, 2, 2]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return with_focus_token(Tokenizer.load(path / "tokenizer.json"))


# What the stand-in reader reads off an image, by its colour: the reader itself is a trained
# model (test_text_reader); here it only has to read different words of different lengths.
TRAIN_READS = {(200, 30, 30): "red star", (30, 30, 200): "blue circle", (30, 200, 30): "red",
               (200, 200, 30): "yellow triangle star", (30, 200, 200): "star circle square"}  # fmt: skip
TEST_READS = {(200, 30, 200): "green square", (120, 120, 120): "purple diamond"}


def reading_llava(tokenizer):
    from visto.data.processor import Processor

    projector = ProjectorConfig(kind="regions", slots=3, focus=True, read_slots=4, pointer=True)
    config = LlavaConfig.preset("tiny", projector=projector)
    config.processor.image_tokens, config.processor.focus_tokens = 3, 8
    config.processor.loc_bins = 32
    config.processor.vocab_size = config.decoder.vocab_size = tokenizer.vocab_size
    model = build_model("llava", config, seed=0)
    model.processor = Processor(config.processor, tokenizer)
    reads = {**TRAIN_READS, **TEST_READS}
    means = {c: model.collate([sample(c, "x")])["pixel_values"][0].mean((1, 2)) for c in reads}

    def read(pixels):  # the phrase of the colour whose processed pixels the image has
        return [[(reads[min(means, key=lambda c: float((means[c] - image.mean((1, 2))).abs().sum()))],
                  [0, 0, 4, 4])] for image in pixels]  # fmt: skip

    model.multi_modal_projector.reader.forward = read
    return model


def sample(colour, answer: str | None = None):
    from PIL import Image

    from visto.data.sample import Sample, Turn

    turns = [Turn("user", "<image>\nRead the text.")] + ([Turn("assistant", answer)] if answer else [])
    return Sample("s", [Image.new("RGB", (32, 32), colour)], turns)


def test_pointer_config_needs_the_focus():
    with pytest.raises(UserError, match="pointer needs focus"):
        ProjectorConfig(kind="regions", pointer=True)


def test_llava_learns_to_copy_what_was_read_and_every_generation_path_copies_it(tokenizer, tmp_path):
    """Trained on two images whose read words are the answers, the model answers a third
    image's word, never an answer in training: it copies. The engine's fast path, its generic
    path (the model's own prefill/decode_step) and a reloaded checkpoint agree."""
    from visto.checkpoint import load, save_checkpoint
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    torch.manual_seed(0)
    model = reading_llava(tokenizer)
    batch = model.collate([sample(c, text) for c, text in TRAIN_READS.items()])
    read = model.multi_modal_projector.read_tokens(batch["pixel_values"])[0][:, 0]  # everything read
    for row in range(len(TRAIN_READS)):  # the answer is what was read
        answer = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert answer[: len(answer) - 1] == [t for t in read[row].tolist() if t]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert model.pointer.keys.grad is not None and out["token_acc"] == 1.0

    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = model.prompt_batch([sample(c) for c in TEST_READS] + [sample((200, 30, 30))])
    fast = Engine(model, tokenizer).generate_batch(prompts, greedy)
    assert [c.text.strip() for c in fast] == [*TEST_READS.values(), "red star"]
    generic = Engine(model, tokenizer, fast=False).generate_batch(prompts, greedy)
    assert [c.token_ids for c in generic] == [c.token_ids for c in fast]
    # Rows that join a running batch keep their own slots (the serving path).
    from visto.infer.continuous import ContinuousBatch

    running = ContinuousBatch(Engine(model, tokenizer))
    first = running.add(model.prompt_batch([sample(c) for c in list(TEST_READS)[:1]]), [greedy])
    running.step()
    running.step()
    second = running.add(model.prompt_batch([sample(c) for c in list(TEST_READS)[1:]]), [greedy])
    while running.busy:
        running.step()
    assert [first[0].completion.token_ids, second[0].completion.token_ids] == [c.token_ids for c in fast[:2]]
    # Without the pointer the same weights do not say the unseen words.
    pointer = model.multi_modal_projector.pointer
    model.multi_modal_projector.pointer = None
    blind = Engine(model, tokenizer).generate_batch(prompts, greedy)
    assert not any(c.text.strip() in TEST_READS.values() for c in blind)
    model.multi_modal_projector.pointer = pointer

    # A prompt without an image has nothing to copy, on either path.
    from visto.data.sample import Sample, Turn

    text_only = model.prompt_batch([Sample("t", [], [Turn("user", "Read the text.")])])
    for fast_path in (True, False):
        out = Engine(model, tokenizer, fast=fast_path).generate_batch(text_only, greedy)[0]
        assert out.text.strip() not in TEST_READS.values()

    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    assert again.config.projector.pointer and again.pointer is not None
    again.multi_modal_projector.reader.forward = model.multi_modal_projector.reader.forward
    assert [c.token_ids for c in Engine(again, tokenizer).generate_batch(prompts, greedy)] == [
        c.token_ids for c in fast
    ]


def test_cogvlm_refuses_the_pointer():
    from visto.models.cogvlm import CogVLMConfig

    projector = ProjectorConfig(kind="regions", slots=3, focus=True, pointer=True)
    with pytest.raises(UserError, match="pointer"):
        build_model("cogvlm", CogVLMConfig.preset("tiny", projector=projector), seed=0)


# ---------------------------------------------------------------- answers copied (copy_answers)

ANSWER_TEXTS = [f"What colour is the {s}? What size is the {s}? How many {s}s are there? {z} {c} {s} {z} {c} {s} "
                f"{c} {s} {z} 0 1 2 3 4 5 6 7 8 9" for s in SHAPE_NAMES for c in COLOUR_NAMES for z in SIZE_NAMES]  # fmt: skip


def count_histogram(count: float) -> torch.Tensor:
    """The focus's histogram of an executed count (width 0.35, the quickstart's)."""
    from visto.connectors.focus import COUNT_BINS, soft_histogram

    return soft_histogram(torch.tensor([count]), COUNT_BINS, 0.35)


def answer_runs_fixture():
    from visto.connectors.named import VALUES, AttributeWords, answer_runs

    bare = [w for names in (SHAPE_NAMES, COLOUR_NAMES, SIZE_NAMES) for w in names] * 20  # answers' first words
    path_tok = train_tokenizer(ANSWER_TEXTS * 3 + bare, vocab_size=500, loc_bins=32, min_frequency=1)
    words = AttributeWords(path_tok)
    return path_tok, words, VALUES, answer_runs


def one_object_attributes(values: int, shape: str, colour: str, size: str, colour_share: float = 1.0) -> torch.Tensor:
    from visto.connectors.named import KINDS

    out = torch.zeros(values)
    out[KINDS["shape"].index(shape)] = 1
    off = len(KINDS["shape"])
    out[off + KINDS["colour"].index(colour)] = colour_share
    if colour_share < 1:  # the rest on the next colour
        out[off + (KINDS["colour"].index(colour) + 1) % len(KINDS["colour"])] = 1 - colour_share
    out[off + len(KINDS["colour"]) + KINDS["size"].index(size)] = 1
    return out


def test_answer_runs_hold_the_subjects_words_and_its_count():
    tok, words, values, answer_runs = answer_runs_fixture()
    attributes = torch.stack([one_object_attributes(values, "star", "red", "large", 0.8),
                              one_object_attributes(values, "circle", "blue", "small")])[None]  # fmt: skip
    weight = torch.tensor([[1.0, 0.0]])  # the subject is the star
    describe, colour, shape, size, count = answer_runs(words, weight, attributes, count_histogram(2.0))
    assert describe[0].shape[:2] == (1, 3) and colour[0].shape[:2] == (1, 1)

    def held(run, slot: int) -> dict[str, float]:
        ids, w = run[0][0, slot], run[1][0, slot]
        return {tok.decode([int(i)]): round(float(x), 3) for i, x in zip(ids, w, strict=True) if x > 0}

    assert sorted(held(colour, 0).values()) == [0.2, 0.8] and held(colour, 0)["red"] == 0.8
    assert held(describe, 0) == {"large": 1.0}
    assert held(describe, 1)[" red"] == 0.8 and held(describe, 2) == {" star": 1.0}
    assert held(shape, 0) == {"star": 1.0} and held(size, 0) == {"large": 1.0}
    assert max(held(count, 0), key=held(count, 0).get) == "2" and sum(held(count, 0).values()) == pytest.approx(1.0, abs=0.01)
    # Without objects (weights 0) the attribute slots are empty: nothing to copy.
    empty = answer_runs(words, torch.zeros(1, 2), attributes, count_histogram(0.0))
    assert all(run[1].sum() == 0 for run in empty[:4]) and held(empty[4], 0)["0"] == pytest.approx(1.0, abs=0.01)


def test_the_pointer_copies_a_description_word_by_word():
    from visto.connectors.pointer import copy_runs

    tok, words, values, answer_runs = answer_runs_fixture()
    attributes = one_object_attributes(values, "star", "red", "large")[None, None]
    runs = answer_runs(words, torch.ones(1, 1), attributes, count_histogram(1.0))
    END, OPEN = tok.end_id, tok.role_ids["assistant"]
    slots = copy_runs(runs, END)
    head = PointerHead(4, (3, 1, 1, 1, 1))
    head.start_id = OPEN
    with torch.no_grad():
        head.keys.zero_()
        head.query.weight.copy_(torch.eye(4))
        head.keys[0:4, 0] = 1.0  # hidden feature 0 asks for the description run (3 slots and its end)
    logits = torch.full((1, tok.vocab_size), -30.0)
    hidden = torch.tensor([[5.0, 0, 0, 0]])
    out, token = [], OPEN
    for _ in range(4):
        token = int(head(hidden, logits, slots, torch.tensor([token])).argmax())
        out.append(token)
    assert tok.decode(out[:3]) == "large red star" and out[3] == END


def test_config_refuses_copy_answers_without_named_words_and_a_pointer():
    with pytest.raises(UserError, match="copy_answers"):
        ProjectorConfig(kind="regions", focus=True, pointer=True, copy_answers=True)


def test_llava_copies_a_colour_it_never_answered_in_training():
    """copy_answers end to end: trained to answer "What colour is the star?" on images whose
    detector sees a red or a blue star, the model answers "green" for a green one (a word
    it never wrote), by copying the detector's word, in training and generation. Only the
    pointer head trains, so the copy is the one way to the answers (with the decoder
    training too, two images are learned by the LM head from the image's features)."""
    from PIL import Image

    from visto.data.processor import Processor
    from visto.data.sample import Sample, Turn
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    tok, *_ = answer_runs_fixture()
    tok = with_focus_token(tok)
    projector = ProjectorConfig(kind="regions", slots=2, focus=True, pointer=True, named=True, copy_answers=True)
    config = LlavaConfig.preset("tiny", projector=projector)
    config.processor.image_tokens, config.processor.focus_tokens, config.processor.loc_bins = 2, 4, 32
    config.processor.vocab_size = config.decoder.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = build_model("llava", config, seed=0)
    model.processor = Processor(config.processor, tok)
    colours = {(200, 30, 30): "red", (30, 30, 200): "blue", (30, 200, 30): "green"}
    images = {c: Image.new("RGB", (32, 32), c) for c in colours}
    connector = model.multi_modal_projector
    with torch.no_grad():
        seen = {c: model.patch_features(model.collate([Sample("s", [im], [Turn("user", "<image>\n?")])])["pixel_values"])[0]
                for c, im in images.items()}  # fmt: skip

    def heads(features):  # a detector that sees one star of the image's colour
        B, N, _ = features.shape
        out = {"centre": torch.full((B, N), -10.0), "centre_shape": torch.zeros(B, N, 8), "colour": torch.zeros(B, N, 9),
               "size": torch.zeros(B, N, 4), "box": torch.full((B, N, 4), 0.5)}  # fmt: skip
        for b in range(B):
            c = min(seen, key=lambda c: float((seen[c] - features[b]).abs().sum()))
            out["centre"][b, 0] = 10.0
            out["centre_shape"][b, 0, 1 + SHAPE_NAMES.index("star")] = 10.0
            out["colour"][b, 0, 1 + COLOUR_NAMES.index(colours[c])] = 10.0
            out["size"][b, 0, 1] = 10.0
            out["box"][b, 0] = torch.tensor([0.1, 0.1, 0.5, 0.5])
        return out

    connector.heads.forward = heads

    def ask(c, answer=None):
        turns = [Turn("user", "<image>\nWhat colour is the star?")] + ([Turn("assistant", answer)] if answer else [])
        return Sample("s", [images[c]], turns)

    batch = model.collate([ask((200, 30, 30), "red"), ask((30, 30, 200), "blue")])
    opt = torch.optim.AdamW(model.pointer.parameters(), lr=3e-2)
    for _ in range(60):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["token_acc"] == 1.0
    model.eval()
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    prompts = model.prompt_batch([ask(c) for c in colours])
    fast = Engine(model, tok).generate_batch(prompts, greedy)
    # The first word is the copy; where the frozen decoder's answer ends after a word it was
    # never trained on ("green") is the LM head's, which did not train here.
    assert [c.text.strip() for c in fast[:2]] == ["red", "blue"]
    assert [tok.decode(c.token_ids[:1]) for c in fast] == ["red", "blue", "green"]
    generic = Engine(model, tok, fast=False).generate_batch(prompts, greedy)
    assert [c.token_ids for c in generic] == [c.token_ids for c in fast]


def test_the_loss_on_scored_positions_equals_the_loss_on_every_position(tokenizer):
    """Llava.forward with a pointer runs the LM head and the pointer on the scored positions
    only; its loss, accuracy and gradients are those of `answer_logits` over every position."""
    from visto.losses import answer_loss

    torch.manual_seed(0)
    model = reading_llava(tokenizer)
    batch = model.collate([sample(c, text) for c, text in TRAIN_READS.items()])
    fast = model(batch)
    fast["loss"].backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = answer_loss(model.answer_logits(batch), batch["labels"])
    full["loss"].backward()
    assert torch.allclose(fast["loss"], full["loss"], atol=1e-6) and fast["token_acc"] == full["token_acc"]
    assert fast_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(fast_grads[n], p.grad, atol=1e-6), n


@pytest.mark.parametrize("question", [False, True])
def test_decoding_rows_mix_the_copies_as_the_training_forward_does_bit_for_bit(question):
    """`PointerHead.decode` (the engine's hook) caches what does not change between steps and
    moves the script cursors in Python; over a generation it must give `forward`'s numbers
    exactly, and the cursors `advance_cursor` gives, including a row whose token is off the
    script (it resyncs ahead, or waits) and a row past its script's end."""
    from visto.connectors.pointer import advance_cursor, script_token

    g = torch.Generator().manual_seed(0)
    N, M, V, C = 3, 5, 40, 16
    pointer = PointerHead(C, runs=(4, 2), script=True, question=question)
    pointer.start_id = 1
    with torch.no_grad():
        for p in pointer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    K = pointer.slots
    weights = torch.rand(N, K, M, generator=g) * (torch.rand(N, K, 1, generator=g) > 0.3)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-9)
    script = torch.randint(2, V, (N, 9), generator=g)
    script[2, 4:] = -1  # a shorter script, padded
    slots = CopySlots(torch.randint(2, V, (N, K, M), generator=g), weights, torch.tensor([1, 1, 1]),
                      script, None, torch.randn(N, C, generator=g) if question else None)
    reference = CopySlots(slots.ids, slots.weights, slots.prompt_last, script, None, slots.question)
    tokens = None
    for step in range(12):
        hidden, logits = torch.randn(N, C, generator=g), torch.randn(N, V, generator=g)
        fast = pointer.decode(hidden, logits, slots, tokens)
        # the reference: the tensor cursor move and the training forward
        if tokens is None:
            reference.cursor = script.new_zeros(N)
        else:
            reference.cursor = advance_cursor(script, reference.cursor, tokens)
        with torch.inference_mode():
            slow = pointer(hidden, logits, reference, slots.prompt_last if tokens is None else tokens,
                           script_token(script, reference.cursor))
        assert torch.equal(fast, slow), step
        assert torch.equal(slots.cursor, reference.cursor), step
        # row 0 follows its script, row 1 writes a token three ahead (a resync), row 2 an
        # off-script token (its cursor waits) until past its script's end
        at = reference.cursor
        tokens = torch.stack([script[0, at[0].clamp(max=8)], script[1, (at[1] + 3).clamp(max=8)],
                              torch.tensor(0) if step % 3 else script[2, at[2].clamp(max=8)].clamp(min=0)])
    assert slots.cursor[0] == 9  # row 0 wrote its whole script
