"""Answers with a long prompt in front: the quickstart model's VQA when a system turn of
LangChain's format instructions fills the context towards its advertised length (issue 17: "one
context length, the one advertised ... at least 2,048 tokens for the quickstart model ... and
measure quality at 2k"), beside the blind twin (each image swapped for the next test image).

    python bench/long_context.py --model runs/q0/checkpoint --world runs/q0/world \
        --questions 60 --json bench/out/long_context.json

`visto serve --model MODEL` runs in this process; requests go over HTTP with the openai SDK
(8 at a time, so the server batches them), greedy, max_tokens 16. Questions: --questions of the
world's test-split VQA questions, drawn with --seed. System turns in front: none; the format
instructions of LangChain's PydanticOutputParser for a world Scene (bench/langchain_chains.py),
which ask for JSON; "Answer briefly."; and neutral prose (PROSE: how to answer, none of the
world's words) repeated until the prompt is about 722 tokens (the instructions' length) and about
--long, as a system turn and in the user turn before the question; "Answer briefly." and the format
instructions in the user turn (the latter also after the question), and both turns at once.
Figures per prefix: VQA accuracy
(`visto.eval.metrics.vqa_accuracy`), the same with the image swapped (blind), the median
prompt tokens (usage.prompt_tokens), the answers that run on into JSON (a "{") and the VQA
figure of what was said before the first "{". --only NAME ... asks with those rows alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# A system turn that asks nothing of the image and names none of the world's words.
PROSE = ("You are a careful assistant. Read the whole conversation before you answer, and "
         "answer the last question only. Keep the answer short: one word or a number where one "
         "word or a number is enough. If you are not sure, give the answer you think most "
         "likely rather than saying that you do not know. Do not repeat the question, do not "
         "explain how you found the answer, and do not add a greeting or a closing line. The "
         "people who read your answers compare them with answers written by hand, word for "
         "word, so an answer that says more than it needs to is counted as wrong.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--long", type=int, default=1900, help="prompt tokens of the long prefix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", nargs="*", help="the prefixes (row names) to ask with; all by default")
    args = ap.parse_args()

    import base64

    import httpx
    import openai
    from langchain_core.output_parsers import PydanticOutputParser

    from langchain_chains import Scene
    from test_serve_support import running
    from visto.cli import build_parser
    from visto.commands.serve import build_app
    from visto.eval.metrics import vqa_accuracy

    records = [json.loads(line) for line in (args.world / "test.jsonl").open()]
    rng = random.Random(args.seed)
    picked = rng.sample([(k, q) for k, r in enumerate(records) for q in r["tasks"]["vqa"]],
                        args.questions)  # fmt: skip

    def url(k: int) -> str:
        data = (args.world / records[k % len(records)]["image"]).read_bytes()
        return "data:image/png;base64," + base64.b64encode(data).decode()

    instructions = PydanticOutputParser(pydantic_object=Scene).get_format_instructions()
    app = build_app(build_parser().parse_args(["serve", "--model", str(args.model)]))
    out: dict = {"model": str(args.model), "questions": args.questions,
                 "load_before": os.getloadavg()[0], "prefixes": {}}  # fmt: skip
    start = time.perf_counter()
    with running(app, timeout=120) as base:
        card = httpx.get(base + "/v1/models").json()["data"][0]
        out["context_length"] = card["context_length"]
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                               timeout=600)  # fmt: skip

        def ask(prefix: tuple[str | None, Any] | None, k: int, question: str) -> tuple[str, int]:
            system, before = prefix or (None, "")
            # `before`: text in front of the question, or (in front, after) it
            before, after = before if isinstance(before, tuple) else (before, "")
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url(k)}},
                {"type": "text", "text": before + question + after}]})  # fmt: skip
            reply = client.chat.completions.create(model=card["id"], messages=messages,
                                                   max_tokens=16, temperature=0)  # fmt: skip
            return reply.choices[0].message.content or "", reply.usage.prompt_tokens

        # neutral prose repeated to about 700 and about --long prompt tokens
        k0, q0 = picked[0]
        bare = ask(None, k0, q0["q"])[1]
        per = ask((PROSE, ""), k0, q0["q"])[1] - bare

        def prose(tokens: int) -> str:
            return "\n\n".join([PROSE] * max(1, round((tokens - bare) / per)))

        # (system turn, text before the question in the user turn)
        prefixes = {"none": None, "system: Answer briefly.": ("Answer briefly.", ""),
                    "system: json instructions": (instructions, ""),
                    "system: prose ~722": (prose(722), ""),
                    f"system: prose ~{args.long}": (prose(args.long), ""),
                    "user turn: prose ~722": (None, prose(722) + "\n\n"),
                    f"user turn: prose ~{args.long}": (None, prose(args.long) + "\n\n"),
                    # added with the stage-2 prefixes (bench/README.md, "Text in front of the
                    # question"): a short instruction and the format instructions in the user
                    # turn, and the format instructions after the question
                    "user turn: Answer briefly.": (None, "Answer briefly.\n\n"),
                    "user turn: json instructions": (None, instructions + "\n\n"),
                    "user turn: json instructions after": (None, ("", "\n\n" + instructions)),
                    # a short instruction after the question, on its line and on the next
                    "user turn: Answer in one word. after, same line": (None, ("", " Answer in one word.")),
                    "user turn: Answer in one word. after, next line": (None, ("", "\nAnswer in one word.")),
                    "system json + user prose ~722": (instructions, prose(722) + "\n\n")}  # fmt: skip
        if args.only:
            prefixes = {k: v for k, v in prefixes.items() if k in args.only}
        with ThreadPoolExecutor(8) as pool:
            for name, system in prefixes.items():
                row: dict = {}
                for blind in (False, True):
                    jobs = [pool.submit(ask, system, k + blind, q["q"]) for k, q in picked]
                    said = [j.result() for j in jobs]
                    acc = [vqa_accuracy(s, [q["a"]]) for (s, _), (_, q) in zip(said, picked, strict=True)]
                    row["blind" if blind else "vqa"] = round(statistics.mean(acc), 3)
                    if not blind:
                        row["prompt_tokens_median"] = statistics.median(t for _, t in said)
                        row["answers"] = [s for s, _ in said]
                        # answers that run on into the world's JSON, and the figure of what
                        # was said before its first "{"
                        row["run_on"] = sum("{" in s for s, _ in said)
                        row["vqa_before_brace"] = round(statistics.mean(
                            vqa_accuracy(s.split("{")[0], [q["a"]]) for (s, _), (_, q) in zip(said, picked, strict=True)), 3)  # fmt: skip
                out["prefixes"][name] = row
                print(f"{name:36s} prompt tokens {row['prompt_tokens_median']:6.0f}  "
                      f"VQA {row['vqa']:.3f}  blind {row['blind']:.3f}  run on {row['run_on']}"
                      f"  before {{ {row['vqa_before_brace']:.3f}", flush=True)
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["load_after"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
