"""Processor unit tests: image transforms, encoding, label mask, truncation, collator, save/load."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from PIL import Image

from visto.data.processor import (
    IGNORE_INDEX,
    Processor,
    ProcessorConfig,
    image_transform,
    load_rgb,
    patch_image_transform,
    patchify,
    train_tokenizer,
)
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import END_OF_TURN
from visto.errors import UserError

WORDS = "how many red blue circles squares are there left of the what colour is shape".split()


def corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(), vocab_size=500, loc_bins=100)


def make(tokenizer, **kw) -> Processor:
    kw = {"image_size": 16, "image_tokens": 4, **kw}
    return Processor(ProcessorConfig(**kw), tokenizer)


def solid(w: int, h: int, colour=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def exif_jpeg(orientation: int) -> bytes:
    """A 40x20 JPEG, left half red, right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


# ----------------------------------------------------------------------------- images

PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def test_pad_mode_keeps_aspect_and_centres() -> None:
    cfg = ProcessorConfig(image_size=16, resize_mode="pad", **PLAIN)
    x = image_transform(solid(40, 20), cfg)  # fits as 16x8, centred: rows 4..11
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.all(x[:, :4] == 0) and torch.all(x[:, 12:] == 0)  # mean-colour padding
    assert torch.allclose(x[:, 4:12], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))


def test_resize_mode_fills_the_square() -> None:
    cfg = ProcessorConfig(image_size=16, resize_mode="resize", **PLAIN)
    x = image_transform(solid(40, 20), cfg)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 16, 16))


def test_normalize_values() -> None:
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = ProcessorConfig(image_size=8, resize_mode="resize", mean=mean, std=std)
    x = image_transform(solid(8, 8, (255, 0, 51)), cfg)
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), mean, std, strict=True)]
    assert torch.allclose(x[:, 3, 3], torch.tensor(expected), atol=1e-6)
    # the pad colour is the mean, so padding normalizes to (nearly) zero
    padded = image_transform(solid(16, 2), ProcessorConfig(image_size=8, mean=mean, std=std))
    assert padded[:, 0].abs().max() < 0.01


@pytest.mark.parametrize("as_pil", [False, True])
def test_exif_rotation_is_honoured(as_pil: bool) -> None:
    data = exif_jpeg(6)  # 6: display rotated 90 degrees clockwise
    source = Image.open(io.BytesIO(data)) if as_pil else data
    cfg = ProcessorConfig(image_size=16, resize_mode="pad", **PLAIN)
    x = image_transform(source, cfg)
    # Upright, the image is 20 wide x 40 tall: red on top, blue below, padding left and right.
    assert torch.all(x[:, :, :4].abs() < 0.05) and torch.all(x[:, :, 12:].abs() < 0.05)
    top, bottom = x[:, 1:6, 6:10].mean(dim=(1, 2)), x[:, 10:15, 6:10].mean(dim=(1, 2))
    assert top[0] > 0.8 and top[2] < 0.2 and bottom[2] > 0.8 and bottom[0] < 0.2
    _, grid = patch_image_transform(
        source, ProcessorConfig(image_size=64, resize_mode="patch", patch_size=4)
    )
    assert grid == (10, 5)  # rows, cols of the upright 20x40 image


def test_load_rgb_bounds_and_modes(tmp_path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_rgb(Image.new("L", (2, 2), 7)).mode == "RGB"
    path = tmp_path / "x.png"
    solid(3, 5).save(path)
    assert load_rgb(path).size == (3, 5)
    with pytest.raises(UserError):
        load_rgb(b"not an image")


def test_patch_mode_pads_to_patch_multiple_and_only_shrinks() -> None:
    cfg = ProcessorConfig(image_size=32, resize_mode="patch", patch_size=8, **PLAIN)
    x, grid = patch_image_transform(solid(13, 9), cfg)  # kept at 13x9, padded to 16x16
    assert grid == (2, 2) and x.shape == (3, 16, 16)
    assert torch.all(x[:, :9, :13] == torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))
    assert torch.all(x[:, 9:] == 0) and torch.all(x[:, :, 13:] == 0)
    x, grid = patch_image_transform(solid(100, 30), cfg)  # shrunk to 32x10 -> 4 cols, 2 rows
    assert grid == (2, 4) and x.shape == (3, 16, 32)


def test_patchify_matches_a_strided_conv() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8, 12)
    weight = torch.randn(5, 3, 4, 4)
    conv = torch.nn.functional.conv2d(x[None], weight, stride=4)[0]  # (5, 2, 3)
    patches = patchify(x, 4)  # (6, 48)
    assert patches.shape == (6, 48)
    assert torch.allclose(patches @ weight.view(5, -1).T, conv.flatten(1).T, atol=1e-5)


# ----------------------------------------------------------------------------- encoding


def test_encode_layout_and_labels(tokenizer) -> None:
    proc = make(tokenizer)
    tok = tokenizer
    sample = Sample(
        "s",
        images=[solid(10, 10)],
        turns=[
            Turn("system", "be brief"),
            Turn("user", "<image>how many?"),
            Turn("assistant", "two"),
            Turn("user", "colour?"),
            Turn("assistant", "red"),
        ],
    )
    enc = proc.encode(sample)
    ids = enc.input_ids.tolist()
    span = [tok.im_start_id, *[tok.image_id] * 4, tok.im_end_id]
    expected = (
        [tok.bos_id, tok.role_ids["system"], *tok.encode("be brief"), tok.end_id]
        + [tok.role_ids["user"], *span, *tok.encode("how many?"), tok.end_id]
        + [tok.role_ids["assistant"], *tok.encode("two"), tok.end_id]
        + [tok.role_ids["user"], *tok.encode("colour?"), tok.end_id]
        + [tok.role_ids["assistant"], *tok.encode("red"), tok.end_id]
    )
    assert ids == expected
    learnt = [i for i, lab in zip(ids, enc.labels.tolist(), strict=True) if lab != IGNORE_INDEX]
    assert learnt == [*tok.encode("two"), tok.end_id, *tok.encode("red"), tok.end_id]
    assert enc.pixel_values.shape == (1, 3, 16, 16) and enc.image_token_counts == [4]
    assert enc.num_loss_tokens == len(learnt) and not enc.truncated


def test_inference_mode_drops_reference_answer_and_adds_generation_prompt(tokenizer) -> None:
    proc = make(tokenizer)
    sample = Sample(
        "s", images=[solid(5, 5)], turns=[Turn("user", "<image>how many?"), Turn("assistant", "2")]
    )
    enc = proc.encode(sample, train=False)
    assert enc.input_ids[-1].item() == tokenizer.role_ids["assistant"]
    assert tokenizer.decode(enc.input_ids.tolist()).endswith("how many?<|end|><|assistant|>")
    assert enc.num_loss_tokens == 0
    with pytest.raises(UserError, match="max_length"):
        proc.encode(sample, train=False, max_length=5)


def test_images_in_assistant_turns_get_no_loss(tokenizer) -> None:
    proc = make(tokenizer, image_tokens=2)
    sample = Sample(
        "s",
        images=[solid(5, 5)],
        turns=[Turn("user", "draw"), Turn("assistant", "here<image>done")],
    )
    enc = proc.encode(sample)
    learnt = enc.input_ids[enc.labels != IGNORE_INDEX].tolist()
    assert tokenizer.decode(learnt) == "heredone" + END_OF_TURN


def test_images_without_placeholders_go_first_and_mismatch_is_a_user_error(tokenizer) -> None:
    proc = make(tokenizer, image_tokens=1)
    sample = Sample(
        "s",
        images=[solid(5, 5), solid(6, 6)],
        turns=[Turn("user", "compare"), Turn("assistant", "same")],
    )
    enc = proc.encode(sample)
    assert enc.pixel_values.shape[0] == 2 and (enc.input_ids == tokenizer.image_id).sum() == 2
    bad = Sample(
        "s", images=[solid(5, 5)], turns=[Turn("user", "<image><image>"), Turn("assistant", "x")]
    )
    with pytest.raises(UserError, match="placeholder"):
        proc.encode(bad)


def test_truncation_moves_back_before_an_image_span(tokenizer) -> None:
    proc = make(tokenizer, image_tokens=4)
    sample = Sample(
        "s",
        images=[solid(5, 5), solid(5, 5)],
        turns=[Turn("user", "a<image>b<image>c"), Turn("assistant", "red")],
    )
    full = proc.encode(sample)
    second_start = full.input_ids.tolist().index(tokenizer.im_start_id, 5)
    enc = proc.encode(sample, max_length=second_start + 3)  # lands inside the second span
    assert len(enc.input_ids) == second_start and enc.truncated
    assert enc.pixel_values.shape[0] == 1 and enc.image_token_counts == [4]
    assert enc.num_loss_tokens == 0  # the answer was cut away entirely


def test_per_image_token_counts_and_no_delimiters(tokenizer) -> None:
    proc = make(tokenizer, image_delimiters=False)
    sample = Sample(
        "s", images=[solid(5, 5), solid(5, 5)], turns=[Turn("user", "<image><image>hi")]
    )
    enc = proc.encode(sample, image_token_counts=[2, 5])
    assert enc.image_token_counts == [2, 5] and (enc.input_ids == tokenizer.image_id).sum() == 7
    assert tokenizer.im_start_id not in enc.input_ids.tolist()
    with pytest.raises(ValueError, match="one positive token count per image"):
        proc.encode(sample, image_token_counts=[2])


def test_ids_match_hf_apply_chat_template(tokenizer) -> None:
    # One <image> id per image and no delimiters: our ids are exactly what HF clients tokenize.
    proc = make(tokenizer, image_tokens=1, image_delimiters=False)
    turns = [
        Turn("system", "be brief"),
        Turn("user", "<image>\nhow many red circles?"),
        Turn("assistant", " 3 <loc_4>"),
    ]
    sample = Sample("s", images=[solid(5, 5)], turns=turns)
    hf = tokenizer.to_hf_tokenizer()
    messages = [{"role": t.role, "content": t.content} for t in turns]
    hf_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert proc.encode(sample).input_ids.tolist() == list(hf_ids)
    prompt = hf.apply_chat_template(
        messages[:2], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert proc.encode(sample, train=False).input_ids.tolist() == list(prompt["input_ids"])


def test_patch_mode_encoding(tokenizer) -> None:
    proc = make(tokenizer, image_size=16, resize_mode="patch", patch_size=4)
    sample = Sample(
        "s",
        images=[solid(12, 8), solid(4, 4)],
        turns=[Turn("user", "<image>x<image>"), Turn("assistant", "y")],
    )
    enc = proc.encode(sample)
    assert enc.image_grids == [(2, 3), (1, 1)] and enc.image_token_counts == [6, 1]
    assert enc.pixel_values.shape == (7, 48)
    ids = enc.input_ids.tolist()
    assert ids.count(tokenizer.image_id) == 7 and ids.count(tokenizer.im_newline_id) == 3
    row = [tokenizer.image_id] * 3 + [tokenizer.im_newline_id]
    first = ids.index(tokenizer.im_start_id)
    assert ids[first + 1 : first + 9] == row * 2 and ids[first + 9] == tokenizer.im_end_id


def test_encode_text(tokenizer) -> None:
    proc = make(tokenizer)
    ids = proc.encode_text("how many red circles are there").tolist()
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    short = proc.encode_text("how many red circles are there", max_length=4).tolist()
    assert len(short) == 4 and short[-1] == tokenizer.eos_id and short[1:3] == ids[1:3]


# ----------------------------------------------------------------------------- collator


def test_collator_right_and_left_padding(tokenizer) -> None:
    proc = make(tokenizer, image_tokens=2)
    a = proc.encode(
        Sample(
            "a",
            images=[solid(5, 5), solid(5, 5)],
            turns=[Turn("user", "<image><image>many"), Turn("assistant", "two")],
        )
    )
    b = proc.encode(Sample("b", turns=[Turn("user", "hi"), Turn("assistant", "red")]))
    c = proc.encode(
        Sample(
            "c", images=[solid(5, 5)], turns=[Turn("user", "<image>"), Turn("assistant", "blue")]
        )
    )
    la, lb = len(a.input_ids), len(b.input_ids)
    batch = proc.collator()([a, b, c])
    assert batch.input_ids.shape == (3, la)
    assert torch.equal(batch.input_ids[1, :lb], b.input_ids)
    assert torch.all(batch.input_ids[1, lb:] == tokenizer.pad_id)
    assert torch.all(batch.labels[1, lb:] == IGNORE_INDEX) and torch.equal(
        batch.labels[1, :lb], b.labels
    )
    assert batch.attention_mask[1].tolist() == [1] * lb + [0] * (la - lb)
    assert batch.position_ids[1, :lb].tolist() == list(range(lb))
    assert batch.pixel_values.shape == (3, 3, 16, 16)
    assert batch.image_sample_index.tolist() == [0, 0, 2] and batch.image_token_counts.tolist() == [
        2,
        2,
        2,
    ]
    assert batch.image_grids is None
    # every image id in row r belongs to an image of row r
    per_row = (batch.input_ids == tokenizer.image_id).sum(dim=1).tolist()
    assert per_row == [4, 0, 2]

    left = proc.collator("left")([a, b])
    assert torch.equal(left.input_ids[1, la - lb :], b.input_ids)
    assert left.attention_mask[1].tolist() == [0] * (la - lb) + [1] * lb
    assert left.position_ids[1, la - lb :].tolist() == list(range(lb))
    moved = left.to("cpu", dtype=torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long


def test_collator_patch_mode_and_imageless_batch(tokenizer) -> None:
    proc = make(tokenizer, resize_mode="patch", patch_size=4)
    a = proc.encode(Sample("a", images=[solid(8, 4)], turns=[Turn("user", "<image>")]))
    b = proc.encode(Sample("b", turns=[Turn("user", "x")]))
    batch = proc.collator()([a, b])
    assert batch.pixel_values.shape == (2, 48) and batch.image_grids.tolist() == [[1, 2]]
    empty = make(tokenizer).collator()(
        [make(tokenizer).encode(Sample("e", turns=[Turn("user", "x")]))]
    )
    assert empty.pixel_values.shape == (0, 3, 16, 16) and empty.image_sample_index.numel() == 0


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tokenizer, tmp_path) -> None:
    proc = make(tokenizer, resize_mode="resize", max_length=40, mean=(0.1, 0.2, 0.3))
    proc.save(tmp_path / "ckpt")
    again = Processor.load(tmp_path / "ckpt")
    assert again.config == proc.config
    sample = Sample(
        "s",
        images=[solid(9, 5)],
        turns=[Turn("user", "<image>how many?"), Turn("assistant", "two")],
    )
    x, y = proc.encode(sample), again.encode(sample)
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert torch.equal(x.pixel_values, y.pixel_values)


def test_load_errors_are_user_errors(tokenizer, tmp_path) -> None:
    with pytest.raises(UserError, match="processor.json"):
        Processor.load(tmp_path)
    make(tokenizer).save(tmp_path)
    data = json.loads((tmp_path / "processor.json").read_text())
    (tmp_path / "processor.json").write_text(json.dumps({**data, "imag_size": 3}))
    with pytest.raises(UserError, match="imag_size"):
        Processor.load(tmp_path)
    (tmp_path / "processor.json").write_text(json.dumps({**data, "loc_bins": 10}))
    with pytest.raises(UserError, match="location tokens"):
        Processor.load(tmp_path)
    with pytest.raises(UserError, match="resize_mode"):
        ProcessorConfig(resize_mode="crop")
