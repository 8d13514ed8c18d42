"""Running a generative model on tasks: batched greedy answers for evaluation, and a chat.

    generate = make_generate(model, loc_bins=None)      # list[Sample] -> list[str], for eval
    answers = generate([Sample("q", [image], ground.build_prompt("red circle"))])

    chat = Chat(model, [image])                          # a conversation about some images
    reply = chat.ask("red circle", task="ground")        # Reply(text, parsed, boxes, ...)
    reply.boxes[0].norm, reply.boxes[0].pixels           # 0..999 ints, and pixels of image 0

    reply = answer(model, [image], "How many circles?")  # one question, no conversation

Both are family-agnostic: they use only the engine protocol (`prefill`, `decode_step`) and the
model's processor (`encode`, `collator`, `tokenizer`), so every generative family runs here.

Boxes travel as the tokenizer writes them: plain "[x1, y1, x2, y2]" lists (0..999) in prompts
become four location tokens (Pix2Seq, Chen et al. 2022), and location tokens in answers
become plain lists again, so what a person (or a metric) reads is always the DESIGN.md form,
whatever number of location bins the model has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.data.tokenizer import LocText, boxes_to_loc, loc_to_boxes, loc_to_text
from visto.data.tool_calls import with_tools
from visto.errors import UserError
from visto.tasks import caption, classify, count, detect, extract, ground, ocr, vqa
from visto.tasks.common import Box
from visto.tasks.fewshot import Demo, few_shot

if TYPE_CHECKING:
    from PIL import Image

    from visto.infer import Completion, Engine, SamplingParams

GenerateFn = Callable[[list[Sample]], list[str]]
TASKS = ("caption", "vqa", "count", "ocr", "ground", "detect", "extract", "classify")
# Tasks whose prompt is fixed: a question given with them is not needed.
TASKS_WITHOUT_QUESTION = ("caption", "ocr", "detect", "extract", "classify")
# Tasks whose answer is the world's JSON, decoded under its grammar when xgrammar is there.
JSON_TASKS = ("detect", "extract")


# ----------------------------------------------------------------------------- the engine


class AnswerTokenizer:
    """The processor's tokenizer as the engine sees it: answers decoded without turn or image
    tokens (location tokens stay, so boxes survive)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.end_id, self.eos_id, self.pad_id = tokenizer.end_id, tokenizer.eos_id, tokenizer.pad_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special=True)


def processor_of(model: Any) -> Any:
    processor = getattr(model, "processor", None)
    if processor is None or not (hasattr(model, "prefill") and hasattr(model, "decode_step")):
        family = getattr(model, "family", type(model).__name__)
        raise UserError(
            f"a {family} model cannot answer questions: chat and generative evaluation need a "
            "generative checkpoint with its processor (e.g. llava from `visto train` or "
            "`visto quickstart`)"
        )
    return processor


def make_engine(model: Any) -> Engine:
    from visto.infer import Engine

    return Engine(model, AnswerTokenizer(processor_of(model).tokenizer))


def logits_width(model: Any) -> int:
    """The width of the model's logits: its output head's rows (the tokenizer may be smaller)."""
    heads = [m for name, m in model.named_modules() if name.endswith("lm_head")]
    if heads and hasattr(heads[0], "out_features"):
        return int(heads[0].out_features)
    return int(processor_of(model).tokenizer.vocab_size)


def context_length(model: Any) -> int:
    """The one context length of a generative model: the positions its decoder was built for
    (`max_position_embeddings` anywhere in its config; rotary positions, so nothing but this
    number stops a longer sequence). `visto serve` advertises it and enforces it, `visto chat`
    and `visto eval` enforce it (`_room`); the processor's own `max_length` is where training
    truncates, and prompts are not cut by it (`prompt_batch`)."""
    found = config_value(getattr(model, "config", None), "max_position_embeddings")
    return int(found) if found else 2048


# encode()'s max_length for a prompt: no cut; the context length is checked by the caller
NO_CUT = 2**31


def config_value(config: Any, name: str, depth: int = 2) -> Any:
    if config is None:
        return None
    if hasattr(config, name):
        return getattr(config, name)
    if depth == 0 or not hasattr(config, "__dict__"):
        return None
    for value in vars(config).values():
        if hasattr(value, "__dict__"):
            found = config_value(value, name, depth - 1)
            if found is not None:
                return found
    return None


def world_json_schema() -> dict[str, Any]:
    """The JSON Schema of the synthetic world's structured answers
    (`visto.data.synth.tasks.json_target`), keys in the order the world writes them, each as
    tight as the world is (a count is 1..9 of a known shape): the grammar then leaves a small
    model no room for answers the world never gives."""
    from visto.data.synth import COLOURS, SHAPES, SIZES

    obj = {
        "type": "object",
        "properties": {
            "shape": {"enum": list(SHAPES)},
            "colour": {"enum": list(COLOURS)},
            "size": {"enum": list(SIZES)},
            "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                    "minItems": 4, "maxItems": 4},
        },
        "required": ["shape", "colour", "size", "box"],
        "additionalProperties": False,
    }  # fmt: skip
    counts = {
        "type": "object",
        "properties": {s: {"type": "integer", "minimum": 1, "maximum": 9} for s in SHAPES},
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "objects": {"type": "array", "items": obj, "maxItems": 9},
            "counts": counts,
            "text": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        },
        "required": ["objects", "counts", "text"],
        "additionalProperties": False,
    }


def json_constraints(model: Any, schema: dict | None = None) -> Callable[[], Any] | None:
    """A maker of fresh grammar constraints (one per generated answer) for `schema` (default:
    the world's), as `visto serve` uses for response_format; None when xgrammar is not
    installed or the schema does not compile for this tokenizer (then decoding is plain)."""
    try:
        from visto.infer.constrain import Grammars

        tokenizer = processor_of(model).tokenizer
        grammars = Grammars(tokenizer, logits_width(model), [tokenizer.end_id])
        compiled = grammars.compile_json(schema or world_json_schema())
    except Exception:  # xgrammar missing (GrammarUnavailable) or the schema did not compile
        return None
    return lambda: grammars.constraint(compiled)


def prompt_batch(model: Any, samples: Sequence[Sample], device: Any) -> tuple[Any, list[int]]:
    """(left-padded batch on `device`, prompt tokens per sample) from the model's processor."""
    processor = processor_of(model)
    encoded = [processor.encode(s, max_length=NO_CUT, train=False) for s in samples]
    batch = processor.collator("left")(encoded).to(device)
    return batch, [int(e.input_ids.shape[0]) for e in encoded]


def _room(model: Any, prompt_tokens: int, wanted: int) -> int:
    """`wanted` new tokens, or fewer where the prompt leaves less of the context."""
    room = context_length(model) - prompt_tokens
    if room < 1:
        raise UserError(
            f"the prompt is {prompt_tokens} tokens (images included) but the model's context is "
            f"{context_length(model)}; shorten the conversation or use fewer images"
        )
    return min(wanted, room)


# ----------------------------------------------------------------------------- evaluation


def make_generate(
    model: Any,
    loc_bins: int | None = None,
    constrain_json: bool = True,
    *,
    max_new_tokens: int = 24,
    json_max_new_tokens: int = 400,
) -> GenerateFn:
    """The `generate` of `visto.eval.generative` for any generative model: greedy; boxes in
    prompts as location tokens (as the processor writes them in training) and in answers as
    plain 0..999 lists; a long budget only for JSON answers, which are grammar-constrained to
    the world's schema when `constrain_json` and xgrammar is installed (so always valid JSON).

    `loc_bins` defaults to the tokenizer's number of location tokens.
    """
    constraint = json_constraints(model) if constrain_json else None
    return _greedy_generate(model, loc_bins, constraint, max_new_tokens, json_max_new_tokens)


def make_constrained_generate(
    model: Any,
    loc_bins: int | None = None,
    *,
    max_new_tokens: int = 24,
    json_max_new_tokens: int = 400,
) -> GenerateFn | None:
    """`make_generate` with JSON answers under the world's grammar, or None where there is no
    grammar (xgrammar not installed): the evaluation's json.constrained.* figures."""
    constraint = json_constraints(model)
    if constraint is None:
        return None
    return _greedy_generate(model, loc_bins, constraint, max_new_tokens, json_max_new_tokens)


def _greedy_generate(
    model: Any,
    loc_bins: int | None,
    constraint: Callable[[], Any] | None,
    max_new_tokens: int,
    json_max_new_tokens: int,
) -> GenerateFn:
    import torch

    from visto.infer import SamplingParams

    engine = make_engine(model)
    bins = loc_bins if loc_bins is not None else processor_of(model).tokenizer.loc_bins

    def params_for(sample: Sample, prompt_tokens: int) -> SamplingParams:
        if "JSON" in sample.turns[-1].content:
            return SamplingParams(
                max_new_tokens=_room(model, prompt_tokens, json_max_new_tokens),
                logits_processor=constraint() if constraint else None,
            )
        return SamplingParams(max_new_tokens=_room(model, prompt_tokens, max_new_tokens))

    def generate(samples: list[Sample]) -> list[str]:
        prompts = [
            dataclasses.replace(
                s, turns=[Turn(t.role, boxes_to_loc(t.content, bins)) for t in s.turns]
            )
            for s in samples
        ]
        batch, lengths = prompt_batch(model, prompts, engine.device)
        params = [params_for(s, n) for s, n in zip(prompts, lengths, strict=True)]
        with torch.inference_mode():
            completions = engine.generate_batch(batch, params)
        return [loc_to_boxes(c.text, bins).strip() for c in completions]

    return generate


# ----------------------------------------------------------------------------- chat


def task_question(task: str | None, question: str) -> str:
    """The text of the user turn: the task's own prompt (`visto.tasks`), or the question.

    Count and ground take what to count / the object to find ("circles", "red circle"); a
    full question ending in "?" is asked as it is. Caption, OCR, detect, extract and classify
    have fixed prompts; extract reads a question that is a JSON object as its schema.
    """
    question = question.strip()
    if task is None:
        turns = vqa.build_prompt(question)
    elif task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    elif task in ("count", "ground") and question.endswith("?"):
        turns = vqa.build_prompt(question)
    elif task == "count":
        turns = count.build_prompt(question)
    elif task == "ground":
        turns = ground.build_prompt(question)
    elif task == "vqa":
        turns = vqa.build_prompt(question)
    elif task == "caption":
        turns = caption.build_prompt()
    elif task == "ocr":
        turns = ocr.build_prompt()
    elif task == "detect":
        turns = detect.build_prompt()
    elif task == "classify":
        turns = classify.build_prompt()
    else:  # extract
        turns = extract.build_prompt(_schema_or_none(question))
    [turn] = turns
    return turn.content.replace(f"{IMAGE_PLACEHOLDER}\n", "")


def _schema_or_none(question: str) -> dict | None:
    import json

    if not question.startswith("{"):
        return None
    try:
        schema = json.loads(question)
    except json.JSONDecodeError as e:
        raise UserError(f"the extract schema is not valid JSON ({e})") from None
    return schema


@dataclass
class Reply:
    """One answer: the text as a person reads it (boxes as 0..999 lists), the task parser's
    value, the boxes found (0..999 and pixels of the first image), and how it ended."""

    text: str
    task: str | None
    parsed: Any
    boxes: list[Box]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    raw: str  # the decoded answer, location tokens as the model wrote them

    def parsed_json(self) -> Any:
        """`parsed` as JSON-able values (boxes as dicts, extraction as {valid, value})."""
        value = self.parsed
        if isinstance(value, list) and all(isinstance(b, Box) for b in value):
            return [b.to_json() for b in value]
        if isinstance(value, extract.Extraction):
            return {"valid": value.valid, "value": value.value}
        return value

    def to_json(self) -> dict[str, Any]:
        return {
            "answer": self.text,
            "task": self.task,
            "parsed": self.parsed_json(),
            "boxes": [b.to_json() for b in self.boxes],
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def parse_reply(
    text: str, task: str | None, image_size: tuple[int, int] | None, loc_bins: int
) -> tuple[Any, list[Box]]:
    """(the task parser's value, every box in the answer) for an answer with plain boxes."""
    parsers: dict[str, Callable[..., Any]] = {
        "caption": caption.parse, "vqa": vqa.parse, "count": count.parse, "ocr": ocr.parse,
        "extract": extract.parse,
    }  # fmt: skip
    if task == "detect":
        boxes = detect.parse(text, image_size, loc_bins)
        return boxes, boxes
    boxes = ground.parse(text, image_size, loc_bins)
    if task == "ground":
        return boxes, boxes
    if task == "classify":
        return classify.parse(text), boxes
    if task in parsers:
        return parsers[task](text, image_size), boxes
    return text.strip(), boxes


class ReplyStream:
    """The pieces of one answer as they are generated, location tokens already as 0..999 boxes
    (`visto.data.tokenizer.LocText`: a run is held back until its fourth token, a stray one
    left out); `.reply` once exhausted."""

    def __init__(self, generation: Any, finish: Callable[[Completion], Reply], loc_bins: int):
        self._generation, self._finish, self._loc_bins = generation, finish, loc_bins
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        import torch

        text, shown = LocText(self._loc_bins), ""  # the answer as users read it; yielded
        with torch.inference_mode():
            for _, piece in self._generation:
                text.feed(piece)
                plain = text.shown.lstrip()
                if len(plain) > len(shown):
                    yield plain[len(shown) :]
                    shown = plain
        [completion] = self._generation.completions
        self.reply = self._finish(completion)
        if self.reply.text.startswith(shown) and len(self.reply.text) > len(shown):
            yield self.reply.text[len(shown) :]


class Chat:
    """A conversation with a generative model about `images` (all given with the first
    question), optionally after few-shot demonstrations (image, question, answer)."""

    def __init__(
        self,
        model: Any,
        images: Sequence[Image.Image] = (),
        *,
        demos: Sequence[Demo] = (),
        constrain_json: bool = True,
        engine: Engine | None = None,
        tools: Sequence[dict[str, Any]] = (),
    ) -> None:
        if demos and len(images) != 1:
            raise UserError(
                f"few-shot prompts ask about one image after the demonstrations; got {len(images)}"
            )
        self.model = model
        self.images = list(images)
        self.demos = list(demos)
        self.engine = engine if engine is not None else make_engine(model)
        self.loc_bins = int(processor_of(model).tokenizer.loc_bins)
        # OpenAI-style tool definitions, offered in a system turn (data/tool_calls.py)
        self.tools = list(tools)
        self.turns: list[Turn] = []  # the conversation so far (demonstrations included)
        self.reset()
        self.constrain_json = constrain_json
        self._constraint: Callable[[], Any] | None | bool = False  # False: not built yet

    def reset(self) -> None:
        self.turns = with_tools([], self.tools)

    def _sample(self, text: str) -> Sample:
        """The conversation with one more user turn (the images go with the first one)."""
        text = boxes_to_loc(text, self.loc_bins)
        opening = with_tools([], self.tools)  # the tools' system turn, if any
        if len(self.turns) > len(opening):
            return self._continued([Turn("user", text)])
        if self.demos:
            demos = [(im, boxes_to_loc(q, self.loc_bins), boxes_to_loc(a, self.loc_bins))
                     for im, q, a in self.demos]  # fmt: skip
            sample = few_shot(demos, (self.images[0], text), id="chat")
            return dataclasses.replace(sample, turns=with_tools(sample.turns, self.tools))
        prefix = f"{IMAGE_PLACEHOLDER}\n" * len(self.images)
        return Sample("chat", list(self.images), [*opening, Turn("user", prefix + text)])

    def _continued(self, turns: list[Turn]) -> Sample:
        images = [im for im, _, _ in self.demos] + self.images
        return Sample("chat", images, [*self.turns, *turns])

    def _json_constraint(self) -> Any:
        if self._constraint is False:
            self._constraint = json_constraints(self.model) if self.constrain_json else None
        return self._constraint() if self._constraint else None

    def ask(
        self,
        question: str,
        task: str | None = None,
        params: SamplingParams | None = None,
        stream: bool = False,
    ) -> Reply | ReplyStream:
        """The model's answer to `question` (or to `task`'s prompt), added to the conversation.

        With `stream=True`, a ReplyStream whose iteration yields the text as it comes.
        """
        return self._reply(self._sample(task_question(task, question)), task, params, stream)

    def answer_after(
        self, turns: list[Turn], params: SamplingParams | None = None, stream: bool = False
    ) -> Reply | ReplyStream:
        """The model's next answer after `turns` (tool results) join the conversation."""
        return self._reply(self._continued(turns), None, params, stream)

    def _reply(
        self, sample: Sample, task: str | None, params: SamplingParams | None, stream: bool
    ) -> Reply | ReplyStream:
        import torch

        from visto.infer import SamplingParams

        batch, [prompt_tokens] = prompt_batch(self.model, [sample], self.engine.device)
        params = params or SamplingParams(max_new_tokens=128)
        wanted = _room(self.model, prompt_tokens, params.max_new_tokens)
        constraint = self._json_constraint() if task in JSON_TASKS else None
        params = dataclasses.replace(
            params, max_new_tokens=wanted, logits_processor=constraint or params.logits_processor
        )
        size = self.images[0].size if self.images else None

        def finish(completion: Completion) -> Reply:
            raw = completion.text.strip()
            answer = loc_to_text(raw, self.loc_bins)
            parsed, boxes = parse_reply(answer, task, size, self.loc_bins)
            self.turns = [*sample.turns, Turn("assistant", raw)]
            return Reply(
                text=answer, task=task, parsed=parsed, boxes=boxes,
                finish_reason=completion.finish_reason, prompt_tokens=prompt_tokens,
                completion_tokens=len(completion.token_ids), raw=raw,
            )  # fmt: skip

        if not stream:
            with torch.inference_mode():
                [completion] = self.engine.generate_batch(batch, params)
            return finish(completion)

        return ReplyStream(self.engine.start(batch, params, stream=True), finish, self.loc_bins)


def answer(
    model: Any,
    images: Sequence[Image.Image],
    question: str,
    history: Sequence[Turn] | None = None,
    task: str | None = None,
    params: SamplingParams | None = None,
    stream: bool = False,
    demos: Sequence[Demo] = (),
) -> Reply | ReplyStream:
    """One answer about `images`: `history` is the conversation so far (turns, the images
    placed by its first user turn's `<image>` placeholders, or none), `task` one of TASKS."""
    chat = Chat(model, images, demos=demos)
    if history:
        turns = list(history)
        if not any(IMAGE_PLACEHOLDER in t.content for t in turns) and images:
            first = next((i for i, t in enumerate(turns) if t.role == "user"), None)
            if first is not None:
                prefix = f"{IMAGE_PLACEHOLDER}\n" * len(images)
                turns[first] = Turn("user", prefix + turns[first].content)
        chat.turns = [Turn(t.role, boxes_to_loc(t.content, chat.loc_bins)) for t in turns]
    return chat.ask(question, task=task, params=params, stream=stream)


# ----------------------------------------------------------------------------- eval glue


__all__ = [
    "TASKS", "AnswerTokenizer", "Chat", "GenerateFn", "Reply", "ReplyStream", "answer",
    "boxes_to_loc", "json_constraints", "loc_to_boxes",
    "make_constrained_generate", "make_engine", "make_generate", "parse_reply", "task_question", "world_json_schema",
]  # fmt: skip
