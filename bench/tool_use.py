"""A generative model with the OCR tool, through the real tool loop (the ToolLoop that
`visto chat --tools ocr` runs: grammar-constrained calls, the real PP-OCR tool on the image,
the result fed back as a tool turn, the model answering again), on the world's test split.

    python bench/tool_use.py --model runs/tools-a/checkpoint --baseline runs/r3cap/checkpoint \\
        --data runs/r3/world --json bench/out/tool_use.json

Questions: the reading questions of the split (each image's OCR question and its "read" VQA
questions) and a seeded sample of its other VQA questions, each asked alone about its image.

    read.right_tool       reading questions on which the model called ocr (the only tool offered)
    other.right_tool      other questions answered without a call
    right_tool            both together
    args_valid            calls whose arguments parse and pass the ocr tool's schema
    read.exact_tool       OCR exact (normalize_ocr) of the answer after the loop, tool offered
    read.exact_no_tool    the same model asked the same questions with no tool offered
    read.exact_blind      with the tool, each image swapped for another test image with text
                          (the blind twin: the answer must come from this image's text)
    other.vqa_tool        VQA accuracy on the other questions, tool offered
    other.vqa_no_tool     the same, no tool offered
    baseline.*            the --baseline model with no tool offered (it never saw one)
    teacher_forced.exact  (--teacher-forced N) the answers after a tool result in the `tools`
                          mix's packed samples of N images with text (the world's result, the
                          reference call), each answer's tokens all argmax-right: whether the
                          model copies at all, apart from the loop, the real tool and decoding

The load average before and after goes with the figures: the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def questions(data: str, split: str, n_read: int, n_other: int, seed: int) -> tuple[list, list]:
    """(reading, other): (record, question, answer) triples of `split`."""
    from visto.data.synth import iter_records
    from visto.data.synth.tool_mix import reading_questions

    records = list(iter_records(data, split))
    reading = [(r, q, a) for r in records for q, a in reading_questions(r)]
    other = [(r, qa["q"], qa["a"]) for r in records for qa in r["tasks"]["vqa"]
             if qa.get("type") != "read"]  # fmt: skip
    rng = random.Random(seed)
    return rng.sample(reading, min(n_read, len(reading))), rng.sample(
        other, min(n_other, len(other))
    )


class Asker:
    """One model, asked each question in a fresh conversation, with or without the tool."""

    def __init__(self, path: str, max_tokens: int) -> None:
        from visto.commands._chat_tools import ToolLoop
        from visto.commands._common import load_for_inference
        from visto.infer import SamplingParams

        self.model = load_for_inference(path, "cpu", False)
        self.loop = ToolLoop.build(self.model, "ocr", "auto")
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        # what ToolLoop.answer reads of `visto chat`'s arguments
        self.args = argparse.Namespace(task=None, stream=False, json=True)

    def ask(self, image: Any, question: str, tools: bool) -> tuple[str, list[dict[str, Any]]]:
        from visto.tasks.runner import Chat

        if not tools:
            chat = Chat(self.model, [image])
            return chat.ask(question, params=self.params).text, []
        chat = Chat(self.model, [image], tools=self.loop.tools.openai())
        reply, runs = self.loop.answer(chat, question, self.args, self.params, [image])
        return reply.text, runs


def args_valid(run: dict[str, Any]) -> bool:
    from visto.tools import argument_problems
    from visto.tools.ocr import ocr_tool

    try:
        arguments = json.loads(run["arguments"])
    except json.JSONDecodeError:
        return False
    return (run["name"] == "ocr" and isinstance(arguments, dict)
            and not argument_problems(ocr_tool.parameters, arguments))  # fmt: skip


def teacher_forced(path: str, data: str, split: str, n: int) -> dict[str, Any]:
    """The answers after a tool result, teacher-forced in the mix's packed samples (the
    segment of each tool exchange: its call labelled, then the result, then the answer)."""
    import dataclasses
    import itertools

    import torch

    from visto.checkpoint import load
    from visto.data.processor import IGNORE_INDEX
    from visto.data.synth.tool_mix import TOOLS_MIX

    model = load(path).eval()
    captured: dict[str, Any] = {}
    model.language_model.lm_head.register_forward_hook(lambda m, i, out: captured.update(out=out))
    mix = dataclasses.replace(TOOLS_MIX, textless_share=0.0)  # images with text only
    samples = mix.samples(data, split, seed=0, epoch=0, loc_bins=model.processor.config.loc_bins)
    right, said = [], []
    for sample in itertools.islice(samples, n):
        batch = model.collate([sample])
        with torch.no_grad():
            model(batch)
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        seg = (
            batch["segment_ids"][0]
            if batch.get("segment_ids") is not None
            else torch.ones_like(ids)
        )
        for k in range(1, int(seg.max()) + 1):
            learned = ((seg == k) & (labels != IGNORE_INDEX)).nonzero().flatten().tolist()
            gaps = [i for i in range(1, len(learned)) if learned[i] != learned[i - 1] + 1]
            if len(gaps) != 1:
                continue  # a direct exchange: one labelled run
            answer = torch.tensor(learned[gaps[0] :])
            guess = captured["out"][0][answer - 1].argmax(-1)
            right.append(float(torch.equal(guess, ids[answer])))
            said.append((model.processor.decode(ids[answer]), model.processor.decode(guess)))
    return {"images": n, "answers": len(right), "exact": mean(right), "examples": said[:10]}


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="the checkpoint trained to call tools")
    p.add_argument("--baseline", help="a checkpoint asked without tools, for comparison")
    p.add_argument("--data", required=True, help="the synthetic world the models were trained on")
    p.add_argument("--split", default="test")
    p.add_argument("--n-read", type=int, default=120, help="reading questions (default 120)")
    p.add_argument("--n-other", type=int, default=150, help="other VQA questions (default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=128, help="as visto chat's default")
    p.add_argument(
        "--teacher-forced",
        type=int,
        default=0,
        metavar="N",
        help="also score the answers after a tool result teacher-forced on N images",
    )
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from visto.data.images import open_image
    from visto.eval.metrics import vqa_accuracy
    from visto.tasks.parsers import normalize_ocr

    reading, other = questions(args.data, args.split, args.n_read, args.n_other, args.seed)
    out: dict[str, Any] = {"command": " ".join(sys.argv), "split": args.split,
                           "n_read": len(reading), "n_other": len(other), "load_before": loadavg()}  # fmt: skip
    image = {}
    for r, _, _ in reading + other:
        image.setdefault(r["id"], open_image(Path(args.data) / r["image"]))
    # the blind twin: each reading image swapped for the next one with different text
    texts = sorted({r["id"]: r for r, _, _ in reading}.values(), key=lambda r: r["id"])
    swap = {}
    for k, r in enumerate(texts):
        for other_r in texts[k + 1 :] + texts[:k]:
            if [t["text"] for t in other_r["truth"]["texts"]] != [
                t["text"] for t in r["truth"]["texts"]
            ]:
                swap[r["id"]] = other_r["id"]
                break

    start = time.perf_counter()
    model = Asker(args.model, args.max_tokens)
    rows: dict[str, list] = {"read": [], "other": []}
    for r, q, a in reading:
        said, runs = model.ask(image[r["id"]], q, tools=True)
        blind, _ = model.ask(image.get(swap.get(r["id"]), image[r["id"]]), q, tools=True)
        plain, _ = model.ask(image[r["id"]], q, tools=False)
        rows["read"].append({"id": r["id"], "q": q, "a": a, "tool": said, "no_tool": plain,
                             "blind": blind, "runs": runs})  # fmt: skip
    for r, q, a in other:
        said, runs = model.ask(image[r["id"]], q, tools=True)
        plain, _ = model.ask(image[r["id"]], q, tools=False)
        rows["other"].append(
            {"id": r["id"], "q": q, "a": a, "tool": said, "no_tool": plain, "runs": runs}
        )
    model_s = time.perf_counter() - start

    read, oth = rows["read"], rows["other"]
    calls = [run for row in read + oth for run in row["runs"]]
    figures = {
        "read.right_tool": mean([float(bool(x["runs"]) and all(c["name"] == "ocr" for c in x["runs"]))
                                 for x in read]),
        "other.right_tool": mean([float(not x["runs"]) for x in oth]),
        "args_valid": mean([float(args_valid(c)) for c in calls]),
        "calls": len(calls),
        "read.exact_tool": mean([float(normalize_ocr(x["tool"]) == normalize_ocr(x["a"])) for x in read]),
        "read.exact_no_tool": mean([float(normalize_ocr(x["no_tool"]) == normalize_ocr(x["a"])) for x in read]),
        "read.exact_blind": mean([float(normalize_ocr(x["blind"]) == normalize_ocr(x["a"])) for x in read]),
        "other.vqa_tool": mean([vqa_accuracy(x["tool"], [x["a"]]) for x in oth]),
        "other.vqa_no_tool": mean([vqa_accuracy(x["no_tool"], [x["a"]]) for x in oth]),
    }  # fmt: skip
    right = [float(bool(x["runs"])) for x in read] + [float(not x["runs"]) for x in oth]
    figures["right_tool"] = mean(right)
    out["model"] = {"path": args.model, "seconds": round(model_s, 1), **figures}
    if args.baseline:
        start = time.perf_counter()
        base = Asker(args.baseline, args.max_tokens)
        for x, (r, q, _) in zip(read + oth, reading + other, strict=True):
            x["baseline"], _ = base.ask(image[r["id"]], q, tools=False)
        out["baseline"] = {
            "path": args.baseline, "seconds": round(time.perf_counter() - start, 1),
            "read.exact_no_tool": mean([float(normalize_ocr(x["baseline"]) == normalize_ocr(x["a"]))
                                        for x in read]),
            "other.vqa_no_tool": mean([vqa_accuracy(x["baseline"], [x["a"]]) for x in oth]),
        }  # fmt: skip
    if args.teacher_forced:
        out["teacher_forced"] = teacher_forced(
            args.model, args.data, args.split, args.teacher_forced
        )
    out["load_after"] = loadavg()
    out["misses"] = {
        "read": [x for x in read if normalize_ocr(x["tool"]) != normalize_ocr(x["a"])],
        "other_called": [x for x in oth if x["runs"]],
    }
    for who in ("model", "baseline", "teacher_forced"):
        if who in out:
            print(who, json.dumps(out[who]), flush=True)
    print(
        f"misses: {len(out['misses']['read'])} reading answers, "
        f"{len(out['misses']['other_called'])} other questions that called",
        flush=True,
    )
    for x in out["misses"]["read"][:20]:
        print(
            f"    {x['id']} {x['q']!r}: said {x['tool']!r}, truth {x['a']!r}, "
            f"runs {[(c['name'], c['arguments'], c['result']) for c in x['runs']]}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
