"""The `tools` mix: the world's reading questions answered through the OCR tool, the rest
directly, with the tool offered in every sample, so a model learns when to call.

A reading question (the image's OCR question or one of its "read" VQA questions) becomes the
exchange visto's tool loop (tools/loop.py) produces at inference:

    <|system|>{tools_text([OCR_TOOL])}<|end|>
    <|user|><image>\\nWhat is written in the image?<|end|>
    <|assistant|><tool_call>{"name":"ocr","arguments":{"detail":"text"}}</tool_call><|end|>
    <|user|><tool_response>{"text":"9658"}</tool_response><|end|>
    <|assistant|>9658<|end|>

Any other question (VQA, grounding, box -> description; a caption where the image has no
text) is answered at once under the same system turn. The processor puts labels on the
assistant turns only, so the model learns the call and the answer, never the tool's result.

The tool's result is built from the world's ground truth in the exact format of the real tool
(`visto.tools.ocr.run_ocr(image, "text")`: the lines top to bottom, each line's words left to
right, lines joined by "\\n"), not by running PP-OCR: that would cost ~0.5 s a training image
and need rapidocr at training time, and on the world's test split the real tool already gives
the world's text (bench/ocr_world.py), so the two agree where it matters. Captions and JSON
answers are left out: they quote the image's text, which the model cannot read without the
tool.

Every question of an image in one sample, behind one system turn and one image
(`Sample.independent_turns`): the processor's shared-prefix packing keeps a tool exchange
(question, call, result, answer) together as one exchange and hides each exchange from the
others, so the ~365-token offer and the image are encoded once for many questions and each
answer learns from its own call and result only. The reading questions come first (the
processor leaves out exchanges that pass max_length, so they are the ones kept), the direct
ones after them in an order drawn per epoch. Images without text are kept at
`textless_share` so that steps go to answers after a result, the direct questions of images
with text keeping VQA in the mix. Packed so, ~2.9 answers follow a result per sample instead
of ~0.3; it kept VQA (0.667 against one question a sample's 0.620) but did not teach the
quickstart model to copy the result (bench/README.md, tool_use.py: tools-c, tools-d). The
quickstart's model with its text reader (runs/y0, 110 steps: t17b) calls right every time and
answers from its own reader, never from the result (a swapped result: 0.000 followed);
`visto.tools.quote` makes the answer quote the result at decoding time (bench/README.md, "The
quickstart model through the tool").

Trained on tool exchanges alone, that model forgot to answer reading questions without the
tool (OCR exact 0.289 with no tool offered, 0.908 before: t17b): `untooled_share` of the
images with text also come as a sample with no tool offered, their reading questions answered
directly, as the quickstart's instruct mix asks them.

The OCR tool's definition comes from `visto.data.tool_calls` (data/ sits below tools/ in the
layer order), which `visto.tools.ocr` builds its Tool from too: the model learns this exact text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visto.data.sample import Sample, Turn, exchanges, with_image
from visto.data.synth.tasks import with_json_boxes
from visto.data.tokenizer import boxes_to_loc
from visto.data.tool_calls import (
    OCR_DESCRIPTION,
    OCR_PARAMETERS,
    assistant_turn,
    compact_json,
    tool_result_turn,
    with_tools,
)

OCR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "ocr", "description": OCR_DESCRIPTION, "parameters": OCR_PARAMETERS},
}
OCR_ARGUMENTS = {"detail": "text"}  # the text alone: a short result the answer copies from
ROW_PX = 4  # texts whose tops are closer than this share a row (read left to right)


# The world's wordings of its OCR question (visto.data.synth.tasks): the training mix asks
# the image's OCR question in all of them, more answers after a result for one prefix.
OCR_QUESTIONS = ("Transcribe the text.", "What text appears in this image?",
                 "Read all the text in the image.")  # fmt: skip


def reading_questions(record: dict, all_wordings: bool = False) -> list[tuple[str, str]]:
    """The image's questions that need its text read: OCR and "read" VQA, with answers;
    `all_wordings`: the OCR question in each of OCR_QUESTIONS' wordings too."""
    t = record["tasks"]
    qas = [(qa["q"], qa["a"]) for qa in t["vqa"] if qa.get("type") == "read"]
    if t["ocr"] is not None:
        qas.append((t["ocr"]["q"], t["ocr"]["a"]))
        if all_wordings:
            qas += [(q, t["ocr"]["a"]) for q in OCR_QUESTIONS if q != t["ocr"]["q"]]
    return qas


def direct_questions(record: dict, loc_bins: int) -> list[tuple[str, str]]:
    """The image's questions answered from the pixels alone: VQA other than reading,
    grounding and box -> description (boxes as location tokens), and a caption where the
    image has no text (captions quote it)."""
    t = record["tasks"]
    qas = [(qa["q"], qa["a"]) for qa in t["vqa"] if qa.get("type") != "read"]
    qas += [(g["q"], boxes_to_loc(g["a"], loc_bins)) for g in t["ground"]]
    qas += [(boxes_to_loc(r["q"], loc_bins), r["a"]) for r in t["refdesc"]]
    if not record["truth"]["texts"]:
        qas += [("Describe this image.", c) for c in t["captions"][:1]]
    return qas


def ocr_result(texts: list[dict]) -> dict[str, str]:
    """What `run_ocr(image, "text")` returns for the world's `texts`: rows top to bottom
    (PP-OCR sorts its boxes so), each row left to right, one line per text."""
    ordered = sorted(texts, key=lambda t: (t["box"][1], t["box"][0]))
    rows: list[list[dict]] = []
    for text in ordered:
        if rows and abs(text["box"][1] - rows[-1][0]["box"][1]) < ROW_PX:
            rows[-1].append(text)
        else:
            rows.append([text])
    lines = [t["text"] for row in rows for t in sorted(row, key=lambda t: t["box"][0])]
    return {"text": "\n".join(lines)}


def tool_exchange(record: dict, question: str, answer: str) -> list[Turn]:
    """A reading question answered through one OCR call (no image: `ToolMix.turns` puts it
    in the sample's first user turn)."""
    return [
        Turn("user", question),
        assistant_turn(None, [("ocr", OCR_ARGUMENTS)]),
        tool_result_turn(compact_json(ocr_result(record["truth"]["texts"]))),
        Turn("assistant", answer),
    ]


@dataclass(frozen=True)
class ToolMix:
    """A mix with tools offered (visto.data.synth.mixes.MIXES holds it beside the `Mix`es and
    reads the same attributes: name, description, tasks, independent_turns, samples, card)."""

    name: str
    description: str
    tasks: tuple[str, ...]
    tools: tuple[dict[str, Any], ...]
    textless_share: float  # of the images without text, the share drawn into an epoch
    direct_per_image: int  # direct questions asked of an image (at most)
    independent_turns: bool = True  # every question of the image packed (module docstring)
    # of the images with text, the share that also comes without the tool: its reading
    # questions answered directly (as the quickstart's instruct mix asks them), so that a
    # model trained on the mix still answers them when no tool is offered (`untooled_turns`)
    untooled_share: float = 0.0

    def turns(self, record: dict, loc_bins: int, rng: random.Random) -> list[Turn]:
        """The image's exchanges after the system turn that offers the tools: each reading
        question through the tool, then the direct questions shuffled. The image is in the
        first user turn only (the packing gives it to every exchange)."""
        direct = self._direct(record, loc_bins, rng)
        reading = reading_questions(record, all_wordings=True)
        turns = [turn for q, a in reading for turn in tool_exchange(record, q, a)]
        return with_tools(with_image([*turns, *exchanges(direct)]), list(self.tools))

    def untooled_turns(self, record: dict, loc_bins: int, rng: random.Random) -> list[Turn]:
        """The image's reading questions (the OCR question in one wording) answered directly,
        then the direct questions shuffled, with no tool offered (no system turn): the
        conversation the model has when it is asked without tools."""
        direct = self._direct(record, loc_bins, rng)
        return with_image(exchanges([*reading_questions(record), *direct]))

    def _direct(self, record: dict, loc_bins: int, rng: random.Random) -> list[tuple[str, str]]:
        """The image's direct questions, shuffled by `rng`, at most `direct_per_image`."""
        direct = direct_questions(record, loc_bins)
        rng.shuffle(direct)
        return direct[: self.direct_per_image]

    def samples(self, world_dir: str | Path, split: str, *, seed: int, epoch: int,
                loc_bins: int, json_boxes: dict[str, list[list[int]]] | None = None) -> Iterator[Sample]:  # fmt: skip
        """One sample per image of `split` with text, and `textless_share` of the others;
        which of those, and the order of the direct questions, drawn from (seed, epoch, image).
        `untooled_share` of the images with text give a second sample after their first, with
        no tool offered (`untooled_turns`; its id the image's with "-direct" after it).
        `json_boxes` (by image id) rewrites the boxes of JSON answers, as `Mix.samples` does."""
        from visto.data.images import open_image
        from visto.data.synth.reader import iter_records

        world_dir = Path(world_dir)
        for record in iter_records(world_dir, split):
            rng = random.Random(f"visto-mix/{self.name}/{seed}/{epoch}/{record['id']}")
            if not reading_questions(record) and rng.random() >= self.textless_share:
                continue
            if json_boxes and record["id"] in json_boxes:
                record = with_json_boxes(record, json_boxes[record["id"]])
            image = open_image(world_dir / record["image"])
            yield Sample(id=record["id"], images=[image], turns=self.turns(record, loc_bins, rng),
                         source="synth", independent_turns=self.independent_turns)  # fmt: skip
            untooled = random.Random(f"visto-mix/{self.name}/{seed}/{epoch}/{record['id']}/untooled")
            if reading_questions(record) and untooled.random() < self.untooled_share:
                yield Sample(id=f"{record['id']}-direct", images=[image],
                             turns=self.untooled_turns(record, loc_bins, untooled), source="synth",
                             independent_turns=self.independent_turns)  # fmt: skip

    def card(self) -> dict[str, Any]:
        return {"name": self.name, "independent_turns": self.independent_turns,
                "tasks": list(self.tasks), "description": self.description,
                "tools": [t["function"]["name"] for t in self.tools],
                "textless_share": self.textless_share,
                "direct_per_image": self.direct_per_image,
                "untooled_share": self.untooled_share}  # fmt: skip


TOOLS_MIX = ToolMix(
    "tools",
    "reading questions (OCR, read) answered through an ocr tool call and its result, the "
    "other questions (VQA, grounding, box -> description) directly, the ocr tool offered in "
    "every sample; an image's reading questions (its OCR question in all three wordings) "
    "and 5 direct ones packed behind one offer and image, images without text at a quarter "
    "of their share; a third of the images with text also asked their reading questions and 5 "
    "direct ones without the tool offered (so the model still answers them without a tool)",
    ("ocr", "vqa", "ground", "refdesc"),
    tools=(OCR_TOOL,),
    textless_share=0.25,
    direct_per_image=5,
    untooled_share=1 / 3,
)

__all__ = ["OCR_ARGUMENTS", "OCR_QUESTIONS", "OCR_TOOL", "TOOLS_MIX", "ToolMix", "direct_questions", "ocr_result",
           "reading_questions", "tool_exchange"]  # fmt: skip
