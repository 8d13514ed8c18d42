"""Fuyu's question_focus: the region connector's question focus and pointer beside Fuyu's own
path (linearly projected raw patches), a frozen tower serving the focus alone
(models/fuyu.py, models/common.py, pretrained.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from focus_family_support import FOCUS, READS, world_words_tokenizer
from visto.checkpoint import load, save_checkpoint
from visto.connectors.pointer import CopySlots
from visto.connectors.projector import ProjectorConfig
from visto.data.processor import Processor, ProcessorConfig, image_transform
from visto.data.sample import Sample, Turn
from visto.errors import UserError
from visto.infer.engine import Engine
from visto.infer.sampling import SamplingParams
from visto.models.fuyu import FuyuConfig, export_hf
from visto.nn.language import DecoderConfig
from visto.nn.vision import ViTConfig
from visto.pretrained import build_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return world_words_tokenizer(tmp_path_factory.mktemp("tok"))


def processor_config(tokenizer, **overrides) -> ProcessorConfig:
    settings = dict(image_size=32, resize_mode="patch", patch_size=8, image_delimiters=False,
                    vocab_size=tokenizer.vocab_size, loc_bins=32, focus_tokens=8)  # fmt: skip
    return ProcessorConfig(**{**settings, **overrides})


def config(tokenizer, **overrides) -> FuyuConfig:
    settings = dict(question_focus=ProjectorConfig(**FOCUS), processor=processor_config(tokenizer),
                    vision=ViTConfig.preset("tiny"),
                    decoder=DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size))  # fmt: skip
    return FuyuConfig.preset("tiny", **{**settings, **overrides})


def focused(tokenizer, seed: int = 0, **overrides):
    model = build_model("fuyu", config(tokenizer, **overrides), seed=seed)
    model.processor = Processor(model.config.processor, tokenizer)
    with torch.no_grad():  # a detector that finds objects, a focus that is not zero
        model.question_focus.heads.centre.bias.fill_(5.0)
        model.question_focus.focus.out.normal_(std=0.1)
    stand_in_reader(model)
    return model


def stand_in_reader(model) -> None:
    """The reader reads the phrase of the colour the (tower's) image shows."""
    p = model.processor.config
    tower = dataclasses.replace(p, resize_mode="resize", image_size=model.config.vision.image_size)
    means = {c: image_transform(Image.new("RGB", (32, 32), c), tower).mean((1, 2)) for c in READS}

    def read(pixels):
        return [[(READS[min(means, key=lambda c: float((means[c] - image.mean((1, 2))).abs().sum()))],
                  [0, 0, 4, 4])] for image in pixels]  # fmt: skip

    model.question_focus.reader.forward = read


def sample(colour, answer: str | None = None, question: str = "Read the text.", size=(32, 32)) -> Sample:
    turns = [Turn("user", f"<image>\n{question}")] + ([Turn("assistant", answer)] if answer else [])
    return Sample("s", [Image.new("RGB", size, colour)], turns)


def trained(tokenizer, steps: int = 40, **overrides):
    """Trained on reading: each image's answer is what its reader read (a copy)."""
    torch.manual_seed(0)
    model = focused(tokenizer, **overrides)
    batch = model.collate([sample(c, text) for c, text in READS.items()])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model.eval(), batch, out


def test_config_and_export_refuse_what_they_cannot_hold(tokenizer, tmp_path):
    with pytest.raises(UserError, match="set processor.focus_tokens to 8"):
        FuyuConfig.preset("tiny", question_focus=ProjectorConfig(**FOCUS))
    with pytest.raises(UserError, match="only question_focus fills <focus> slots"):
        FuyuConfig.preset("tiny", processor=processor_config(tokenizer))
    with pytest.raises(UserError, match=r"vision \(the tower vision_init names\) is used by question_focus alone"):
        FuyuConfig.preset("tiny", vision=ViTConfig.preset("tiny"))
    with pytest.raises(UserError, match="kind 'regions' with focus true"):
        config(tokenizer, question_focus=ProjectorConfig(kind="regions"))
    with pytest.raises(UserError, match="vision_feature_layer"):
        config(tokenizer, vision_feature_layer=9)
    model = focused(tokenizer)
    with pytest.raises(UserError, match="no question focus"):
        export_hf(model, tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()
    # a plain Fuyu: no tower, no connector, no new keys; a processor with <focus> slots refused
    plain = build_model("fuyu", FuyuConfig.preset("tiny", decoder=DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size),
                                                   processor=processor_config(tokenizer, focus_tokens=0)), seed=0)  # fmt: skip
    assert plain.question_focus is None and plain.vision_tower is None and plain.pointer is None
    assert {k.split(".")[0] for k in plain.state_dict()} == {"vision_embed_tokens", "language_model"}
    with pytest.raises(UserError, match="<focus> slots"):
        plain.processor = Processor(processor_config(tokenizer), tokenizer)


def test_the_tower_reads_each_image_rebuilt_from_its_patches(tokenizer):
    """An image of the tower's size reaches the tower as a "resize" processor gives it; another
    size is stretched to the tower's square from its patch canvas."""
    model = focused(tokenizer)
    rng = torch.Generator().manual_seed(0)
    noise = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(noise)
    tower = dataclasses.replace(model.processor.config, resize_mode="resize")
    batch = model.collate([Sample("a", [image], [Turn("user", "<image>\nRead the text."), Turn("assistant", "red")]),
                           sample((200, 30, 30), "red star", size=(16, 24))])  # fmt: skip
    images = model.tower_images(batch["pixel_values"], batch["image_grids"])
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images[0], image_transform(image, tower), rtol=0, atol=0)
    # the 16 x 24 image: a 2 x 3 patch canvas (24 x 16 px) stretched to 32 x 32; red inside
    assert images[1, 0].mean() > 0.5 and images[1, 2].mean() < 0


def test_a_training_step_reaches_the_focus_the_pointer_and_the_patches(tokenizer):
    model = focused(tokenizer)
    batch = model.collate([sample(c, text) for c, text in READS.items()])
    out = model(batch)
    out["loss"].backward()
    connector = model.question_focus
    assert connector.focus.out.grad.abs().sum() > 0
    assert connector.pointer.keys.grad.abs().sum() > 0
    assert connector.feature.weight.grad.abs().sum() > 0  # object tokens read the tower's features
    assert model.vision_embed_tokens.weight.grad.abs().sum() > 0  # Fuyu's own path
    assert connector.heads.centre.bias.grad is None  # the detector is frozen (no gradient)
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    # the loss on the scored positions equals the loss on every position's logits
    from visto.losses import answer_loss

    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model.logits(batch), batch["labels"])["loss"], out["loss"])


def test_answers_change_with_the_image_and_decoding_equals_a_full_forward(tokenizer):
    """After training on reading, the answers are each image's words (they change with the
    image: a copy), and greedy decoding by prefill + decode_step (the engine's fast path and
    the model's own) equals a full forward's argmax."""
    model, _, out = trained(tokenizer)
    assert out["token_acc"] == 1.0
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    colours = list(READS)
    prompts = model.prompt_batch([sample(c) for c in colours])
    fast = Engine(model, model.processor.tokenizer).generate_batch(prompts, greedy)
    assert [c.text.strip() for c in fast] == list(READS.values())
    generic = Engine(model, model.processor.tokenizer, fast=False).generate_batch(prompts, greedy)
    assert [c.token_ids for c in generic] == [c.token_ids for c in fast]
    for row, completion in enumerate(fast):  # a full forward over prompt + answer so far
        answer = sample(colours[row], model.processor.tokenizer.decode(completion.token_ids))
        batch = model.collate([answer])
        with torch.no_grad():
            logits = model.logits(batch)
        ids = batch["input_ids"][0]
        start = int((ids == model.question_focus.focus.assistant_id).nonzero()[-1])
        predicted = logits[0, start : start + len(completion.token_ids)].argmax(-1).tolist()
        assert predicted == completion.token_ids
    # the patches alone (the focus's image kept) change the logits too: both paths see
    prompt = model.prompt_batch([sample(colours[0])])
    other = model.prompt_batch([sample(colours[1])])
    logits, _ = model.prefill(prompt)
    original = model.embed_inputs
    try:
        model.embed_inputs = lambda ids, pixels, *rest: original(ids, other.pixel_values, *rest)
        swapped, _ = model.prefill(prompt)
    finally:
        del model.embed_inputs
    assert (logits - swapped).abs().max() > 1e-3


def test_fast_path_logits_match_the_models_own_decoding_with_rows_joining(tokenizer):
    """The engine's runner (the pointer on its output logits) and the model's own
    prefill/decode_step agree within 1e-5 at every step; rows keep their slots."""
    from visto.infer.runner import DecoderRunner

    model, _, _ = trained(tokenizer, steps=10)
    prompts = model.prompt_batch([sample(c) for c in READS])
    runner = DecoderRunner.for_model(model)
    fast, fast_state = runner.prefill(prompts)
    own, own_state = model.prefill(prompts)
    assert isinstance(own_state.slots, CopySlots) and isinstance(fast_state.context, CopySlots)
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-5)
    for _ in range(4):
        next_ids = own.argmax(-1)
        fast, fast_state = runner.decode_step(next_ids, fast_state)
        own, own_state = model.decode_step(next_ids, own_state)
        torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-5)
    kept = own_state.select(torch.tensor([2, 0])).slots
    assert torch.equal(kept.ids[0], own_state.slots.ids[2])


def test_checkpoint_round_trip_keeps_the_focus_and_its_answers(tokenizer, tmp_path):
    model, batch, _ = trained(tokenizer, steps=10)
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt").eval()
    assert again.config.question_focus is not None and again.pointer is not None
    assert not any(p.requires_grad for p in again.vision_tower.parameters())
    again.question_focus.reader.forward = model.question_focus.reader.forward
    with torch.no_grad():
        torch.testing.assert_close(again(batch)["loss"], model(batch)["loss"], rtol=1e-6, atol=1e-6)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = model.prompt_batch([sample(c) for c in READS])
    assert [c.token_ids for c in Engine(again, again.processor.tokenizer).generate_batch(prompts, greedy)] == [
        c.token_ids for c in Engine(model, model.processor.tokenizer).generate_batch(prompts, greedy)
    ]


def test_the_tower_and_detector_come_from_the_vision_init_checkpoint(tokenizer, tmp_path):
    """As LLaVA's regions projector: the tower and its dense heads (and reader) from a visto
    LLaVA checkpoint, the processor its normalisation."""
    from visto.models.llava import LlavaConfig

    processor = ProcessorConfig(image_size=32, image_tokens=3, image_delimiters=False, mean=(0.4, 0.4, 0.4),
                                vocab_size=tokenizer.vocab_size, loc_bins=32, focus_tokens=8)  # fmt: skip
    llava_cfg = LlavaConfig.preset("tiny", projector=ProjectorConfig(kind="regions", slots=3, focus=True, read_slots=4),
                                   processor=processor,
                                   decoder=DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size))  # fmt: skip
    llava = build_model("llava", llava_cfg, seed=1)
    llava.processor = Processor(llava_cfg.processor, tokenizer)
    with torch.no_grad():
        llava.multi_modal_projector.heads.centre.bias.fill_(3.0)
    save_checkpoint(llava, tmp_path / "tower")
    model = build_model("fuyu", config(tokenizer, vision=None, vision_init=str(tmp_path / "tower")), seed=0)
    assert model.config.vision_init is None and model.config.vision == llava.config.vision
    assert model.config.processor.mean == (0.4, 0.4, 0.4)
    for k, v in llava.vision_tower.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[k], v), k
    for k, v in llava.multi_modal_projector.heads.state_dict().items():
        assert torch.equal(model.question_focus.heads.state_dict()[k], v), k
    for k, v in llava.multi_modal_projector.reader.state_dict().items():
        assert torch.equal(model.question_focus.reader.state_dict()[k], v), k
    # a plain Fuyu naming a tower: refused once the tower is read (it would serve nothing)
    plain = FuyuConfig.preset("tiny", decoder=DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size),
                              vision_init=str(tmp_path / "tower"))  # fmt: skip
    with pytest.raises(UserError, match="used by question_focus alone"):
        build_model("fuyu", plain, seed=0)


@pytest.mark.parametrize("with_focus", [False, True])
def test_compare_gives_fuyu_the_tower_only_with_the_focus(tmp_path, monkeypatch, with_focus):
    """compare's train_family: a plain Fuyu recipe gets no vision_init and is credited the
    tower's minutes as steps; one with question_focus gets the shared tower (and the detector's
    JSON boxes) and no credit."""
    import visto.compare as compare
    import visto.quickstart
    import visto.train.loop
    import visto.train.recipe as recipe_module

    original = recipe_module.load_recipe
    focus = {**FOCUS, "slots": 10, "read_slots": 8}
    extra = ([f"model.config.question_focus={json.dumps(focus)}", "model.config.processor.focus_tokens=12"]
             if with_focus else ["model.config.question_focus=null", "model.config.processor.focus_tokens=0",
                                 "optim.module_lrs={}"])  # fmt: skip
    monkeypatch.setattr(recipe_module, "load_recipe", lambda name, overrides=None: original(name, [*(overrides or []), *extra]))
    monkeypatch.setattr(visto.quickstart, "write_detector_boxes", lambda *a: None)
    seen = {}

    class Stop(Exception):
        pass

    def train(recipe, run_dir, console=None):
        seen["recipe"] = recipe
        raise Stop

    monkeypatch.setattr(visto.train.loop, "train", train)
    cfg = compare.CompareConfig(families=["fuyu"])
    with pytest.raises(Stop):
        compare.train_family("fuyu", cfg, tmp_path, tmp_path / "world", tmp_path / "vision",
                             console=type("C", (), {"print": staticmethod(lambda *a, **k: None)})())  # fmt: skip
    recipe = seen["recipe"]
    plain_steps = original("compare-fuyu", extra).max_steps
    if with_focus:
        assert recipe.model.config["vision_init"] == str(tmp_path / "vision")
        assert recipe.max_steps == plain_steps and recipe.data.json_boxes is not None
    else:
        assert "vision_init" not in recipe.model.config
        assert recipe.max_steps == compare.family_budget(cfg, plain_steps, takes_tower=False)[0] > plain_steps
