"""Text in front of a question: system turns and instructions a client puts in the prompt.

Clients put text around a question that has nothing to do with the image: a system turn
("Answer briefly.", "You are a helpful assistant."), LangChain's PydanticOutputParser format
instructions (~600 tokens of JSON schema), a task description. A model trained on questions
asked alone reads that text as part of what it must answer (bench/README.md, "The quickstart
model with a long prompt": VQA 0.967 -> 0.000 with ~650 tokens in front). `with_prompts`
puts such text, built here in code from a seed (no downloads), in front of a share of a mix's
samples (the mix `instruct+caption+prefixes`, the quickstart's stage 2); the answers stay the same, so the model learns to answer the question whatever
stands before it.

    short     one of SHORT_SYSTEM
    schema    format instructions for a JSON schema drawn at random (LangChain's wording and
              layout, field names and types drawn from word lists)
    prose     sentences drawn from templates (how to answer, what the reader wants), as many
              as reach a drawn length in characters

The texts avoid the world's words (shapes, colours, sizes, sides, digits): an instruction that
names "red" is not a question about red things.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

SHORT_SYSTEM = (
    "Answer briefly.",
    "You are a helpful assistant.",
    "Be concise.",
    "Answer the question about the image.",
    "You are a helpful assistant that answers questions about images.",
    "Reply with as few words as possible.",
    "You are an expert annotator.",
    "Look at the picture and answer.",
    "Answer in English.",
    "You are a vision assistant. Keep answers short.",
)

# LangChain's PydanticOutputParser.get_format_instructions wording (langchain_core 0.3).
_SCHEMA_HEAD = (
    "The output should be formatted as a JSON instance that conforms to the JSON schema below.\n\n"
    "As an example, for the schema {\"properties\": {\"foo\": {\"title\": \"Foo\", \"description\": "
    "\"a list of strings\", \"type\": \"array\", \"items\": {\"type\": \"string\"}}}, \"required\": "
    "[\"foo\"]}\nthe object {\"foo\": [\"bar\", \"baz\"]} is a well-formatted instance of the "
    "schema. The object {\"properties\": {\"foo\": [\"bar\", \"baz\"]}} is not well-formatted.\n\n"
    "Here is the output schema:\n```\n"
)
_FIELDS = ("answer", "label", "title", "summary", "items", "note", "reason", "source", "score",
           "name", "kind", "value", "entries", "detail", "status", "comment", "tags", "result",
           "category", "language", "author", "topic", "confidence", "notes", "identifier")  # fmt: skip
_DESCRIPTIONS = ("the main answer", "a short label", "why this answer was given", "a list of tags",
                 "how sure the model is", "free text", "the kind of thing seen", "a short note",
                 "where the answer came from", "an identifier for the record")  # fmt: skip
_TYPES = ("string", "integer", "number", "boolean", "array")

_OPENERS = ("You are a careful assistant.", "Please read the whole message first.",
            "The user is building a data set.", "These instructions apply to every reply.",
            "Your replies are checked by a program.", "The person asking is busy.",
            "This conversation is part of an evaluation.", "Think before you write.")  # fmt: skip
_RULES = ("Keep the answer short", "Do not repeat the question", "Do not add a greeting",
          "Give the most likely answer when you are not sure", "Avoid long explanations",
          "Write plain text without markup", "Answer the last question only",
          "Do not mention these instructions", "Use simple words", "Stay on topic",
          "Never invent a source", "Be polite but brief")  # fmt: skip
_REASONS = ("because the answers are compared word for word", "since a program reads the reply",
            "as the reader has little time", "so that the replies stay consistent",
            "because longer answers are marked wrong", "for the sake of clarity")  # fmt: skip
_FILLERS = ("Each reply is stored and read again later.", "Mistakes are counted but not punished.",
            "The task may look simple; treat it with care anyway.",
            "If a question is unclear, answer what it most probably means.",
            "Nothing in this message is itself a question.",
            "The same rules hold for every turn of the conversation.",
            "Formatting does not matter unless it is asked for.")  # fmt: skip


def short_system(rng: random.Random) -> str:
    return rng.choice(SHORT_SYSTEM)


def random_schema(rng: random.Random) -> dict:
    """A JSON schema of 2-7 drawn fields (some nested in an array of objects)."""
    names = rng.sample(_FIELDS, rng.randint(2, 7))
    props: dict = {}
    for name in names:
        kind = rng.choice(_TYPES)
        prop: dict = {"title": name.title(), "description": rng.choice(_DESCRIPTIONS), "type": kind}
        if kind == "array":
            inner = rng.sample(_FIELDS, 2)
            prop["items"] = rng.choice([{"type": "string"}, {"type": "object", "properties": {
                f: {"title": f.title(), "type": rng.choice(_TYPES[:4])} for f in inner},
                "required": inner}])  # fmt: skip
        props[name] = prop
    return {"properties": props, "required": rng.sample(names, rng.randint(1, len(names))),
            "title": rng.choice(_FIELDS).title(), "type": "object"}  # fmt: skip


def schema_instructions(rng: random.Random) -> str:
    """Format instructions for a drawn schema, as LangChain's PydanticOutputParser writes them."""
    return _SCHEMA_HEAD + json.dumps(random_schema(rng)) + "\n```"


def prose(rng: random.Random, chars: int) -> str:
    """Sentences drawn from the templates until about `chars` characters, in paragraphs."""
    out: list[str] = []
    size = 0
    while size < chars:
        k = rng.randrange(3)
        if k == 0:
            s = rng.choice(_OPENERS)
        elif k == 1:
            s = f"{rng.choice(_RULES)}, {rng.choice(_REASONS)}."
        else:
            s = rng.choice(_FILLERS)
        out.append(s)
        size += len(s) + 1
    paragraphs, at = [], 0
    while at < len(out):
        n = rng.randint(2, 6)
        paragraphs.append(" ".join(out[at : at + n]))
        at += n
    return "\n\n".join(paragraphs)


def _clip(text: str, chars: int) -> str:
    """`text` cut after its last full sentence within `chars` characters."""
    return text if len(text) <= chars else text[: text.rfind(".", 0, chars) + 1]


_LOC = re.compile(r"<loc_\d+>")


def estimate_tokens(text: str, ratio: float) -> int:
    """Tokens of `text` in a world tokenizer, estimated: `ratio` per character, a location
    token one (the mix has no tokenizer; `PromptMix.fit` leaves room for the error)."""
    locs = len(_LOC.findall(text))
    return locs + math.ceil(ratio * len(_LOC.sub("", text)))


@dataclass(frozen=True)
class PromptMix:
    """Text in front of the questions of a mix's samples, in blocks of `block` consecutive
    samples (one training batch when the recipe does not shuffle: `shuffle_buffer` 1). A long
    block (`long_share` of them) gives every sample a long text (a JSON schema's format
    instructions or prose, `long_tokens` at most) and keeps the exchanges that fit in
    `long_length` tokens; any other block gives `short_share` of its samples a short text (one
    of SHORT_SYSTEM, or a few sentences) and keeps the exchanges that fit in `length` tokens, as
    the processor's truncation at `length` did without prefixes. Batches are padded to their
    longest sample and a step at 1,024 tokens costs ~4.8x one at 512 (bench/README.md, "Text in
    front of the question"), so long samples come together, in few batches. A text is a system
    turn (`system_share`) or lines in front of one question of the sample."""

    block: int = 16  # the quickstart's stage-2 batch
    long_share: float = 0.08
    short_share: float = 0.4
    system_share: float = 0.6
    length: int = 512
    long_length: int = 1024
    long_tokens: int = 900
    text_ratio: float = 0.27  # tokens per character of the world's questions and answers
    prefix_ratio: float = 0.66  # tokens per character of the prefix texts (its BPE knows none of it)
    per_exchange: int = 16  # role markers, <focus> slots, end token
    per_sample: int = 12  # bos, image tokens

    def long_text(self, rng: random.Random) -> str:
        chars = int(self.long_tokens / self.prefix_ratio)
        if rng.random() < 0.5:
            text = schema_instructions(rng)
            while len(text) > chars:  # a smaller schema
                text = schema_instructions(rng)
            extra = rng.randint(0, max(0, chars - len(text)))
            return _clip(text + "\n\n" + prose(rng, extra), chars) if extra > 100 else text
        return _clip(prose(rng, rng.randint(chars // 3, chars - 100)), chars)

    def short_text(self, rng: random.Random) -> str:
        return short_system(rng) if rng.random() < 0.6 else prose(rng, rng.randint(40, 300))

    def fit(self, prefix: str, qas: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
        """The exchanges that fit in `budget` tokens after `prefix`, in order, skipping one
        that does not fit as the processor does (estimated: `estimate_tokens`)."""
        used = self.per_sample + estimate_tokens(prefix, self.prefix_ratio)
        kept = []
        for q, a in qas:
            cost = self.per_exchange + estimate_tokens(q, self.text_ratio) + estimate_tokens(a, self.text_ratio)
            if used + cost <= budget:
                kept.append((q, a))
                used += cost
        return kept or qas[:1]


def with_prompts(qas: list[tuple[str, str]], rng: random.Random, mix: PromptMix, *, long: bool) -> tuple[str | None, list[tuple[str, str]]]:  # fmt: skip
    """(system turn or None, the exchanges that fit, with instruction lines in front of one
    of them where the text is not a system turn); every answer unchanged. `long`: the sample
    is in a long block (`PromptMix`)."""
    if long:
        text, budget = mix.long_text(rng), mix.long_length
    elif rng.random() < mix.short_share:
        text, budget = mix.short_text(rng), mix.length
    else:
        return None, mix.fit("", qas, mix.length)
    qas = mix.fit(text, qas, budget)
    if rng.random() < mix.system_share:
        return text, qas
    k = rng.randrange(len(qas))
    q, a = qas[k]
    return None, [*qas[:k], (text + "\n\n" + q, a), *qas[k + 1 :]]


__all__ = ["SHORT_SYSTEM", "PromptMix", "estimate_tokens", "prose", "random_schema", "schema_instructions", "with_prompts"]
