"""Time to first token and decode tokens/s of a trained checkpoint, through the engine, as
`visto compare` measures them (one prompt at a time, every answer forced to --tokens tokens).

    .venv/bin/python bench/decode_speed.py --model runs/compare-8min/flamingo/train/checkpoint \
        --data runs/compare-8min/world --repeats 5

Each repeat times --prompts prompts (VQA questions of the first test images); the figures are
the medians over repeats, with the machine's load beside them. `batched_tokens_per_s` is the
same prompts generated as one batch (prefill included), as a server batches them.

Families at the same decoder size, no checkpoint needed (random weights; every answer is
forced to --tokens tokens, so the weights do not change the work):

    .venv/bin/python bench/decode_speed.py --families llava,flamingo,cogvlm --json bench/out/decode.json

builds each family from its `compare-<family>` recipe (the quickstart's sizes: decoder 4 x 256,
8 heads), asks the VQA questions of a small generated world (--data to reuse one), and
alternates the families within each repeat, so a change in machine load hits all alike. Each
family's figure is the median over repeats; `vs_llava` is LLaVA's decode tokens/s over the
family's (1.0 = as fast, 2.0 = half as fast), and `macs_vs_llava` the same ratio of the
matmul work one decoded token costs (its floor where matmuls dominate). `fast_path` says
whether the engine ran the model on its fused runner (`visto.infer.runner`) or through the
model's own decode_step. `batch_decode_tokens_per_s` (and `batch_vs_llava`) is the same
decoding with the first --batch prompts as one left-padded batch (rows x decoded tokens over
the decode seconds; 0 skips it), timed in the same alternation. `decode_cpu_ms_per_token`
(and `cpu_vs_llava`, the family's over LLaVA's) is this process's CPU time per decoded token,
one prompt at a time (each prompt to --tokens tokens less the same prompt to 1 token): on a
machine shared with other jobs the wall-clock figures follow the load, the CPU ones much less.

    .venv/bin/python bench/decode_speed.py --families llava,flamingo --profile 50

prints, per family, torch.profiler's operator table of 50 decode steps of the engine's fast
path (batch 1, after 20 unprofiled steps) instead of timing: where a step's time goes.
`--step-split` times the fast path's decode step alone (ms, 30 steps after 5, median over
--repeats, families and variants alternated; wall clock and `cpu batch N`, this process's
CPU time), at batch 1 and --batch, and for a conditioned
family also without its decode conditioning (`bare`: Flamingo's gated blocks left out), so
that the difference is what the blocks cost per step.

    git show REV:src/visto/models/flamingo.py > /tmp/flamingo_before.py
    .venv/bin/python bench/decode_speed.py --families llava,flamingo --step-split \
        --against /tmp/flamingo_before.py --repeats 41

`--without-focus` adds, for each family whose recipe has a `question_focus` (Flamingo's), the
same recipe without it as '<family> (no focus)': no <focus> slots, no pointer head, the
resampler on the tower's patches; the difference is what the focus and its pointer add to a
step. Flamingo's tanh gates are set to 0.5 in every model built here (a fresh model's are 0,
closed: its gated blocks would then add exactly zero, as a trained model's do not).

`--against FILE` adds, for each family whose class FILE defines (a family's module from another
tree), that code's model with the same config and weights as '<family> (<stem>)', alternated
with the rest in every mode: before and after timed in one process under the same load.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="a checkpoint (or use --families)")
    p.add_argument("--families", help="comma-separated families built from their compare recipes")
    p.add_argument(
        "--data",
        type=Path,
        help="a synthetic world (its test split); --families generates a small one when left out",
    )
    p.add_argument("--json", type=Path, help="also write the result to this file")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="--families: batch size of the batched run")
    p.add_argument("--profile", type=int, default=0, help="--families: profile N decode steps")
    p.add_argument(
        "--step-split",
        action="store_true",
        help="--families: decode step ms with / without conditioning",
    )
    p.add_argument(
        "--without-focus",
        action="store_true",
        help="--families: also each family whose recipe has a question_focus without it "
        "(no focus, no pointer: '<family> (no focus)'), alternated with the rest",
    )
    p.add_argument(
        "--against",
        type=Path,
        action="append",
        default=[],
        help="--families: a family's module file of another tree, timed beside today's (A/B); "
        "repeat for several",
    )
    args = p.parse_args()
    if (args.model is None) == (args.families is None):
        p.error("pass exactly one of --model and --families")
    if args.model is not None and args.data is None:
        p.error("--model needs --data")
    result = families(args) if args.families else checkpoint(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def checkpoint(args: argparse.Namespace) -> dict:
    import time

    import torch

    import visto
    from visto.compare import latency, probe_prompts
    from visto.infer import SamplingParams
    from visto.tasks.runner import make_engine, prompt_batch

    torch.set_num_threads(args.threads)
    model = visto.load(args.model)
    samples = probe_prompts(args.data, args.prompts, seed=0)[: args.prompts]
    prompts = [dataclasses.replace(s, turns=s.turns[:-1]) for s in samples]
    runs = [latency(model, prompts, args.tokens) for _ in range(args.repeats)]
    engine = make_engine(model)
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    batched = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first is a warm-up
            batch, _ = prompt_batch(model, prompts, engine.device)
            t0 = time.perf_counter()
            engine.generate_batch(batch, params)
            batched.append(len(prompts) * args.tokens / (time.perf_counter() - t0))
    result = {
        "model": str(args.model), "threads": args.threads, "repeats": args.repeats,
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "batched_tokens_per_s": statistics.median(batched[1:]), "batch": len(prompts),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    return result


def shared_tokenizer(world: Path, configs: dict[str, dict], out: Path) -> Path:
    """One tokenizer for every family, as `visto compare` gives them the tower's: trained on the
    world's texts at the recipes' vocabulary size, with the `<focus>` token when a recipe's
    processor asks for focus slots (their decoders are sized for it). Written to `out`."""
    from visto.data.processor import ProcessorConfig
    from visto.data.tokenizer import with_focus_token
    from visto.models.common import tokenizer_from_corpus

    processors = {name: ProcessorConfig(**c.get("processor", {})) for name, c in configs.items()}
    shapes = {(p.vocab_size, p.loc_bins) for p in processors.values()}
    if len(shapes) > 1:
        raise SystemExit(
            f"the compare recipes' processors disagree on (vocab_size, loc_bins): {shapes}"
        )
    tokenizer = tokenizer_from_corpus(world, next(iter(processors.values())))
    if any(p.focus_tokens for p in processors.values()):
        tokenizer = with_focus_token(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    return out


def against(path: Path, models: dict) -> dict:
    """The models of `path`, a family's module file from another tree (`git show
    REV:src/visto/models/flamingo.py > old.py`), loaded as a module of its own against today's
    visto: each family whose class it defines, built from the same config with the same weights
    and tokenizer, under the name '<family> (<file stem>)'. The variants then alternate with
    the others, so before and after meet the same machine load (an A/B in one process)."""
    import importlib.util
    import sys

    if not path.is_file():
        raise SystemExit(f"--against {path}: no such file")
    name = f"decode_speed_against_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    out = {}
    for family, model in models.items():
        cls = getattr(module, type(model).__name__, None)
        if cls is None:
            continue
        other = cls(model.config).eval()
        other.load_state_dict(model.state_dict())
        other.processor = model.processor
        out[f"{family} ({path.stem})"] = other
    if not out:
        raise SystemExit(
            f"--against {path}: defines none of {sorted(type(m).__name__ for m in models.values())}"
        )
    return out


def without_focus(config: dict) -> dict | None:
    """A family's recipe config without its `question_focus` (None if it has none): no <focus>
    slots, no pointer head, the resampler on the tower's patches where it read the focus's
    object tokens. The same decoder and conditioning: what the focus and its pointer add to a
    decoding step is the difference."""
    if config.get("question_focus") is None:
        return None
    plain = copy.deepcopy(config)
    plain["question_focus"] = None
    if plain.get("resampler_input") == "objects":
        plain["resampler_input"] = "patches"
    plain["processor"] = {**plain.get("processor", {}), "focus_tokens": 0}
    return plain


def open_gates(model):
    """Flamingo's tanh gates set to 0.5 (a fresh model's are 0: closed, its gated blocks then
    add exactly zero, which a shortcut for closed gates could skip). A trained model's gates
    are open; the timed work is the same either way today."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("alpha_"):
                p.fill_(0.5)
    return model


def decode_macs(model) -> int:
    """Multiply-adds of the matmuls one decoded token runs (batch 1): the decoder's layers and
    head, and Flamingo's gated blocks less their keys/values of the images (computed at
    prefill). CogVLM's experts compute image positions only, none of a decoded token."""
    from torch import nn

    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        decoder = name.startswith(("language_model.model.layers.", "language_model.lm_head"))
        gated = name.startswith("gated_cross_attn_layers.") and not name.endswith(
            ("cross_attn.k_proj", "cross_attn.v_proj")
        )
        if decoder or gated:
            total += m.in_features * m.out_features
    return total


def families(args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    from visto.compare import latency, probe_prompts
    from visto.data.synth import WorldConfig, generate_world
    from visto.models import build_model
    from visto.tasks.runner import make_engine
    from visto.train.recipe import load_recipe

    torch.set_num_threads(args.threads)
    names = [f.strip() for f in args.families.split(",") if f.strip()]
    tmp = tempfile.TemporaryDirectory()
    world = args.data
    if world is None:
        world = Path(tmp.name) / "world"
        generate_world(WorldConfig(n=max(200, 20 * args.prompts), seed=0), world)
    configs = {name: dict(load_recipe(f"compare-{name}").model.config) for name in names}
    tokenizer_dir = shared_tokenizer(world, configs, Path(tmp.name) / "tokenizer")
    models = {}
    for name, config in configs.items():
        config.pop("vision_init", None)  # random towers (Fuyu has none: no such setting)
        config.update(tokenizer_dir=str(tokenizer_dir), tokenizer_corpus=None)
        models[name] = open_gates(build_model(name, config, seed=0).eval())
        plain = without_focus(config) if args.without_focus else None
        if plain is not None:
            models[f"{name} (no focus)"] = open_gates(build_model(name, plain, seed=0).eval())
    if args.against:
        for path in args.against:
            models.update(against(path, {n: models[n] for n in names}))
    names = list(models)
    samples = probe_prompts(world, args.prompts, seed=0)[: args.prompts]
    prompts = [dataclasses.replace(s, turns=s.turns[:-1]) for s in samples]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    if args.profile:
        for name in names:
            print(f"== {name}: {args.profile} decode steps, batch 1, fast path")
            print(profile_decode(models[name], prompts[0], args.profile))
        tmp.cleanup()
        return {"profiled": names, "steps": args.profile, "load_average": os.getloadavg()}
    if args.step_split:
        split = step_split(models, prompts, [1, args.batch], args.repeats)
        tmp.cleanup()
        return {"step_ms": split, "repeats": args.repeats, "torch": torch.__version__,
                "load_average": os.getloadavg()}  # fmt: skip
    batched: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):  # alternated: load swings hit every family alike
        for name in names:
            runs[name].append(latency(models[name], prompts, args.tokens))
            cpu[name].append(cpu_decode_ms(models[name], prompts, args.tokens))
            if args.batch:
                batched[name].append(batch_decode(models[name], prompts[: args.batch], args.tokens))
    rows = {}
    for name in names:
        decoder = models[name].config.decoder
        rows[name] = {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs[name]),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in runs[name]),
            "decode_cpu_ms_per_token": statistics.median(cpu[name]),
            "fast_path": make_engine(models[name]).runner is not None,
            "decode_macs_per_token": decode_macs(models[name]),
            "decoder": f"{decoder.num_layers} x {decoder.hidden_size}, {decoder.num_heads} heads",
        }
        if args.batch:
            rows[name]["batch_decode_tokens_per_s"] = statistics.median(batched[name])
    if "llava" in rows:
        for row in rows.values():
            row["vs_llava"] = rows["llava"]["decode_tokens_per_s"] / row["decode_tokens_per_s"]
            row["cpu_vs_llava"] = (
                row["decode_cpu_ms_per_token"] / rows["llava"]["decode_cpu_ms_per_token"]
            )
            if args.batch:
                row["batch_vs_llava"] = (
                    rows["llava"]["batch_decode_tokens_per_s"] / row["batch_decode_tokens_per_s"]
                )
            row["macs_vs_llava"] = (
                row["decode_macs_per_token"] / rows["llava"]["decode_macs_per_token"]
            )
    tmp.cleanup()
    return {
        "families": rows, "threads": args.threads, "repeats": args.repeats,
        "prompts": args.prompts, "tokens": args.tokens, "batch": args.batch,
        "torch": torch.__version__, "load_average": os.getloadavg(),
    }  # fmt: skip


def batch_decode(model, prompts: list, tokens: int) -> float:
    """Decode tokens/s of `prompts` generated as one batch through the engine, every answer
    forced to `tokens` tokens (a warm-up generation first)."""
    import torch

    from visto.infer import SamplingParams
    from visto.tasks.runner import make_engine, prompt_batch

    engine = make_engine(model)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    with torch.inference_mode():
        batch, _ = prompt_batch(model, prompts, engine.device)
        engine.generate_batch(batch, params)
        outs = engine.generate_batch(batch, params)
    seconds = max(o.timing.decode_s for o in outs)
    return sum(o.timing.decode_tokens for o in outs) / seconds


def cpu_decode_ms(model, prompts: list, tokens: int) -> float:
    """CPU ms (this process's, `time.process_time`) per decoded token, one prompt at a time
    through the engine: each prompt generated to `tokens` tokens and to 1 token, the difference
    over tokens - 1 (prefill and the first token cancel; a warm-up generation first). CPU time
    is what the other jobs on a shared machine disturb least: a wall-clock second there holds
    a varying share of a core."""
    import time

    import torch

    from visto.infer import SamplingParams
    from visto.tasks.runner import make_engine, prompt_batch

    if tokens < 2:
        raise SystemExit(f"--tokens {tokens}: the CPU figure needs at least 2 tokens")
    engine = make_engine(model)
    full = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    seconds = 0.0
    with torch.inference_mode():
        engine.generate_batch(prompt_batch(model, prompts[:1], engine.device)[0], full)
        for prompt in prompts:
            batch, _ = prompt_batch(model, [prompt], engine.device)
            t0 = time.process_time()
            engine.generate_batch(batch, full)
            t1 = time.process_time()
            engine.generate_batch(batch, one)
            seconds += (t1 - t0) - (time.process_time() - t1)
    return 1000 * seconds / (len(prompts) * (tokens - 1))


def step_split(models: dict, prompts: list, batches: list[int], repeats: int) -> dict:
    """Median ms of one fast-path decode step per family and batch size, wall clock and this
    process's CPU time (`cpu batch N`); `<family> bare`: the same without the model's decode
    conditioning (its per-step layer arguments)."""
    import time

    import torch

    from visto.nn.language import Conditioning
    from visto.tasks.runner import make_engine, prompt_batch

    variants = []
    for name, model in models.items():
        variants.append((name, model, False))
        if getattr(make_engine(model).runner, "decode_conditioning", None) is not None:
            variants.append((f"{name} bare", model, True))
    times: dict[str, dict[int, list[float]]] = {v[0]: {b: [] for b in batches} for v in variants}
    cpu: dict[str, dict[int, list[float]]] = {v[0]: {b: [] for b in batches} for v in variants}
    with torch.inference_mode():
        for _ in range(repeats):
            for b in batches:
                for label, model, bare in variants:
                    runner = make_engine(model).runner
                    assert runner is not None, f"{label} does not run on the fast path"
                    if bare:
                        runner.decode_conditioning = lambda context: Conditioning()
                    batch, _ = prompt_batch(model, prompts[:b], runner.lm.lm_head.weight.device)
                    logits, state = runner.prefill(batch, room=40)
                    ids = logits.argmax(-1)
                    for k in range(35):  # 5 warm-up steps, 30 timed
                        if k == 5:
                            t0, c0 = time.perf_counter(), time.process_time()
                        logits, state = runner.decode_step(ids, state)
                        ids = logits.argmax(-1)
                    times[label][b].append((time.perf_counter() - t0) / 30 * 1000)
                    cpu[label][b].append((time.process_time() - c0) / 30 * 1000)
    return {
        label: {
            **{f"batch {b}": statistics.median(t) for b, t in bs.items()},
            **{f"cpu batch {b}": statistics.median(t) for b, t in cpu[label].items()},
        }
        for label, bs in times.items()
    }


def profile_decode(model, prompt, steps: int) -> str:
    """torch.profiler's table (by self CPU time) of `steps` fast-path decode steps, batch 1."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from visto.tasks.runner import make_engine, prompt_batch

    engine = make_engine(model)
    assert engine.runner is not None, "the model does not run on the engine's fast path"
    with torch.inference_mode():
        batch, _ = prompt_batch(model, [prompt], engine.device)
        logits, state = engine.runner.prefill(batch, room=20 + steps)
        ids = logits.argmax(-1)
        for _ in range(20):  # warm-up
            logits, state = engine.runner.decode_step(ids, state)
            ids = logits.argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                logits, state = engine.runner.decode_step(ids, state)
                ids = logits.argmax(-1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


if __name__ == "__main__":
    main()
