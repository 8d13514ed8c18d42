"""Every task derived from one image's ground truth: captions, VQA, grounding, OCR, JSON, label.

Prompts are phrased the way a person would ask (several phrasings, chosen by the image's own
random stream); answers are short and canonical so that exact match is a fair metric:
counts are digits ("3"), yes/no are "yes"/"no", colours/shapes/sizes are one vocabulary
word, boxes are "[x1, y1, x2, y2]" with ints 0..999, OCR is the texts in reading order
joined by one space, JSON is compact with a fixed key order.

Each VQA item carries the facts it was derived from (`objects`, `relation`, `probe`, ...),
so tests and evaluators can check answers against the scene rather than trust them.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from visto.data.synth.vocab import (
    COLOURS,
    SHAPES,
    SIZES,
    describe,
    number_word,
    plural,
    with_article,
)
from visto.utils.boxes import match_boxes

# ---------------------------------------------------------------- geometry helpers


def normalize_box(box: list[int], width: int, height: int) -> list[int]:
    """Pixel box (x1, y1, x2, y2) to ints 0..999 (the convention of DESIGN.md)."""
    sx, sy = 999 / width, 999 / height
    x1, y1, x2, y2 = box
    return [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]


def box_text(box: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in box) + "]"


def centre(box: list[int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def reading_order(texts: list[dict]) -> list[dict]:
    """Top to bottom; texts whose vertical extents overlap by half are one line, left to right."""
    remaining = sorted(texts, key=lambda t: (t["box"][1] + t["box"][3]) / 2)
    ordered: list[dict] = []
    while remaining:
        first = remaining[0]
        fy1, fy2 = first["box"][1], first["box"][3]
        line = [
            t for t in remaining
            if min(fy2, t["box"][3]) - max(fy1, t["box"][1]) > 0.5 * min(fy2 - fy1, t["box"][3] - t["box"][1])
        ]  # fmt: skip
        ordered += sorted(line, key=lambda t: t["box"][0])
        remaining = [t for t in remaining if t not in line]
    return ordered


def position_phrase(box: list[int], size: int) -> str:
    """Where the object's centre falls in a 3x3 grid: 'in the top left', 'on the right', ..."""
    cx, cy = centre(box)
    col = ("left", "", "right")[min(2, int(3 * cx / size))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / size))]
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


# ---------------------------------------------------------------- referring to objects


def unique_descriptions(objects: list[dict], i: int, size: int) -> list[str]:
    """Every description that picks out object i alone, shortest first (may be empty)."""
    o = objects[i]
    keys = [
        (("shape",), o["shape"]),
        (("colour", "shape"), f"{o['colour']} {o['shape']}"),
        (("size", "shape"), f"{o['size']} {o['shape']}"),
        (("size", "colour", "shape"), describe(o)),
    ]
    out = []
    for fields, words in keys:
        matches = [j for j, p in enumerate(objects) if all(p[f] == o[f] for f in fields)]
        if matches == [i]:
            out.append(words)
    if not out:
        # Identical twins: refer by side when exactly two are clearly apart left/right.
        twins = [j for j, p in enumerate(objects) if describe(p) == describe(o)]
        if len(twins) == 2:
            a, b = (centre(objects[j]["box"])[0] for j in twins)
            if abs(a - b) > 0.15 * size:
                leftmost = twins[0] if a < b else twins[1]
                side = "left" if i == leftmost else "right"
                out.append(f"{o['colour']} {o['shape']} on the {side}")
    return out


# ---------------------------------------------------------------- captions


def _object_list(objects: list[dict], with_position: bool, size: int) -> str:
    parts = []
    for o in sorted(objects, key=lambda o: o["box"][0]):
        part = with_article(describe(o))
        if with_position:
            part += " " + position_phrase(o["box"], size)
        parts.append(part)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(counts: dict[str, int]) -> str:
    parts = [
        f"{number_word(n)} {plural(s, n)}" if n > 1 else with_article(s) for s, n in counts.items()
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _text_sentence(texts: list[dict]) -> str:
    if not texts:
        return ""
    quoted = " and ".join(f'"{t["text"]}"' for t in texts)
    what = "text" if len(texts) == 1 else "texts"
    return f" The {what} {quoted} {'is' if len(texts) == 1 else 'are'} written on it."


def captions(truth: dict) -> list[str]:
    objs, size, texts = truth["objects"], truth["width"], truth["texts"]
    n = len(objs)
    background = {
        "plain": "plain",
        "gradient": "graded",
        "mottled": "mottled",
        "stripes": "striped",
        "checker": "checked",
    }[truth["background"]]
    first = _object_list(objs, with_position=False, size=size)
    out = [
        first[0].upper() + first[1:] + f" on a {background} background." + _text_sentence(texts),
        f"{number_word(n).capitalize()} {'shape' if n == 1 else 'shapes'}: "
        + _count_phrase(truth["counts"])
        + "."
        + _text_sentence(texts),
        "An image with "
        + _object_list(objs, with_position=True, size=size)
        + "."
        + _text_sentence(texts),
    ]
    return out


# ---------------------------------------------------------------- VQA


def _qa(q: str, a: str, qtype: str, **facts) -> dict:
    return {"q": q, "a": a, "type": qtype, **facts}


def vqa(
    truth: dict, rng: random.Random, absent_pairs: list[tuple[str, str]], names: list[list[str]]
) -> list[dict]:
    """About 8-14 questions of seven types; exist and relation questions are half yes, half no.
    The kinds draw from `rng` one after another in this order, which fixes the world's questions."""
    objs = truth["objects"]
    counts = Counter(o["shape"] for o in objs)
    return [
        *_count_questions(objs, counts, rng),
        *_attribute_questions(objs, names, rng),
        *_exist_questions(objs, counts, absent_pairs, rng),
        *_relation_questions(objs, names, truth["width"], rng),
        *_read_questions(truth["texts"], rng),
    ]


def _count_questions(objs: list[dict], counts: Counter, rng: random.Random) -> list[dict]:
    """One present shape, one random shape (often absent, answer "0"), all objects, a colour."""
    present_shapes = sorted(counts, key=SHAPES.index)
    out: list[dict] = []
    shape = rng.choice(present_shapes)
    other = rng.choice(SHAPES)
    for s in dict.fromkeys([shape, other]):
        q = rng.choice(["How many {p} are there?", "How many {p} can you see?", "Count the {p}."])
        out.append(_qa(q.format(p=plural(s, 2)), str(counts[s]), "count", shape=s, count=counts[s]))
    q = rng.choice(["How many objects are in the image?", "How many shapes are there?"])
    out.append(_qa(q, str(len(objs)), "count", count=len(objs)))
    colour = rng.choice(list(COLOURS))
    n_colour = sum(o["colour"] == colour for o in objs)
    out.append(
        _qa(
            f"How many {colour} objects are there?",
            str(n_colour),
            "count",
            colour=colour,
            count=n_colour,
        )
    )
    return out


def _attribute_questions(objs: list[dict], names: list[list[str]], rng: random.Random) -> list[dict]:
    """Colour, shape and size of referred objects: at most two, two and one."""
    out: list[dict] = []
    order = list(range(len(objs)))
    rng.shuffle(order)
    asked_colour = asked_shape = asked_size = 0
    for i in order:
        o = objs[i]
        refs = names[i]
        no_colour = [r for r in refs if o["colour"] not in r.split()]
        if no_colour and asked_colour < 2:
            q = rng.choice(
                [
                    "What colour is the {r}?",
                    "What is the colour of the {r}?",
                    "Which colour does the {r} have?",
                ]
            )
            out.append(_qa(q.format(r=no_colour[0]), o["colour"], "colour", object=i))
            asked_colour += 1
        if sum(p["colour"] == o["colour"] for p in objs) == 1 and asked_shape < 2:
            q = rng.choice(
                ["What shape is the {c} object?", "Which shape is {c}?", "What is the {c} shape?"]
            )
            out.append(_qa(q.format(c=o["colour"]), o["shape"], "shape", object=i))
            asked_shape += 1
        no_size = [r for r in refs if o["size"] not in r.split()]
        if no_size and asked_size < 1:
            q = rng.choice(["What size is the {r}?", "Is the {r} small, medium or large?"])
            out.append(
                _qa(q.format(r=no_size[-1]), o["size"], "attribute", attribute="size", object=i)
            )
            asked_size += 1
    return out


def _exist_questions(objs: list[dict], counts: Counter, absent_pairs: list[tuple[str, str]],
                     rng: random.Random) -> list[dict]:  # fmt: skip
    """Two present probes and two absent probes (shape alone, or colour + shape)."""
    present_shapes = sorted(counts, key=SHAPES.index)
    pairs = sorted({(o["colour"], o["shape"]) for o in objs})
    there = pairs + [(None, s) for s in present_shapes]
    not_there = [p for p in absent_pairs if p not in pairs] + [
        (None, s) for s in SHAPES if s not in counts
    ]
    # Two distinct probes that are there and two that are not: yes/no stays balanced.
    probes = [(p, True) for p in rng.sample(there, 2)] + [
        (p, False) for p in rng.sample(not_there, 2)
    ]
    rng.shuffle(probes)
    out: list[dict] = []
    for (c, s), present in probes:
        thing = f"{c} {s}" if c else s
        q = rng.choice(["Is there {t} in the image?", "Do you see {t}?", "Is there {t}?"])
        out.append(_qa(q.format(t=with_article(thing)), "yes" if present else "no", "exist",
                       probe={"colour": c, "shape": s}, present=present))  # fmt: skip
    return out


def _relation_questions(objs: list[dict], names: list[list[str]], size: int,
                        rng: random.Random) -> list[dict]:  # fmt: skip
    """Two, between objects that have names, only where the answer is clear; one true, one false."""
    named = {i: r[0] for i, r in enumerate(names) if r}
    candidates = [(i, j) for i in named for j in named if i < j]
    rng.shuffle(candidates)
    out: list[dict] = []
    asked = 0
    true_first = rng.random() < 0.5  # of two relation questions, one is true and one false
    for i, j in candidates:
        if asked == 2:
            break
        (xi, yi), (xj, yj) = centre(objs[i]["box"]), centre(objs[j]["box"])
        axes = []
        if abs(xi - xj) > 0.12 * size:
            axes.append(("left" if xi < xj else "right", {"left": "right", "right": "left"}))
        if abs(yi - yj) > 0.12 * size:
            axes.append(("above" if yi < yj else "below", {"above": "below", "below": "above"}))
        if not axes:
            continue
        truth_rel, opposite = rng.choice(axes)
        subj, obj = (i, j) if rng.random() < 0.5 else (j, i)
        if subj != i:  # the relation flips with the order of the pair
            truth_rel = opposite[truth_rel]
        ask_true = (asked % 2 == 0) == true_first
        rel = truth_rel if ask_true else opposite[truth_rel]
        phrase = {
            "left": "to the left of",
            "right": "to the right of",
            "above": "above",
            "below": "below",
        }[rel]
        q = f"Is the {named[subj]} {phrase} the {named[obj]}?"
        out.append(
            _qa(q, "yes" if ask_true else "no", "relation", subject=subj, object=obj, relation=rel)
        )
        asked += 1
    return out


def _read_questions(texts: list[dict], rng: random.Random) -> list[dict]:
    """The text, where there is one; the word or the number, where there is one of each kind."""
    out: list[dict] = []
    if len(texts) == 1:
        q = rng.choice(
            ["What does the text say?", "What is written in the image?", "Read the text."]
        )
        out.append(_qa(q, texts[0]["text"], "read", text_index=0))
    for kind in ("word", "number"):
        of_kind = [k for k, t in enumerate(texts) if t["kind"] == kind]
        if len(texts) > 1 and len(of_kind) == 1:
            out.append(
                _qa(
                    f"What {kind} is written in the image?",
                    texts[of_kind[0]]["text"],
                    "read",
                    text_index=of_kind[0],
                )
            )
    return out


# ---------------------------------------------------------------- grounding, OCR, JSON, label


def grounding(
    truth: dict, rng: random.Random, names: list[list[str]]
) -> tuple[list[dict], list[dict]]:
    """(referring expression -> box, box -> description), one each per nameable object."""
    ground, refdesc = [], []
    for i, o in enumerate(truth["objects"]):
        refs = names[i]
        box = box_text(o["box_norm"])
        if refs:
            q = rng.choice(
                [
                    "Where is the {r}?",
                    "Find the {r}.",
                    "Give the bounding box of the {r}.",
                    "Locate the {r}.",
                ]
            )
            ground.append({"q": q.format(r=rng.choice(refs)), "a": box, "object": i})
        q = rng.choice(
            ["What is in the box {b}?", "Describe the object at {b}.", "What object is at {b}?"]
        )
        refdesc.append({"q": q.format(b=box), "a": describe(o), "object": i})
    return ground, refdesc


def ocr(truth: dict, rng: random.Random) -> dict | None:
    if not truth["texts"]:
        return None
    q = rng.choice(
        [
            "Read all the text in the image.",
            "What text appears in this image?",
            "Transcribe the text.",
        ]
    )
    return {"q": q, "a": " ".join(t["text"] for t in truth["texts"])}


def json_target(truth: dict) -> dict:
    """Objects left to right with 0..999 boxes, counts per shape, texts in reading order."""
    objects = [
        {"shape": o["shape"], "colour": o["colour"], "size": o["size"], "box": o["box_norm"]}
        for o in sorted(truth["objects"], key=lambda o: (o["box"][0], o["box"][1]))
    ]
    return {
        "objects": objects,
        "counts": truth["counts"],
        "text": [t["text"] for t in truth["texts"]],
    }


def json_task(truth: dict, rng: random.Random) -> dict:
    q = rng.choice([
        "Describe the image as JSON with the keys objects, counts and text.",
        "List every object with its shape, colour, size and box, the counts per shape and the text, as JSON.",
    ])  # fmt: skip
    return {"q": q, "a": json.dumps(json_target(truth), separators=(",", ":"))}


def with_json_boxes(record: dict, boxes: list[list[int]]) -> dict:
    """The record with its JSON answer rewritten: each object's box (0..999) replaced by the
    box of `boxes` it matches (one to one, IoU >= 0.5); unmatched objects keep their own. The
    objects stay in the truth's order, so only the box numbers change."""
    truth = record["truth"]
    objects = truth["objects"]
    matched = match_boxes([o["box_norm"] for o in objects], boxes)
    if not matched:
        return record
    objects = [{**o, "box_norm": list(boxes[matched[i]])} if i in matched else o
               for i, o in enumerate(objects)]  # fmt: skip
    answer = json.dumps(json_target({**truth, "objects": objects}), separators=(",", ":"))
    tasks = {**record["tasks"], "json": {**record["tasks"]["json"], "a": answer}}
    return {**record, "tasks": tasks}


def label(truth: dict) -> dict:
    """The most salient object: most visible pixels (ties: larger, then drawn later)."""
    objs = truth["objects"]
    i = max(
        range(len(objs)),
        key=lambda k: (objs[k]["area"] * objs[k]["visible"], list(SIZES).index(objs[k]["size"]), k),
    )
    o = objs[i]
    return {"shape": o["shape"], "colour": o["colour"], "class": f"{o['colour']} {o['shape']}",
            "object": i, "single": len(objs) == 1}  # fmt: skip


def classify_task(truth: dict, rng: random.Random) -> dict:
    q = rng.choice([
        "What is the main object in this image? Answer with its colour and shape.",
        "Name the colour and shape of the most prominent object.",
        "What is this? Answer with a colour and a shape.",
    ])  # fmt: skip
    return {"q": q, "a": truth["label"]["class"]}


def build_tasks(truth: dict, rng: random.Random, absent_pairs: list[tuple[str, str]]) -> dict:
    objs = truth["objects"]
    names = [unique_descriptions(objs, i, truth["width"]) for i in range(len(objs))]
    ground, refdesc = grounding(truth, rng, names)
    return {
        "captions": captions(truth),
        "vqa": vqa(truth, rng, absent_pairs, names),
        "ground": ground,
        "refdesc": refdesc,
        "ocr": ocr(truth, rng),
        "json": json_task(truth, rng),
        "classify": classify_task(truth, rng),
    }
