"""`visto.tasks.runner`: box spelling, task prompts, streaming, make_generate, history."""

from __future__ import annotations

import pytest
from PIL import Image

from test_chat import ANSWER_PLAIN, train_tiny_llava  # the shared tiny run
from visto.data.sample import Sample, Turn
from visto.errors import UserError
from visto.tasks import ground
from visto.tasks.runner import (
    Chat,
    answer,
    make_generate,
    parse_reply,
    task_question,
)
from visto.tasks.runner import (
    json_constraints as make_constraints,
)


def test_task_questions_use_the_task_prompts():
    assert task_question(None, " How many stars? ") == "How many stars?"
    assert task_question("count", "stars") == "How many stars are there?"
    assert task_question("count", "How many red things?") == "How many red things?"
    assert task_question("ground", "the red circle") == "Where is the red circle?"
    assert task_question("caption", "ignored") == "Describe this image."
    assert task_question("detect", "").endswith("as JSON.")
    assert '"type":"object"' in task_question("extract", '{"type": "object"}')
    with pytest.raises(UserError, match="not valid JSON"):
        task_question("extract", "{oops")
    with pytest.raises(UserError, match="empty"):
        task_question("vqa", "  ")
    with pytest.raises(UserError, match="unknown task"):
        task_question("dance", "q")


def test_parse_reply_reads_boxes_in_pixels_and_task_values():
    boxes, found = parse_reply("[0, 0, 999, 499]", "ground", (200, 100), 32)
    assert boxes == found and found[0].norm == [0, 0, 999, 499] and found[0].pixels == [0, 0, 200, 50]
    assert parse_reply("There are three.", "count", None, 32)[0] == 3
    detected, _ = parse_reply(
        '{"objects": [{"shape": "star", "colour": "red", "size": "small", "box": [1, 2, 3, 4]}]}',
        "detect", (999, 999), 32,
    )  # fmt: skip
    assert detected[0].label == "small red star" and detected[0].pixels == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import visto
    from visto.data.images import open_image
    from visto.data.synth import iter_records

    world, run = train_tiny_llava(tmp_path_factory.mktemp("runner"))
    record = next(iter_records(world, "test"))
    return visto.load(run / "checkpoint"), open_image(world / record["image"]), world


def test_stream_holds_location_tokens_until_the_box_is_whole(tiny):
    model, image, _ = tiny
    stream = Chat(model, [image]).ask("red circle", task="ground", stream=True)
    pieces = list(stream)
    assert "".join(pieces) == ANSWER_PLAIN == stream.reply.text
    assert not any("<loc_" in p for p in pieces)
    assert stream.reply.boxes[0].pixels == [7, 10, 31, 40]


def test_history_is_read_and_kept(tiny):
    model, image, _ = tiny
    chat = Chat(model, [image])
    first = chat.ask("How many stars?")
    second = chat.ask("And squares?")
    assert second.prompt_tokens > first.prompt_tokens
    assert [t.role for t in chat.turns] == ["user", "assistant", "user", "assistant"]
    # `answer` with that history sees the same prompt as the chat's next turn.
    history = [Turn("user", "How many stars?"), Turn("assistant", ANSWER_PLAIN)]
    again = answer(model, [image], "And squares?", history=history)
    assert again.prompt_tokens == second.prompt_tokens and again.text == second.text


def test_make_generate_answers_every_prompt_with_plain_boxes(tiny):
    model, image, _ = tiny
    prompts = [
        Sample("a", [image], ground.build_prompt("red circle")),
        Sample("b", [image], [Turn("user", "<image>\nWhat is at [0, 0, 500, 500]?")]),
        Sample("c", [image], [Turn("user", "<image>\nDescribe the image as JSON.")]),
    ]
    generate = make_generate(model, None, True, max_new_tokens=8, json_max_new_tokens=12)
    answers = generate(prompts)
    assert answers[:2] == [ANSWER_PLAIN, ANSWER_PLAIN]
    # The JSON prompt is decoded under the world's grammar when xgrammar is installed.
    if make_constraints(model) is not None:
        assert answers[2].startswith('{"objects":')
    # The same prompt alone or in a batch gives the same greedy answer.
    assert generate(prompts[:1]) == answers[:1]


def test_a_model_that_cannot_generate_is_a_user_error():
    class TwoTower:
        family = "clip"
        processor = object()

    with pytest.raises(UserError, match="cannot answer questions"):
        Chat(TwoTower(), [Image.new("RGB", (8, 8))])
