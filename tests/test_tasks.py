"""Task prompts and parsers: they read back every answer the synthetic world writes."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from visto.data.sample import IMAGE_PLACEHOLDER, Sample
from visto.data.synth import WorldConfig, generate_world, iter_samples
from visto.data.synth.tasks import json_target
from visto.data.tokenizer import format_box
from visto.errors import UserError
from visto.tasks import caption, classify, count, detect, extract, ground, ocr, vqa
from visto.tasks.common import Box, norm_to_pixels, pixels_to_norm
from visto.tasks.draw import PALETTE, draw_boxes
from visto.tasks.fewshot import few_shot


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(n=30, size=64, seed=11), root, workers=1)
    return root


def samples(world, task):
    return list(iter_samples(world, "train", tasks=[task]))


def test_every_prompt_is_one_user_turn_with_one_image():
    for turns in (
        caption.build_prompt(),
        vqa.build_prompt("What colour is the circle?"),
        count.build_prompt("circles"),
        ocr.build_prompt(),
        ground.build_prompt("the red circle"),
        detect.build_prompt(),
        extract.build_prompt(),
        extract.build_prompt({"type": "object"}),
        classify.build_prompt(),
        classify.build_prompt(["red circle", "blue star"]),
    ):
        assert len(turns) == 1 and turns[0].role == "user"
        assert turns[0].content.startswith(IMAGE_PLACEHOLDER + "\n")
        Sample("q", [Image.new("RGB", (8, 8))], turns).normalized()  # placeholders match


def test_prompts_use_the_world_phrasing():
    assert count.build_prompt("circles")[0].content.endswith("How many circles are there?")
    assert ground.build_prompt("the red circle")[0].content.endswith("Where is the red circle?")
    assert ocr.build_prompt()[0].content.endswith("Read all the text in the image.")
    with pytest.raises(UserError):
        ground.build_prompt("  ")
    with pytest.raises(UserError):
        vqa.build_prompt("")


def test_count_parser_reads_world_answers(world):
    items = [s for s in samples(world, "vqa") if s.truth["qtype"] == "count"]
    assert items
    for s in items:
        assert count.parse(s.turns[-1].content) == s.truth["item"]["count"]
    assert count.parse("There are three.") == 3


def test_ground_parser_reads_world_answers_as_norm_and_pixels(world):
    items = samples(world, "ground")
    assert items
    for s in items:
        obj = s.truth["objects"][s.truth["item"]["object"]]
        [box] = ground.parse(s.turns[-1].content, s.images[0].size)
        assert box.norm == obj["box_norm"]
        assert all(abs(a - b) <= 1 for a, b in zip(box.pixels, obj["box"], strict=True))
        # The same box as location tokens comes back within one bin (10 of 1000).
        [binned] = ground.parse(format_box(obj["box_norm"]), s.images[0].size)
        assert all(abs(a - b) <= 10 for a, b in zip(binned.norm, obj["box_norm"], strict=True))


def test_box_geometry_round_trip():
    # Pixels -> 0..999 -> pixels is exact for images up to 999 px a side (a 0..999 step is
    # at most half a pixel); the other way round loses what pixels cannot hold.
    size = (640, 480)
    for box in ([0, 0, 640, 480], [12, 400, 300, 479], [1, 2, 3, 4]):
        assert norm_to_pixels(pixels_to_norm(box, size), size) == box
    assert pixels_to_norm([-5, 0, 700, 480], size) == [0, 0, 999, 999]  # clamped
    assert Box.from_norm([0, 0, 999, 999], (100, 50)).pixels == [0, 0, 100, 50]


def test_ocr_extract_classify_read_world_answers(world):
    for s in samples(world, "ocr"):
        assert ocr.parse(s.turns[-1].content + "  \n") == s.turns[-1].content
    json_items = samples(world, "json")
    for s in json_items:
        result = extract.parse(s.turns[-1].content)
        assert result.valid and result.value == json_target(s.truth)
    assert not extract.parse("{oops").valid
    for s in samples(world, "classify"):
        label = s.truth["label"]["class"]
        assert classify.parse(s.turns[-1].content) == label
        assert classify.parse(f"It is a {label}.", ["red star", label]) == label
    assert classify.parse("a large red circle", ["red circle", "circle"]) == "red circle"
    assert classify.parse("no idea", ["red circle"]) is None


def test_detect_reads_world_json_and_free_text(world):
    for s in samples(world, "json"):
        boxes = detect.parse(s.turns[-1].content, s.images[0].size)
        objects = json.loads(s.turns[-1].content)["objects"]
        assert [b.norm for b in boxes] == [o["box"] for o in objects]
        assert [b.label for b in boxes] == [
            f"{o['size']} {o['colour']} {o['shape']}" for o in objects
        ]
    text = f"red circle [10, 20, 110, 220]; blue square {format_box([500, 500, 900, 900])}"
    found = detect.parse(text, (1000, 1000))
    assert [b.label for b in found] == ["red circle", "blue square"]
    assert found[0].norm == [10, 20, 110, 220] and found[1].norm == [
        504,
        504,
        904,
        904,
    ]  # bin middles
    assert found[0].to_json() == {
        "box": [10, 20, 110, 220],
        "box_pixels": [10, 20, 110, 220],
        "label": "red circle",
    }


def test_vqa_and_caption_parsers():
    assert vqa.parse("Yes.\nBecause I can see it.") == "Yes"
    assert vqa.parse("\n  red  ") == "red"
    assert caption.parse(" A red\n circle. ") == "A red circle."


def test_few_shot_puts_demonstrations_first():
    imgs = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    s = few_shot([(imgs[0], "Colour?", "red"), (imgs[1], "Colour?", "green")], (imgs[2], "Colour?"))
    assert s.images == imgs
    assert [t.role for t in s.turns] == ["user", "assistant", "user", "assistant", "user"]
    assert [t.content for t in s.turns[1::2]] == ["red", "green"]
    assert s.normalized() is s  # one placeholder per image, in order
    with pytest.raises(UserError):
        few_shot([(imgs[0], "Colour?")], (imgs[2], "Colour?"))


def test_draw_boxes_outlines_without_touching_the_input():
    image = Image.new("RGB", (100, 50), "white")
    out = draw_boxes(image, [[10, 10, 60, 40]], ["red circle"], width=1)
    assert image.getpixel((10, 25)) == (255, 255, 255)  # input untouched
    colour = tuple(int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    assert out.size == image.size
    assert out.getpixel((10, 25)) == colour and out.getpixel((59, 25)) == colour
    assert out.getpixel((35, 25)) == (255, 255, 255)  # inside stays clear
    norm = draw_boxes(image, [[100, 200, 600, 800]], normalized=True, width=1)
    assert norm.getpixel((10, 25)) == colour  # 100/999 of 100 px -> x = 10


class OneHotTwoTower:
    """Embeds an image by its dominant colour and a text by the colour name it contains."""

    names = ("red", "green", "blue")

    def embed_images(self, images):
        return torch.stack(
            [torch.tensor(img.getpixel((0, 0)), dtype=torch.float) for img in images]
        )

    def embed_texts(self, texts):
        return torch.tensor([[float(n in t) for n in self.names] for t in texts])


def test_zero_shot_ranks_labels_by_similarity():
    images = [Image.new("RGB", (4, 4), c) for c in ("blue", "red")]
    out = classify.zero_shot(OneHotTwoTower(), images, ["red", "green", "blue"], top_k=2)
    assert [r[0][0] for r in out] == ["blue", "red"]
    assert len(out[0]) == 2 and out[0][0][1] > 0.99  # scale 100: a near one-hot softmax
    with pytest.raises(UserError):
        classify.zero_shot(OneHotTwoTower(), images, [])
