"""A generative model with the OCR tool, through the real tool loop (the ToolLoop that
`visto chat --tools ocr` runs: grammar-constrained calls, the real PP-OCR tool on the image,
the result fed back as a tool turn, the model answering again), on the world's test split.

    python bench/ocr_world.py --data runs/y0/world --variants 3x --reads bench/out/ocr_reads_y0.json
    python bench/tool_use.py --model runs/t17a/checkpoint --data runs/y0/world \\
        --ocr-reads bench/out/ocr_reads_y0.json --n-ocr 40 --json bench/out/tool_use.json

Questions, each asked alone about its image: the split's OCR questions (one per image with
text), a seeded sample of its "read" VQA questions, and of its other VQA questions. Each
reading question is asked in the ways of `--modes`:

    direct      no tool offered: the model answers from the pixels           (a)
    tool        the ocr tool offered (tool_choice auto): the model calls, visto runs the tool,
                the model answers after its result                          (b)
    quote       as tool, the answer after a result decoded under the quote constraint
                (ToolLoop(quote=True), visto.tools.quote: made of the result's words)   (b')
    swap        as tool, but the tool reads another test image with other text (the model
                still sees its own): does the answer follow the tool's text or the image?
    swap-quote  swap with the quote constraint
and, for OCR questions, the expert alone: the tool's text, its lines joined by spaces   (c)

    <mode>.exact          OCR exact (normalize_ocr, as `visto eval`'s ocr.exact) per question kind
    read.<mode>.<w>.exact "read" VQA questions that ask for a number / a word ("What number is
                          written in the image?"), where the question must pick one of the texts
    <mode>.right_tool     tool modes: reading questions on which ocr (the only tool) was called
    <mode>.follows_tool   swap modes, OCR questions: the answer is the other image's text
    <mode>.follows_image  swap modes, OCR questions: the answer is the model's own image's text
    args_valid            calls whose arguments parse and pass the ocr tool's schema
    other.right_tool      other questions answered without a call (tool offered)
    other.vqa_tool / other.vqa_direct   VQA accuracy on the other questions with / without it
    baseline.*            the --baseline model with no tool offered (it never saw one)
    teacher_forced.exact  (--teacher-forced N) the answers after a tool result in the `tools`
                          mix's packed samples of N images with text (the world's result, the
                          reference call), each answer's tokens all argmax-right: whether the
                          model copies at all, apart from the loop, the real tool and decoding

The OCR tool is the real one (visto.tools.ocr.run_ocr, the `ocr` tool's name, description and
schema) run in this process and read once per image and detail: `--ocr-reads FILE`
(bench/ocr_world.py --reads) gives the {"detail": "text"} reads computed before, so that a
command that asks many questions fits a CPU budget; the expert is the same either way.
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


MODES = ("direct", "tool", "quote", "swap", "swap-quote")
TOOL_MODES = ("tool", "quote", "swap", "swap-quote")


def questions(data: str, split: str, n_ocr: int, n_read: int, n_other: int,
              seed: int) -> tuple[list, list, list]:  # fmt: skip
    """(ocr, read, other): (record, question, answer) triples of `split`; the OCR questions
    of the first `n_ocr` images with text (by id), the others a seeded sample."""
    from visto.data.synth import iter_records

    records = sorted(iter_records(data, split), key=lambda r: r["id"])
    ocr = [(r, r["tasks"]["ocr"]["q"], r["tasks"]["ocr"]["a"]) for r in records
           if r["tasks"]["ocr"] is not None][:n_ocr]  # fmt: skip
    read = [(r, qa["q"], qa["a"]) for r in records for qa in r["tasks"]["vqa"]
            if qa.get("type") == "read"]  # fmt: skip
    other = [(r, qa["q"], qa["a"]) for r in records for qa in r["tasks"]["vqa"]
             if qa.get("type") != "read"]  # fmt: skip
    rng = random.Random(seed)
    return (
        ocr,
        rng.sample(read, min(n_read, len(read))),
        rng.sample(other, min(n_other, len(other))),
    )


class ReadOnce:
    """The OCR tool's function (visto.tools.ocr.run_ocr), each image read once per detail:
    `reads` maps an image object's id() to its {"detail": "text"} result read before."""

    def __init__(self, reads: dict[int, dict[str, Any]]) -> None:
        self.cache: dict[tuple[int, str], Any] = {(k, "text"): v for k, v in reads.items()}
        self.calls = self.live = 0

    def __call__(self, image: Any, detail: str = "words") -> Any:
        from visto.tools.ocr import run_ocr

        self.calls += 1
        key = (id(image), detail)
        if key not in self.cache:
            self.live += 1
            self.cache[key] = run_ocr(image, detail)
        return self.cache[key]


class Asker:
    """One model, asked each question in a fresh conversation, with or without the tool."""

    def __init__(self, path: str, max_tokens: int, read_once: ReadOnce | None = None) -> None:
        import dataclasses

        from visto.commands._chat_tools import ToolLoop
        from visto.commands._common import load_for_inference
        from visto.infer import SamplingParams
        from visto.tools import ToolRegistry
        from visto.tools.ocr import ocr_tool

        self.model = load_for_inference(path, "cpu", False)
        # the ocr tool as the model is offered it (name, description, schema), run here
        tool = dataclasses.replace(ocr_tool, run=read_once or ReadOnce({}), process=None,
                                   warm=None, timeout_s=600.0)  # fmt: skip
        self.loop = ToolLoop.build(self.model, ToolRegistry([tool]), "auto")
        self.quote_loop = dataclasses.replace(self.loop, quote=True)
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        # what ToolLoop.answer reads of `visto chat`'s arguments
        self.args = argparse.Namespace(task=None, stream=False, json=True)

    def ask(self, image: Any, question: str, mode: str,
            tool_image: Any = None) -> tuple[str, list[dict[str, Any]]]:  # fmt: skip
        """The answer and the tool runs; `tool_image`: the image the tool reads (swap modes)."""
        from visto.tasks.runner import Chat

        if mode == "direct":
            chat = Chat(self.model, [image])
            return chat.ask(question, params=self.params).text, []
        loop = self.quote_loop if mode.endswith("quote") else self.loop
        chat = Chat(self.model, [image], tools=loop.tools.openai())
        seen = [tool_image if mode.startswith("swap") else image]
        reply, runs = loop.answer(chat, question, self.args, self.params, seen)
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


def exact(said: str, truth: str) -> float:
    from visto.tasks.parsers import normalize_ocr

    return float(normalize_ocr(said) == normalize_ocr(truth))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="the checkpoint trained to call tools")
    p.add_argument("--baseline", help="a checkpoint asked without tools, for comparison")
    p.add_argument("--data", required=True, help="the synthetic world the models were trained on")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--n-ocr", type=int, default=40, help="OCR questions (images with text, default 40)"
    )
    p.add_argument("--n-read", type=int, default=0, help='"read" VQA questions (default 0)')
    p.add_argument("--n-other", type=int, default=0, help="other VQA questions (default 0)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument(
        "--ocr-reads",
        metavar="FILE",
        action="append",
        default=[],
        help="bench/ocr_world.py --reads of --data (repeatable)",
    )
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
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from visto.data.images import open_image
    from visto.eval.metrics import vqa_accuracy

    ocr, read, other = questions(args.data, args.split, args.n_ocr, args.n_read, args.n_other,
                                 args.seed)  # fmt: skip
    out: dict[str, Any] = {"command": " ".join(sys.argv), "split": args.split, "modes": modes,
                           "n_ocr": len(ocr), "n_read": len(read), "n_other": len(other),
                           "load_before": loadavg()}  # fmt: skip
    image: dict[str, Any] = {}
    for r, _, _ in ocr + read + other:
        image.setdefault(r["id"], open_image(Path(args.data) / r["image"]))
    # the swap: each reading image's tool reads the next one (by id) with other text
    by_id = sorted({r["id"]: r for r, _, _ in ocr + read}.values(), key=lambda r: r["id"])
    twin: dict[str, dict] = {}
    for k, r in enumerate(by_id):
        mine = sorted(t["text"] for t in r["truth"]["texts"])
        for o in by_id[k + 1 :] + by_id[:k]:
            if sorted(t["text"] for t in o["truth"]["texts"]) != mine:
                twin[r["id"]] = o
                image.setdefault(o["id"], open_image(Path(args.data) / o["image"]))
                break
    reads: dict[int, dict[str, Any]] = {}
    for path in args.ocr_reads:
        saved = json.loads(Path(path).read_text())
        if saved.get("split") != args.split:
            p.error(f"{path} holds the {saved.get('split')!r} split, not {args.split!r}")
        reads.update({id(image[i]): v for i, v in saved["reads"].items() if i in image})
    read_once = ReadOnce(reads)

    start = time.perf_counter()
    cpu = time.process_time()
    model = Asker(args.model, args.max_tokens, read_once)
    rows: dict[str, list] = {"ocr": [], "read": [], "other": []}
    for kind, items in (("ocr", ocr), ("read", read)):
        for r, q, a in items:
            row: dict[str, Any] = {"id": r["id"], "q": q, "a": a}
            for mode in modes:
                other_image = image[twin[r["id"]]["id"]] if r["id"] in twin else None
                if mode.startswith("swap") and (kind != "ocr" or other_image is None):
                    continue
                row[mode], runs = model.ask(image[r["id"]], q, mode, other_image)
                if mode in TOOL_MODES:
                    row[mode + "_runs"] = runs
            if kind == "ocr":
                row["expert"] = " ".join(read_once(image[r["id"]], "text")["text"].split())
                if r["id"] in twin:
                    row["twin"] = twin[r["id"]]["tasks"]["ocr"]["a"]
            rows[kind].append(row)
    for r, q, a in other:
        row = {"id": r["id"], "q": q, "a": a}
        for mode in [m for m in modes if m in ("direct", "tool")]:
            row[mode], runs = model.ask(image[r["id"]], q, mode)
            if mode == "tool":
                row["tool_runs"] = runs
        rows["other"].append(row)
    out["model"] = {"path": args.model, "seconds": round(time.perf_counter() - start, 1),
                    "cpu_seconds": round(time.process_time() - cpu, 1),
                    "ocr_tool_calls": read_once.calls, "ocr_tool_read_live": read_once.live}  # fmt: skip

    figures: dict[str, Any] = {}
    calls = []
    for kind in ("ocr", "read"):
        got = rows[kind]
        for mode in modes:
            done = [x for x in got if mode in x]
            if not done:
                continue
            figures[f"{kind}.{mode}.exact"] = mean([exact(x[mode], x["a"]) for x in done])
            for asked in ("number", "word") if kind == "read" else ():
                figures[f"{kind}.{mode}.{asked}.exact"] = mean(
                    [exact(x[mode], x["a"]) for x in done if f"What {asked} " in x["q"]]
                )
            if mode in TOOL_MODES:
                figures[f"{kind}.{mode}.right_tool"] = mean(
                    [float(bool(x[mode + "_runs"]) and all(c["name"] == "ocr" for c in x[mode + "_runs"]))
                     for x in done])  # fmt: skip
                calls += [c for x in done for c in x[mode + "_runs"]]
            if mode.startswith("swap"):
                figures[f"{kind}.{mode}.follows_tool"] = mean(
                    [exact(x[mode], x["twin"]) for x in done]
                )
                figures[f"{kind}.{mode}.follows_image"] = mean(
                    [exact(x[mode], x["a"]) for x in done]
                )
        if kind == "ocr" and got:
            figures["ocr.expert.exact"] = mean([exact(x["expert"], x["a"]) for x in got])
    oth = rows["other"]
    if oth and "tool" in modes:
        figures["other.right_tool"] = mean([float(not x["tool_runs"]) for x in oth])
        figures["other.vqa_tool"] = mean([vqa_accuracy(x["tool"], [x["a"]]) for x in oth])
        calls += [c for x in oth for c in x["tool_runs"]]
    if oth and "direct" in modes:
        figures["other.vqa_direct"] = mean([vqa_accuracy(x["direct"], [x["a"]]) for x in oth])
    figures["calls"] = len(calls)
    figures["args_valid"] = mean([float(args_valid(c)) for c in calls])
    out["model"].update(figures)
    if args.baseline:
        start = time.perf_counter()
        base = Asker(args.baseline, args.max_tokens, read_once)
        for kind, items in (("ocr", ocr), ("read", read), ("other", other)):
            for x, (r, q, _) in zip(rows[kind], items, strict=True):
                x["baseline"], _ = base.ask(image[r["id"]], q, "direct")
        out["baseline"] = {"path": args.baseline, "seconds": round(time.perf_counter() - start, 1)}
        for kind in ("ocr", "read"):
            if rows[kind]:
                out["baseline"][f"{kind}.direct.exact"] = mean([exact(x["baseline"], x["a"])
                                                                for x in rows[kind]])  # fmt: skip
        if oth:
            out["baseline"]["other.vqa_direct"] = mean([vqa_accuracy(x["baseline"], [x["a"]])
                                                        for x in oth])  # fmt: skip
    if args.teacher_forced:
        out["teacher_forced"] = teacher_forced(
            args.model, args.data, args.split, args.teacher_forced
        )
    out["load_after"] = loadavg()
    out["rows"] = rows
    for who in ("model", "baseline", "teacher_forced"):
        if who in out:
            print(who, json.dumps(out[who]), flush=True)
    for x in rows["ocr"] + rows["read"]:
        said = {m: x[m] for m in modes if m in x and not exact(x[m], x["a"])}
        if said:
            print(f"    {x['id']} {x['q']!r} truth {x['a']!r} expert {x.get('expert')!r} "
                  f"twin {x.get('twin')!r}: {said}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
