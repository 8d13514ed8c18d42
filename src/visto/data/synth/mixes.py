"""Training mixes: the samples a generative model learns from, built from a synthetic world.

A mix turns each image record of a split into one training `Sample`: the exchanges (question,
answer) it asks about that image. A recipe picks one by name (`data.mix`), so `visto train`,
the quickstart and `visto compare` build the same batches from the same world:

    captions          one caption per image, its phrasing drawn per epoch (LLaVA stage 1)
    look              one caption and two short VQA questions per image: short, cheap samples
                      in which only the image lowers the loss (the quickstart's stage 1)
    bind              `look` with three questions drawn type first (colour and shape as often as
                      existence and counting), naming an object other than the largest
    look+copy         `look` plus one grounding question and, where the image has text, the
                      OCR question: the answers a model with a question focus copies from its
                      `<focus>` slots (the named object's box, the text its reader read)
    instruct          every question of the image: VQA, grounding, box -> description, OCR,
                      JSON (LLaVA stage 2)
    instruct+caption  `instruct` plus one caption (every family in `visto compare`)
    instruct+caption+prefixes
                      `instruct+caption` with text in front of the questions in a share of the
                      samples (data.synth.prefixes: a system turn, or instruction lines in front
                      of one question; short ones, JSON-schema format instructions, prose; long
                      ones, up to ~900 tokens, in blocks of 16 samples), the answers unchanged
                      (the quickstart's stage 2)

A mix that asks several questions of one image packs them with `independent_turns`
(shared-prefix packing): one image prefix, and each exchange hidden from the others. A plain
multi-turn conversation would let later answers be copied from earlier ones (the JSON answer
names every object's colour and shape), while at evaluation every question is asked alone.

Boxes outside JSON answers become location tokens (`loc_bins` of the model's tokenizer); JSON
answers keep their plain int lists. With `json_boxes` (a file of boxes per image, `data.json_boxes`)
a JSON answer writes each object's box as that file has it where one matches the object (IoU >=
0.5): the boxes a model's own frozen detector finds, so that a model which copies the JSON its
detector writes (`projector.copy_json`) is taught to copy them rather than to write boxes of its
own (bench/README.md, "Detector boxes in the JSON labels").
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visto.data.sample import Sample, Turn, exchanges, with_image
from visto.data.synth.prefixes import PromptMix, with_prompts
from visto.data.synth.tasks import with_json_boxes
from visto.data.synth.tool_mix import TOOLS_MIX
from visto.data.tokenizer import boxes_to_loc
from visto.errors import UserError

CAPTION_PROMPTS = ("Describe this image.", "Write a caption for this image.", "What do you see in this picture?")
INSTRUCT_TASKS = ("vqa", "ground", "refdesc", "ocr", "json")

QA = tuple[str, str]


def record_qas(record: dict, loc_bins: int) -> list[QA]:
    """Every question of one image (VQA, grounding, box -> description, OCR, JSON) with its
    answer; boxes outside JSON as location tokens (JSON keeps its plain int lists)."""
    t = record["tasks"]
    qas = [(qa["q"], qa["a"]) for qa in t["vqa"]]
    qas += [(g["q"], boxes_to_loc(g["a"], loc_bins)) for g in t["ground"]]
    qas += [(boxes_to_loc(r["q"], loc_bins), r["a"]) for r in t["refdesc"]]
    if t["ocr"] is not None:
        qas.append((t["ocr"]["q"], t["ocr"]["a"]))
    qas.append((t["json"]["q"], t["json"]["a"]))
    return qas


def read_json_boxes(path: str | Path) -> dict[str, list[list[int]]]:
    """A JSON-lines file of {"id": image id, "boxes": [[x1, y1, x2, y2] in 0..999, ...]} -> by id."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return {str(r["id"]): [[int(v) for v in box] for box in r["boxes"]] for r in rows}
    except FileNotFoundError:
        raise UserError(f"data.json_boxes: {path} does not exist (the quickstart writes "
                        "RUN/stage2-boxes/train.jsonl before stage 2)") from None  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"data.json_boxes: {path} is not a JSON-lines file of "
                        f'{{"id": ..., "boxes": [[x1, y1, x2, y2], ...]}} rows ({e})') from None  # fmt: skip


def caption_qa(record: dict, rng: random.Random) -> QA:
    """One of the image's captions, asked with a prompt that goes with its index."""
    captions = record["tasks"]["captions"]
    k = rng.randrange(len(captions))
    return CAPTION_PROMPTS[k % len(CAPTION_PROMPTS)], captions[k]


def conversation(image: Any, qas: list[QA], sample_id: str, *, independent_turns: bool,
                 system: str | None = None) -> Sample:  # fmt: skip
    """The exchanges about one image as a Sample: the image leads the first question, after
    the system turn `system` if one is given."""
    turns = with_image(exchanges(qas))
    if system is not None:
        turns = [Turn("system", system), *turns]
    return Sample(id=sample_id, images=[image], turns=turns, source="synth",
                  independent_turns=independent_turns)  # fmt: skip


def _captions(record: dict, loc_bins: int, rng: random.Random) -> list[QA]:
    return [caption_qa(record, rng)]


def _instruct(record: dict, loc_bins: int, rng: random.Random) -> list[QA]:
    # The order only decides which exchanges are left out when a sample passes max_length.
    qas = record_qas(record, loc_bins)
    rng.shuffle(qas)
    return qas


def _instruct_caption(record: dict, loc_bins: int, rng: random.Random) -> list[QA]:
    qas = record_qas(record, loc_bins) + [caption_qa(record, rng)]
    rng.shuffle(qas)
    return qas


# Questions that only the image answers and that name an object by its attributes: the
# binding a from-scratch decoder has to learn first (bench/binding_probe.py).
LOOK_TYPES = ("colour", "shape", "attribute", "exist", "count", "relation")


def _look(record: dict, loc_bins: int, rng: random.Random) -> list[QA]:
    """One caption and two short VQA questions: ~60 tokens instead of ~500, so a step is ~8x
    cheaper and the binding plateau (counted in steps) is crossed early in the run."""
    vqa = [(qa["q"], qa["a"]) for qa in record["tasks"]["vqa"] if qa.get("type") in LOOK_TYPES]
    picked = rng.sample(vqa, min(2, len(vqa)))
    qas = [caption_qa(record, rng), *picked]
    rng.shuffle(qas)
    return qas


def _look_copy(record: dict, loc_bins: int, rng: random.Random) -> list[QA]:
    """`look`, plus a grounding question and the OCR question (where there is text)."""
    qas = _look(record, loc_bins, rng)
    t = record["tasks"]
    if t["ground"]:
        g = rng.choice(t["ground"])
        qas.append((g["q"], boxes_to_loc(g["a"], loc_bins)))
    if t["ocr"] is not None:
        qas.append((t["ocr"]["q"], t["ocr"]["a"]))
    rng.shuffle(qas)
    return qas


def _named_not_largest(record: dict, qa: dict) -> bool:
    """Whether the question names an object other than the image's largest: the answer the
    plateau's "biggest object" prior cannot give (bench/README.md, "Binding probe")."""
    objects = record["truth"]["objects"]
    if "object" not in qa or len(objects) < 2:
        return False
    largest = max(range(len(objects)), key=lambda i: objects[i]["area"])
    return qa["object"] != largest


def _bind(record: dict, loc_bins: int, rng: random.Random) -> list[QA]:
    """`look` with three questions drawn type first: three different types uniformly over the
    image's LOOK_TYPES (the world asks ~4 existence and ~4 counting questions per image but
    ~1.7 colour ones, so `look` rarely asks what binding needs), and within a type a question
    naming an object other than the largest when there is one (MDETR-style hard sampling)."""
    by_type: dict[str, list[dict]] = {}
    for qa in record["tasks"]["vqa"]:
        if qa.get("type") in LOOK_TYPES:
            by_type.setdefault(qa["type"], []).append(qa)
    picked = []
    for kind in rng.sample(sorted(by_type), min(3, len(by_type))):
        hard = [qa for qa in by_type[kind] if _named_not_largest(record, qa)]
        qa = rng.choice(hard or by_type[kind])
        picked.append((qa["q"], qa["a"]))
    qas = [caption_qa(record, rng), *picked]
    rng.shuffle(qas)
    return qas


@dataclass(frozen=True)
class Mix:
    """A named way to turn an image record into one training sample."""

    name: str
    description: str
    tasks: tuple[str, ...]  # the world's task kinds its exchanges come from
    # Several exchanges per image, each hidden from the others (shared-prefix packing).
    independent_turns: bool
    exchanges: Callable[[dict, int, random.Random], list[QA]]  # (record, loc_bins, rng) -> qas
    # text in front of the questions in a share of the samples (data.synth.prefixes); None: none
    prefixes: PromptMix | None = None

    def samples(self, world_dir: str | Path, split: str, *, seed: int, epoch: int,
                loc_bins: int, json_boxes: dict[str, list[list[int]]] | None = None) -> Iterator[Sample]:  # fmt: skip
        """One sample per image of `split`; what varies per epoch is drawn from (seed, epoch).
        `json_boxes` (by image id) rewrites the boxes of JSON answers (`with_json_boxes`)."""
        from visto.data.images import open_image
        from visto.data.synth.reader import iter_records

        world_dir = Path(world_dir)
        for k, record in enumerate(iter_records(world_dir, split)):
            rng = random.Random(f"visto-mix/{self.name}/{seed}/{epoch}/{record['id']}")
            if json_boxes and record["id"] in json_boxes:
                record = with_json_boxes(record, json_boxes[record["id"]])
            qas = self.exchanges(record, loc_bins, rng)
            system = None
            if self.prefixes is not None:  # drawn after the exchanges: those stay as they were
                block = k // self.prefixes.block
                long = random.Random(f"visto-mix/{self.name}/{seed}/{epoch}/block{block}").random()
                system, qas = with_prompts(qas, rng, self.prefixes, long=long < self.prefixes.long_share)
            yield conversation(open_image(world_dir / record["image"]), qas, record["id"],
                               independent_turns=self.independent_turns, system=system)  # fmt: skip

    def card(self) -> dict[str, Any]:
        """What a checkpoint card records about the data it was trained on."""
        card = {"name": self.name, "independent_turns": self.independent_turns,
                "tasks": list(self.tasks), "description": self.description}  # fmt: skip
        if self.prefixes is not None:
            card["prefixes"] = dataclasses.asdict(self.prefixes)
        return card


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        # One exchange per sample: nothing to hide, so a plain causal sequence.
        Mix("captions", "one caption per image, its phrasing drawn per epoch", ("caption",),
            independent_turns=False, exchanges=_captions),
        Mix("look", "one caption and two short VQA questions (colour, shape, size, existence, "
            "counting, relations) per image, as independent turns: cheap steps that teach the "
            "decoder to find the object a question names", ("caption", "vqa"),
            independent_turns=True, exchanges=_look),
        Mix("bind", "look with three questions of three types drawn uniformly (colour and "
            "shape as often as existence and counting), naming an object other than the "
            "largest where the image has one", ("caption", "vqa"), independent_turns=True,
            exchanges=_bind),
        Mix("look+copy", "look plus one grounding question and the OCR question where there "
            "is text: answers copied from a question focus's <focus> slots (box, read text)",
            ("caption", "vqa", "ground", "ocr"), independent_turns=True, exchanges=_look_copy),
        Mix("instruct", "every question of an image (VQA, grounding with box tokens, box -> "
            "description, OCR, JSON) as independent turns, in an order drawn per epoch",
            INSTRUCT_TASKS, independent_turns=True, exchanges=_instruct),
        Mix("instruct+caption", "the instruct mix plus one caption, as independent turns",
            (*INSTRUCT_TASKS, "caption"), independent_turns=True, exchanges=_instruct_caption),
        Mix("instruct+caption+prefixes", "the instruct+caption mix with text in front of the "
            "questions in a share of the samples (a system turn, or instruction lines in front of "
            "one question: short ones, JSON-schema format instructions, prose; long ones, up to ~900 "
            "tokens, in whole batches), "
            "the answers unchanged", (*INSTRUCT_TASKS, "caption"), independent_turns=True,
            exchanges=_instruct_caption, prefixes=PromptMix()),
        TOOLS_MIX,  # reading through the ocr tool, the rest directly (tool_mix.py)
    )
}  # fmt: skip


def get_mix(name: str) -> Mix:
    if name not in MIXES:
        raise UserError(f"unknown data.mix {name!r}; choose one of {', '.join(MIXES)}")
    return MIXES[name]


def mix_source(name: str, world_dir: str | Path, splits: dict[str, str | None], *, seed: int,
               loc_bins: int, json_boxes: str | Path | None = None) -> Callable[[str], Iterable[Sample]]:  # fmt: skip
    """A training source (role "train"/"val" -> samples of `splits[role]`) over the mix
    `name`; every call on a role reads that role's next epoch. `json_boxes`: a file of boxes
    per image for the JSON answers of the training role (`read_json_boxes`)."""
    mix = get_mix(name)
    boxes = read_json_boxes(json_boxes) if json_boxes is not None else None
    calls = dict.fromkeys(splits, 0)

    def source(role: str) -> Iterable[Sample]:
        split = splits[role]
        assert split is not None, f"no split for role {role!r}"
        epoch = calls[role]
        calls[role] += 1
        return mix.samples(world_dir, split, seed=seed, epoch=epoch, loc_bins=loc_bins,
                           json_boxes=boxes if role == "train" else None)  # fmt: skip

    return source


def tokenizer_texts(world_dir: str | Path, loc_bins: int, images: int = 1500) -> list[str]:
    """The texts every mix reads and writes, from the first `images` training images: what a
    tokenizer for these mixes is trained on (location tokens are the tokenizer's own)."""
    from visto.data.synth.reader import iter_records

    texts = list(CAPTION_PROMPTS)
    for k, record in enumerate(iter_records(world_dir, "train")):
        if k >= images:
            break
        texts += record["tasks"]["captions"]
        for q, a in record_qas(record, loc_bins):
            texts += [q, a]
    return texts


__all__ = [
    "CAPTION_PROMPTS",
    "MIXES",
    "Mix",
    "conversation",
    "get_mix",
    "mix_source",
    "record_qas",
    "tokenizer_texts",
]
