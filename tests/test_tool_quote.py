"""Quoting a tool's text (visto.tools.quote): the answer after a result with text is made of its
words, whatever the model's logits; and through the tool loop (`ToolLoop(quote=True)`), a tiny
random LLaVA that calls a tool answers with the result's words and stops calling."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
from collections import Counter

import pytest
import torch

from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.tools import ToolRegistry, ToolResult
from visto.tools.quote import QuoteConstraint, quoted_words


@pytest.fixture(scope="module")
def tokenizer():
    # " DOG" becomes one token: a quote is text, whatever tokens spell it
    texts = ["EXIT 9658 CAT 96 22", "LAMP DOG", "BIG DOG", "HOT DOG", "SALE 50% OFF"] * 30
    return train_tokenizer(texts, vocab_size=300, loc_bins=8, min_frequency=1)


def decode_under(quote: QuoteConstraint, logits_of, limit: int = 60) -> list[int]:
    """Greedy decoding of `logits_of(step)` under the constraint, up to the stop token."""
    out: list[int] = []
    for step in range(limit):
        token = int(quote(out, logits_of(step)).argmax())
        if token in quote.stop_ids:
            return out
        out.append(token)
    raise AssertionError(f"no stop within {limit} tokens: {out}")


def test_any_logits_decode_to_words_of_the_result_each_at_most_as_often(tokenizer) -> None:
    words = ["EXIT", "9658", "96", "CAT", "CAT"]  # "96" is a token prefix of "9658"
    quote = QuoteConstraint(tokenizer, words, [tokenizer.end_id])
    rng = random.Random(0)
    seen = set()
    for trial in range(200):
        g = torch.Generator().manual_seed(trial)
        noise = torch.randn(60, 300, generator=g) * rng.choice([0.1, 1.0, 10.0])
        text = tokenizer.decode(decode_under(quote, lambda k, n=noise: n[k]))
        said = re.split("[ \n]", text)
        assert said and all(said), text  # words separated by one space or line break each
        assert not Counter(said) - Counter(words), text
        seen.add(text)
    assert len(seen) > 20  # the logits choose which words and their order


def test_the_mask_follows_the_text_whatever_tokens_spell_it(tokenizer) -> None:
    end = tokenizer.end_id
    quote = QuoteConstraint(tokenizer, ["9658", "96"], [end])
    nine_six, [space], [newline] = (
        tokenizer.encode("9658"),
        tokenizer.encode(" "),
        tokenizer.encode("\n"),
    )
    assert nine_six[:1] == tokenizer.encode("96") and len(nine_six) == 2  # what the test needs
    spell = {tokenizer.decode([i]) for i in quote.allowed([])}
    assert spell == {"9", "96"}  # the pieces that begin a word; no stop before one
    # "96" is a whole word: the stop, a space or a line break; or it goes on into "9658"
    after = quote.allowed(nine_six[:1])
    assert {end, space, newline, nine_six[1]} <= set(after)
    # (" 96" and " 9658" too: "96 96" may go on into "96 9658")
    assert {tokenizer.decode([i]) for i in after if i != end} == {
        " ",
        "\n",
        "5",
        "58",
        " 96",
        " 9658",
    }
    assert quote.allowed([*nine_six, newline]) == sorted(tokenizer.encode("9") + nine_six[:1])
    assert quote.allowed([*nine_six, space, *nine_six[:1]]) == [end]  # every word used: the stop
    assert quote.allowed([*nine_six, space, *nine_six]) == []  # "9658" twice: not a quote
    assert quote.allowed([*nine_six, space, space]) == []  # two separators: not a quote

    lamp_dog = QuoteConstraint(tokenizer, ["LAMP", "DOG"], [end])
    [dog] = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == " DOG"]
    assert dog in lamp_dog.allowed(tokenizer.encode("LAMP"))  # the merged " DOG" may follow
    assert lamp_dog.allowed([*tokenizer.encode("LAMP"), dog]) == [end]
    logits = torch.zeros(300)
    assert torch.isinf(quote(tokenizer.encode("CAT"), logits)).sum() == 299  # only the stop left


def test_quoted_words_take_text_results_only() -> None:
    results = [
        ToolResult("ocr", {}, {"text": "SALE 50%\nOFF", "words": []}, ok=True),
        ToolResult("ocr", {}, {"error": "the image cannot be read"}, ok=False),
        ToolResult("detect", {}, {"boxes": [[1, 2, 3, 4]]}, ok=True),
        ToolResult("user", {}, ["text"], ok=True),
    ]
    assert quoted_words(results) == ["SALE", "50%", "OFF"]
    assert quoted_words(results[1:]) == []


def test_a_quote_needs_words_and_a_stop(tokenizer) -> None:
    with pytest.raises(UserError, match="at least one word"):
        QuoteConstraint(tokenizer, [], [tokenizer.end_id])
    with pytest.raises(UserError, match="stop token"):
        QuoteConstraint(tokenizer, ["CAT"], [])


LABEL = "SALE 50% OFF"


def read_label(image, detail: str = "words") -> dict:
    """A user's reading tool (module level: the registry may send it to a process)."""
    return {"text": LABEL}


def label_tool():
    from visto.data.tool_calls import OCR_DESCRIPTION, OCR_PARAMETERS
    from visto.tools import Tool

    return Tool("ocr", OCR_DESCRIPTION, read_label, OCR_PARAMETERS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_serve_support import make_llava_checkpoint

    path = tmp_path_factory.mktemp("quote") / "tiny-llava" / "checkpoint"
    return make_llava_checkpoint(path, context=2048)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("quote", [False, True])
def test_the_loop_quotes_the_tools_text_and_then_stops_calling(checkpoint, quote) -> None:
    from PIL import Image

    from visto.checkpoint import load
    from visto.commands._chat_tools import ToolLoop
    from visto.data.tool_calls import OCR_DESCRIPTION, OCR_PARAMETERS
    from visto.infer import SamplingParams
    from visto.tasks.runner import Chat
    from visto.tools import Tool

    model = load(checkpoint).eval()
    tools = ToolRegistry([Tool("ocr", OCR_DESCRIPTION, read_label, OCR_PARAMETERS)])
    loop = dataclasses.replace(ToolLoop.build(model, tools, "ocr"), quote=quote)  # forced call
    image = Image.new("RGB", (64, 64), (200, 180, 40))
    args = argparse.Namespace(task=None, stream=False, json=True)
    answers, rounds = [], []
    for question in ("What does the label say?", "Read it.", "What is written?"):
        chat = Chat(model, [image], tools=loop.tools.openai())
        with torch.inference_mode():
            reply, runs = loop.answer(chat, question, args, SamplingParams(max_new_tokens=120),
                                      [image])  # fmt: skip
        assert runs and runs[0]["name"] == "ocr" and runs[0]["result"] == {"text": LABEL}
        answers.append(reply.text)
        rounds.append(len(runs))
    quoted = [
        bool(a.split()) and not Counter(a.split(" ")) - Counter(LABEL.split()) for a in answers
    ]
    if quote:
        assert all(quoted), answers  # the result's words, nothing else
        assert rounds == [1, 1, 1]  # the quoted answer is the last: no call after it
        assert json.loads(runs[0]["arguments"]) in ({}, {"detail": "text"}, {"detail": "words"})
    else:  # the random model writes what it likes after the result (or calls again)
        assert not all(quoted), answers


@pytest.mark.timeout(300)
def test_visto_chat_quotes_the_tools_text_for_the_ocr_task(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    """`visto chat --task ocr --tools ...` quotes by default (--quote-results auto): the answer
    is the tool's words; `--quote-results never` leaves the random model's own answer."""
    from PIL import Image

    import test_tool_quote
    from visto.cli import main

    monkeypatch.setattr(test_tool_quote, "LABEL_TOOL", label_tool(), raising=False)
    image = tmp_path / "label.png"
    Image.new("RGB", (64, 64), (200, 180, 40)).save(image)
    answers = {}
    for how in ("auto", "never"):
        argv = ["chat", "--model", str(checkpoint), str(image), "--task", "ocr", "--tools",
                "test_tool_quote:LABEL_TOOL", "--tool-choice", "ocr", "--json", "--max-tokens", "120",
                "--quote-results", how]  # fmt: skip
        assert main(argv) == 0
        reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert reply["tool_runs"] and reply["tool_runs"][0]["result"] == {"text": LABEL}
        answers[how] = reply["answer"] if "answer" in reply else reply["text"]
    words = answers["auto"].split()
    assert words and not Counter(words) - Counter(LABEL.split()), answers
    assert answers["never"] != answers["auto"], answers
