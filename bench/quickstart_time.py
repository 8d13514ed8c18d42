"""Where `visto quickstart`'s wall clock goes: a training step of each LLaVA stage split into
its parts, and the eval before and after its batching (08ea576), in turns on the same machine
(its load average printed with every figure).

    .venv/bin/python bench/quickstart_time.py --run runs/n0 --out runs/wallclock-0 \\
        --steps 6 --rounds 2 --eval-images 24 --json bench/out/quickstart_time.json
    .venv/bin/python bench/quickstart_time.py --parts stage2 --steps 4 --rounds 3 --json a.json
    .venv/bin/python bench/quickstart_time.py --parts eval --eval-images 200 --eval-split test \\
        --json b.json                       # the quickstart's eval of one split, both ways
    .venv/bin/python bench/quickstart_time.py --parts "" --combine a.json b.json   # the tables

It reads a finished quickstart run (--run: its world, vision/stage1 checkpoints and final
checkpoint; nothing there is written) and times, in turns for --rounds rounds:

training  --steps steps of LLaVA stage 1 (from RUN/vision/checkpoint, mix look+copy) and of
          stage 2 (from RUN/stage1/checkpoint, mix instruct+caption), --rounds times from the
          same checkpoint on the same batches, each step split into: data (reading and
          collating a batch; in a real run a prefetch worker does it beside the step, on the
          same 2 cores), the frozen vision tower, the detector and object tokens, the OCR
          reader (its per-image cache starts empty, as in a fresh stage), the question focus,
          the rest of the embedding, the decoder's forward (the rest of the forward), backward,
          optimizer (clip + AdamW).
eval      the quickstart's eval (`evaluate_generative_world`, its settings: every task, the
          JSON questions again under the grammar, the blind twin) on the first --eval-images
          images of each split (or --eval-split only), two ways in turns:
            before  every question in file order (a JSON question in most batches), every
                    blind question asked (reuse=False): the eval before 08ea576
            after   batched by task (`eval.generative.batch_order`), the blind twin's questions
                    that its shown image was itself asked not asked again (`Answered`)
          per question type (CPU ms per image), by pass (seeing / blind, own answers / under
          the grammar); and whether every answer (own, constrained, blind) is the same both
          ways.

fast      (--parts fast1,fast2 for stage 1, stage 2) a step's forward + backward four ways in
          turns, on --steps batches of the stage, --rounds rounds, from the stage's checkpoint
          with no optimizer step (so every way computes from the same weights):
            dense   the decoder's dense (T, T) mask over every position, the loss's softmax
                    over every position (the code before the packed attention)
            blocks  `PackedLayout`: the attention of the shared prefix and of each exchange
                    only, every other layer on the real tokens only (no padding)
            +loss   blocks, and the loss's softmax on the scored positions only (`_scored`)
            +head   +loss, and LLaVA's LM head and pointer on the scored positions only
                    (`Llava.scored_answer_logits`, what `Llava.forward` runs), not over
                    every position with a copy of the whole logits
          CPU seconds per way, the ratios, and the loss and every gradient against dense
          (max abs difference).

Then the eval's after/before ratio applied to the idle figures of the default quickstart
(--idle-*: measured on this machine near idle) gives the extrapolated end-to-end time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAIN_PARTS = ("data", "tower", "detector + object tokens", "OCR reader", "question focus",
               "decoder forward", "backward", "optimizer")  # fmt: skip


# Parts are timed in this process's CPU seconds: with one torch thread that is the work done,
# which the load of other jobs on a shared 2-core machine moves far less than the wall clock
# (at load 6 a stage-1 step took 8.8 s of wall clock for 1.6 s of CPU).
CLOCK = time.process_time


def load_avg() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def stage_state(run: Path, stage: str, out: Path, cfg: dict[str, Any]) -> Any:
    """The training loop's state for `stage` as the quickstart starts it (no prefetch worker:
    the data time is measured, not hidden)."""
    from visto.train.distributed import init_distributed
    from visto.train.loop import _setup
    from visto.train.recipe import load_recipe

    init = run / ("vision" if stage == "stage1" else "stage1") / "checkpoint"
    overrides = [f"model.init_from={json.dumps(str(init))}", f"data.source={json.dumps(str(run / 'world'))}",
                 f"max_steps={cfg[stage + '_steps']}", f"batch_size={cfg[stage + '_batch']}",
                 f"optim.lr={cfg[stage + '_lr']}", f"seed={cfg['seed']}", "data.prefetch=0"]  # fmt: skip
    if stage == "stage1":
        overrides.append(f"data.mix={json.dumps(cfg['stage1_mix'])}")
    return _setup(load_recipe(f"quickstart-{stage}", overrides), out, False, None, init_distributed())


class Timers:
    """Seconds per named part, from methods wrapped on the model's instances."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, method: str, part: str) -> None:
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = CLOCK()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] += CLOCK() - t

        setattr(obj, method, timed)


def time_training(run: Path, stage: str, out: Path, cfg: dict[str, Any], batches: list[dict]) -> dict[str, Any]:
    """Training steps on `batches` from the stage's checkpoint: per-part CPU seconds per step."""
    import torch

    state = stage_state(run, stage, out, cfg)
    model, optimizer = state.model, state.optimizer
    state.stream.close()
    timers = Timers()
    connector = model.multi_modal_projector
    timers.wrap(model, "patch_features", "tower")
    timers.wrap(connector, "objects", "detector + object tokens")
    timers.wrap(connector, "read_words", "OCR reader")
    timers.wrap(connector.focus, "with_copies", "question focus")
    timers.wrap(model, "embed_with_copies", "_embed")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_step = []
    for b in batches:
        timers.seconds.clear()
        w0 = time.perf_counter()
        t0 = CLOCK()
        out_ = model(b)
        t1 = CLOCK()
        out_["loss"].backward()
        t2 = CLOCK()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = CLOCK()
        s = dict(timers.seconds)
        row = {k: s.get(k, 0.0) for k in TRAIN_PARTS[1:5]}
        # the rest of the embedding: token embeddings, the splice of the visual tokens
        row["splice + embeddings"] = s.get("_embed", 0.0) - sum(s.get(k, 0.0) for k in TRAIN_PARTS[1:5])
        row["decoder forward"] = (t1 - t0) - s.get("_embed", 0.0)
        row["backward"], row["optimizer"] = t2 - t1, t3 - t2
        row["wall"] = time.perf_counter() - w0  # the step's wall clock (other jobs' load in it)
        per_step.append(row)
    return {"seconds": {k: statistics.mean(r[k] for r in per_step) for k in per_step[0]}, "load": load_avg()}


def run_training(args: argparse.Namespace, cfg: dict[str, Any], report: dict[str, Any], stages: list[str]) -> None:
    for stage in stages:
        state = stage_state(args.run, stage, args.out / f"{stage}-data", cfg)
        batches, data_s = [], []
        for _ in range(args.steps):
            t = CLOCK()
            batches.append(next(state.stream))
            data_s.append(CLOCK() - t)
        state.stream.close()
        shape = tuple(batches[0]["input_ids"].shape)
        real = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
        answers = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)
        rounds = []
        for r in range(args.rounds):
            rounds.append(time_training(args.run, stage, args.out / stage, cfg, batches))
            print(f"{stage} round {r}: {sum(v for k, v in rounds[-1]['seconds'].items() if k != 'wall'):.2f} "
                  f"CPU s/step (load {rounds[-1]['load']})", flush=True)  # fmt: skip
        table = {"data": statistics.median(data_s[1:] or data_s)}
        table.update({k: statistics.median(x["seconds"][k] for x in rounds) for k in rounds[0]["seconds"]})
        report["training"][stage] = {"batch": shape, "real_token_share": round(real, 3),
                                     "answer_tokens_per_batch": answers, "per_step_s": table,
                                     "loads": [x["load"] for x in rounds]}  # fmt: skip
        step = sum(x for k, x in table.items() if k not in ("data", "wall"))
        print(f"\n{stage}: batch {shape} ({real:.0%} of the tokens real, {answers:.0f} answer tokens a batch), "
              f"CPU seconds per step (median of {args.rounds} rounds of {args.steps} steps; data: median of "
              f"{len(data_s)} batches read inline)")  # fmt: skip
        for k, v in table.items():
            share = "" if k in ("data", "wall") else f"{v / step:>8.1%}"
            print(f"{k:<26}{v:>10.3f}{share}")
        print(f"{'step (without data)':<26}{step:>10.3f}")
        print("(CPU seconds of this one-thread process, which other jobs' load moves less than the "
              "wall clock; wall: the step's wall clock)\n")


def _dense_answer_loss(logits: Any, labels: Any) -> dict[str, Any]:
    """`visto.losses.answer_loss` before the scored-rows change: the softmax and the argmax
    over every position (the reference of the fast part)."""
    import torch
    import torch.nn.functional as F

    V = logits.shape[-1]
    shifted = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), shifted, ignore_index=-100, reduction="sum")
    loss = total / (shifted != -100).sum().clamp(min=1)
    with torch.no_grad():
        target = labels[:, 1:]
        scored = target != -100
        token_acc = ((logits[:, :-1].argmax(dim=-1) == target) & scored).sum() / scored.sum().clamp(min=1)
    return {"loss": loss, "token_acc": token_acc}


# dense: the (T, T) mask; blocks: packed attention; +loss: the loss on the scored rows only;
# +head: LLaVA's LM head and pointer on the scored rows only (`Llava.scored_answer_logits`)
FAST_WAYS = ("dense", "blocks", "+loss", "+head")


def run_fast(args: argparse.Namespace, cfg: dict[str, Any], report: dict[str, Any], stages: list[str]) -> None:
    """The decoder's packed attention and the scored-rows loss against the dense reference,
    in turns, on the same batches and weights (see the module docstring: fast)."""
    import visto.models.llava as llava_module

    real_loss = llava_module.answer_loss
    for stage in stages:
        state = stage_state(args.run, stage, args.out / f"{stage}-fast", cfg)
        batches = [next(state.stream) for _ in range(args.steps)]
        state.stream.close()
        model = state.model
        params = [p for p in model.parameters() if p.requires_grad]
        seconds: dict[str, list[float]] = {w: [] for w in FAST_WAYS}
        kernel: dict[str, list[float]] = {w: [] for w in FAST_WAYS}  # of seconds: the system's
        diffs: dict[str, dict[str, float]] = {w: {"loss": 0.0, "grad": 0.0} for w in FAST_WAYS}
        grad_scale = 0.0
        try:
            for r in range(args.rounds):
                for i, b in enumerate(batches):
                    k = (r * len(batches) + i) % len(FAST_WAYS)
                    results = {}
                    for way in FAST_WAYS[k:] + FAST_WAYS[:k]:  # each way first as often
                        model.language_model.fast_packing = way != "dense"
                        llava_module.answer_loss = real_loss if way in ("+loss", "+head") else _dense_answer_loss
                        for p in params:
                            p.grad = None
                        t, k0 = CLOCK(), os.times().system
                        if way == "+head" or not hasattr(model, "answer_logits"):
                            loss = model(b)["loss"]
                        else:  # the LM head over every position, as before `scored_answer_logits`
                            loss = llava_module.answer_loss(model.answer_logits(b), b["labels"])["loss"]
                        loss.backward()
                        seconds[way].append(CLOCK() - t)
                        kernel[way].append(os.times().system - k0)
                        results[way] = (float(loss.detach()), [p.grad for p in params])
                    ref_loss, ref_grads = results["dense"]
                    grad_scale = max([grad_scale] + [float(g.abs().max()) for g in ref_grads if g is not None])
                    for way, (loss_w, grads) in results.items():
                        d = diffs[way]
                        d["loss"] = max(d["loss"], abs(loss_w - ref_loss))
                        for g, g_ref in zip(grads, ref_grads, strict=True):
                            if (g is None) != (g_ref is None):
                                raise AssertionError(f"{way}: a gradient is missing where dense has one")
                            if g is not None:
                                d["grad"] = max(d["grad"], float((g - g_ref).abs().max()))
        finally:
            llava_module.answer_loss = real_loss
            model.language_model.fast_packing = True
        med = {w: statistics.median(v) for w, v in seconds.items()}
        sys_med = {w: statistics.median(v) for w, v in kernel.items()}
        shape = tuple(batches[0]["input_ids"].shape)
        print(f"\n{stage} fast: batch {shape}, forward + backward, CPU s (median of {args.rounds} rounds x "
              f"{args.steps} batches, ways in turns; load {load_avg()}); max |grad| of dense {grad_scale:.3g}")  # fmt: skip
        print(f"{'way':<10}{'CPU s':>10}{'of it sys':>10}{'x dense':>10}{'x previous':>12}{'max |loss diff|':>18}"
              f"{'max |grad diff|':>18}")  # fmt: skip
        previous = None
        for w in FAST_WAYS:
            step = f"{med[w] / med[previous]:>12.3f}" if previous else f"{'':>12}"
            print(f"{w:<10}{med[w]:>10.3f}{sys_med[w]:>10.3f}{med[w] / med['dense']:>10.3f}{step}"
                  f"{diffs[w]['loss']:>18.2e}{diffs[w]['grad']:>18.2e}")  # fmt: skip
            previous = w
        report.setdefault("fast", {})[stage] = {"batch": shape, "cpu_s": med, "sys_s": sys_med,
                                                "diffs": diffs, "grad_scale": grad_scale,
                                                "load": load_avg(), "samples": {w: len(v) for w, v in seconds.items()}}  # fmt: skip


def eval_run(args: argparse.Namespace, cfg: dict[str, Any], variant: str) -> dict[str, Any]:
    """The quickstart's eval on the first --eval-images images, one way, timed per call."""
    import torch

    import visto.eval.generative as G
    from visto.checkpoint import load
    from visto.data.synth import iter_samples
    from visto.tasks.runner import make_constrained_generate, make_generate

    real_order = G.batch_order
    if variant == "before":  # every question in file order, as one group
        G.batch_order = lambda items: [list(range(len(items)))]
    model = load(args.run / "checkpoint").eval()
    generate = make_generate(model, cfg["loc_bins"], False, json_max_new_tokens=cfg["json_max_tokens"])
    constrained = (make_constrained_generate(model, cfg["loc_bins"], json_max_new_tokens=cfg["json_max_tokens"])
                   if cfg["constrain_json"] else None)  # fmt: skip
    phase = {"split": "?", "blind": False}
    calls: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        if msg.startswith("asking"):
            phase["blind"] = "hidden" in msg

    def timed(fn: Callable, what: str) -> Callable:
        def ask(samples: list) -> list[str]:
            t = CLOCK()
            answers = fn(samples)
            kinds = [f"{s.truth['task']}" + (f".{s.truth['qtype']}" if s.truth.get("qtype") else "")
                     for s in samples]  # fmt: skip
            calls.append({"seconds": CLOCK() - t, "kinds": kinds, "what": what, **phase})
            return answers

        return ask

    splits = [args.eval_split] if args.eval_split else ["test", "heldout"]
    tasks = ["vqa", "ground", "refdesc", "ocr", "json", "classify"]  # the quickstart's (run_eval)
    predictions, images = [], 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for split in splits:  # as evaluate_generative_world runs each split
                phase["split"] = split
                samples = list(iter_samples(args.run / "world", split, tasks=tasks, seed=cfg["seed"],
                                            limit=args.eval_images))  # fmt: skip
                images += len({G.image_key(s) for s in samples})
                _, records = G.evaluate_generative(
                    timed(generate, "own"), samples, prefix="heldout." if split == "heldout" else "",
                    batch_size=cfg["eval_batch"], log=log, seed=cfg["seed"],
                    blind=G.swap_or_blank(samples, "swap"), reuse=variant != "before",
                    constrained_generate=timed(constrained, "constrained") if constrained else None,
                )  # fmt: skip
                predictions += records
    finally:
        G.batch_order = real_order
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "calls": calls, "predictions": predictions, "load": load_avg(),
            "images": images}  # fmt: skip


def eval_table(run_: dict[str, Any]) -> dict[str, Any]:
    """Seconds by question type (a call's seconds shared by its rows), by pass, in all."""
    by_kind: dict[str, float] = defaultdict(float)
    by_pass: dict[str, float] = defaultdict(float)
    for c in run_["calls"]:
        share = c["seconds"] / len(c["kinds"])
        for kind in c["kinds"]:
            key = kind + (" (constrained)" if c["what"] == "constrained" else "")
            by_kind[key] += share
        by_pass[("blind " if c["blind"] else "seeing ") + c["what"]] += c["seconds"]
    generate_s = sum(c["seconds"] for c in run_["calls"])
    return {"by_kind": dict(by_kind), "by_pass": dict(by_pass), "generate_s": generate_s,
            "other_s": run_["cpu_s"] - generate_s, "wall_s": run_["wall_s"], "cpu_s": run_["cpu_s"]}  # fmt: skip


ANSWER_FIELDS = ("prediction", "constrained_prediction", "blind_prediction")


def run_eval_parts(args: argparse.Namespace, cfg: dict[str, Any], report: dict[str, Any]) -> None:
    """The eval one way or both (--eval-variants), in turns; each run's table and answers into
    `report["eval_runs"]` (several reports' runs are read together by --combine)."""
    runs = report.setdefault("eval_runs", {})
    variants = args.eval_variants.split(",")
    for r in range(args.eval_rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            run_ = eval_run(args, cfg, variant)
            print(f"eval round {r} {variant}: {run_['wall_s']:.1f} s, CPU {run_['cpu_s']:.1f} s "
                  f"(load {run_['load']})", flush=True)  # fmt: skip
            answers = [[p.get(f) for f in ANSWER_FIELDS] for p in run_["predictions"]]
            runs.setdefault(variant, []).append({
                **eval_table(run_), "images": run_["images"], "load": run_["load"], "answers": answers,
                "split": args.eval_split or "test + held-out", "eval_images": args.eval_images,
            })  # fmt: skip


def print_eval(report: dict[str, Any]) -> None:
    """One eval table per set of questions (split, images) measured both ways; the medians of
    its CPU seconds per way into `report["eval"]` (summed over the sets by `extrapolate`)."""
    sets: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for variant, runs in report.get("eval_runs", {}).items():
        for run_ in runs:
            sets[(run_["split"], run_["eval_images"])][variant].append(run_)
    report["eval"] = {}
    for (split, n), runs in sets.items():
        if not {"before", "after"} <= set(runs):
            print(f"eval ({split}, {n} images): runs {sorted(runs)} only; a table needs before and after")
            continue
        report["eval"][f"{split}/{n}"] = print_eval_set(runs)


def print_eval_set(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The table of one set of questions from its runs (medians), and whether the answers of
    every run, either way, are those of the first run before."""
    reference = runs["before"][0]["answers"]
    differ = {v: [sum(a != b for a, b in zip(x["answers"], reference, strict=True)) for x in runs[v]]
              for v in runs}  # fmt: skip
    images = runs["before"][0]["images"]

    def med(v: str, get: Callable[[dict], float]) -> float:
        return statistics.median(get(t) for t in runs[v])

    columns = [v for v in ("before", "after") if v in runs]
    head = "".join(f"{v:>14}" for v in columns)
    kinds = sorted({k for v in runs for t in runs[v] for k in t["by_kind"]})
    passes = sorted({k for v in runs for t in runs[v] for k in t["by_pass"]})
    print(f"\neval: {len(reference)} questions on {images} images ({runs['before'][0]['split']}), median of "
          f"{len(runs['before'])} / {len(runs['after'])} run(s) before / after; questions whose answers "
          f"(own, constrained, blind) differ from the first run before: {differ}")  # fmt: skip
    print(f"{'question type: CPU ms per image':<40}{head}   (before: a mixed batch's time shared "
          "equally by its rows)")
    for k in kinds:
        print(f"{k:<40}" + "".join(f"{1000 * med(v, lambda t, k=k: t['by_kind'].get(k, 0.0)) / images:>14.1f}"
                                   for v in columns))  # fmt: skip
    print(f"{'pass: CPU seconds':<40}{head}")
    for k in passes:
        print(f"{k:<40}" + "".join(f"{med(v, lambda t, k=k: t['by_pass'].get(k, 0.0)):>14.1f}" for v in columns))
    for k, label in (("other_s", "reading, scoring (not generating)"), ("cpu_s", "eval in all"),
                     ("wall_s", "eval in all, wall clock")):
        print(f"{label:<40}" + "".join(f"{med(v, lambda t, k=k: t[k]):>14.1f}" for v in columns))
    blind = {v: med(v, lambda t: sum(x for p, x in t["by_pass"].items() if p.startswith("blind")) / t["cpu_s"])
             for v in columns}  # fmt: skip
    print(f"{'blind twin share of the eval':<40}" + "".join(f"{blind[v]:>14.2f}" for v in columns))
    print("loads (1/5/15 min): " + "; ".join(f"{v}: " + ", ".join(t["load"] for t in runs[v]) for v in runs))
    return {"images": images, "questions": len(reference), "answers_differing": differ,
            "cpu_s": {v: statistics.median(t["cpu_s"] for t in runs[v]) for v in runs}, "blind_share": blind}  # fmt: skip


def extrapolate(args: argparse.Namespace, cfg: dict[str, Any], report: dict[str, Any]) -> None:
    """The eval's measured ratio on the idle figures (--idle-*): the default quickstart end to end."""
    rows = [("data + vision tower pretraining", args.idle_vision_min, args.idle_vision_min),
            ("OCR reader", args.idle_reader_min, args.idle_reader_min),
            (f"LLaVA stage 1 ({cfg['stage1_steps']} steps)", cfg["stage1_steps"] * args.idle_stage1_s / 60,
             cfg["stage1_steps"] * args.idle_stage1_s / 60),
            (f"LLaVA stage 2 ({cfg['stage2_steps']} steps)", cfg["stage2_steps"] * args.idle_stage2_s / 60,
             cfg["stage2_steps"] * args.idle_stage2_s / 60)]  # fmt: skip
    if not report.get("eval"):
        return
    ratio = (sum(e["cpu_s"]["after"] for e in report["eval"].values())
             / sum(e["cpu_s"]["before"] for e in report["eval"].values()))  # fmt: skip
    rows.append((f"eval (200 test + 200 held-out, blind twin; x {ratio:.3f})", args.idle_eval_min,
                 args.idle_eval_min * ratio))  # fmt: skip
    print(f"\nextrapolated at idle (the idle figures, the eval's x the after/before ratio of CPU seconds "
          f"measured here over {', '.join(report['eval'])}; load {load_avg()} now)")  # fmt: skip
    print(f"{'part':<52}{'before min':>12}{'after min':>12}")
    for name, b, a in rows:
        print(f"{name:<52}{b:>12.1f}{a:>12.1f}")
    print(f"{'end to end':<52}{sum(r[1] for r in rows):>12.1f}{sum(r[2] for r in rows):>12.1f}")
    report["extrapolated_min"] = [{"part": n, "before": round(b, 2), "after": round(a, 2)} for n, b, a in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/n0"), help="a finished quickstart run (read only)")
    p.add_argument("--out", type=Path, default=Path("runs/wallclock-0"), help="scratch directory (emptied)")
    p.add_argument("--parts", default="train,eval", help="comma-separated: train (= stage1,stage2), stage1, stage2, fast1, fast2, eval")
    p.add_argument("--steps", type=int, default=6, help="training steps per stage and way")
    p.add_argument("--rounds", type=int, default=2, help="training rounds (each way once per round)")
    p.add_argument("--eval-images", type=int, default=24, help="images per split (the quickstart: 200)")
    p.add_argument("--eval-split", default=None, help="test or heldout only (default: test + held-out)")
    p.add_argument("--eval-rounds", type=int, default=1)
    p.add_argument("--eval-variants", default="before,after", help="in turns: before, after or both")
    p.add_argument("--combine", type=Path, nargs="*", default=[],
                   help="--json files of earlier invocations: their runs join this one's tables")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--idle-vision-min", type=float, default=11.6)
    p.add_argument("--idle-reader-min", type=float, default=4.2)
    p.add_argument("--idle-stage1-s", type=float, default=1.6, help="seconds per stage-1 step at idle")
    p.add_argument("--idle-stage2-s", type=float, default=5.0, help="seconds per stage-2 step at idle")
    p.add_argument("--idle-eval-min", type=float, default=15.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.run.resolve() == args.out.resolve() or args.run.resolve() in args.out.resolve().parents:
        p.error("--out must not be inside --run (the run is read only)")
    import torch

    torch.set_num_threads(args.threads)
    cfg = json.loads((args.run / "config.json").read_text())
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    parts = set(args.parts.split(",")) - {""}
    print(f"quickstart_time: {args.run}, {args.threads} thread(s), {os.cpu_count()} cores, load {load_avg()}")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "load_start": load_avg(),
                              "training": {}}  # fmt: skip
    stages = [s for s in ("stage1", "stage2") if s in parts or "train" in parts]
    if stages:
        run_training(args, cfg, report, stages)
    fast = [s for s, part in (("stage1", "fast1"), ("stage2", "fast2")) if part in parts]
    if fast:
        run_fast(args, cfg, report, fast)
    if "eval" in parts:
        run_eval_parts(args, cfg, report)
    # The --json file holds this invocation's runs only; the tables read earlier ones too.
    own = {"training": dict(report["training"]), "eval_runs": {v: list(r) for v, r in report.get("eval_runs", {}).items()}}
    for path in args.combine:  # runs measured by earlier invocations
        earlier = json.loads(path.read_text())
        for stage, table in earlier.get("training", {}).items():
            report["training"].setdefault(stage, table)
        for variant, runs in earlier.get("eval_runs", {}).items():
            report.setdefault("eval_runs", {}).setdefault(variant, []).extend(runs)
    print_eval(report)
    extrapolate(args, cfg, report)
    report["load_end"] = load_avg()
    print(f"load average at the end: {report['load_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report, **own, "combined": [str(p) for p in args.combine]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
