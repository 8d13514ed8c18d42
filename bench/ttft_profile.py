"""Where visto's time to first token goes: torch.profiler over LLaVA's prefill, split by stage.

    .venv/bin/python bench/ttft_profile.py --threads 1                     # generate_vs_hf's LLaVA
    .venv/bin/python bench/ttft_profile.py --threads 1 --model runs/r3/checkpoint
    .venv/bin/python bench/ttft_profile.py --threads 1 --compile --json bench/out/ttft.json

A timed call is what generate_vs_hf.py times as TTFT: chat messages and a PIL image in, one
generated token out (`Llava.prompt_batch`, then the engine with max_new_tokens=1). Stages are
marked by forward hooks on the model's vision tower and projector and a wrapper around the
engine's decoder pass; each mark takes the process CPU time (steadier than wall time on a
shared machine) and opens a torch.profiler record_function range:

    preprocess       prompt_batch: image resize + normalise, chat template, tokenizer, collate
    vision tower     ViT up to the feature layer
    projector        visual tokens for the decoder
    kv cache allocation  the engine's KV cache for the prompt and every new token, once
    decoder prefill  the decoder's layers over the whole prompt (engine fast path)
    rest             embedding + splice, masks, logits, first token, Python

Each stage's figure is its median CPU milliseconds per call over --calls calls (after a
warm-up); then 3 calls run under torch.profiler for the top operators (its times are wall
clock, so a loaded machine inflates them). The call's arithmetic is counted once by
torch.utils.flop_counter (matmuls, convolutions, attention) and set against a 1024^2 fp32
GEMM timed right then: `fraction_of_gemm_rate` = (GFLOP / GEMM rate) / CPU time of the call,
how close the call comes to doing nothing but its arithmetic at the machine's matmul speed. Without --model the model is
generate_vs_hf.py's (its --preset, random weights, 96 px test image); --model profiles a
checkpoint (any LLaVA, e.g. the quickstart's) on a 128 px picture of coloured shapes.

--compile also measures torch.compile on the vision tower (its shapes are fixed per batch
size, the one part that compiles without recompiling for every prompt length): the tower's
feature path as modules, compiled (inductor), against visto's eager inference path (the
patch embedding as one matmul, fused blocks); compile time of the first call at each batch
size, median CPU ms per call of each in turns; `pays_after_calls` = compile seconds /
seconds saved per call (null: never). The same for the engine's decoder pass at prefill
(dynamic=True: one graph for every prompt length), on the same input embeddings, and at
decode (one token per row, 31 steps after an eager prefill: CPU ms per step,
`pays_after_steps`). --inductor picks inductor's settings (cpp_wrapper, freezing,
max_autotune), --parts which of the three to compile:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) .venv/bin/python bench/ttft_profile.py --threads 1 \
        --calls 3 --compile --inductor cpp_wrapper freezing max_autotune --parts vision

--against SRC puts this tree's engine runner (`visto.infer.runner`) beside the one in another
source tree (e.g. `git archive REV src | tar -x -C /tmp/before`, then `--against
/tmp/before/src`), both on the same model: the decoder prefill (`DecoderRunner.prefill` on the
prompt's embeddings, computed once) and 8 decode steps after it, the two runners in turns call
by call (--against-calls each), CPU ms p10 and median, with the greedy tokens of 32 steps
checked equal. Steadier than two processes on a shared machine: both see the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_vs_hf import QUESTIONS, build_llava, load_average  # noqa: E402

STAGES = ("preprocess", "vision tower", "projector", "kv cache allocation", "decoder prefill")
aten = torch.ops.aten
try:  # torch 2.13's flop counter knows the CUDA attention kernels, not the CPU one SDPA runs

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

except RuntimeError:  # registered already (a newer torch, or bench/train_mfu.py imported)
    pass


def gemm_peak_gflops(n: int = 1024) -> float:
    """The machine's fp32 matmul rate now: best of 3 n x n GEMMs, process CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - start)
    return 2 * n**3 / best / 1e9


def counted_gflop(call, modules: dict[str, torch.nn.Module] | None = None
                  ) -> tuple[float, dict[str, float]]:  # fmt: skip
    """GFLOP of one call, in all and inside each of `modules` (stage name -> module; the
    counter names a module called on its own by its class). The decoder's runner calls no
    modules: its GFLOP are the rest."""
    with FlopCounterMode(display=False) as counter:
        call()
    by_module = counter.get_flop_counts()
    parts = {stage: sum(by_module.get(type(module).__name__, {}).values()) / 1e9
             for stage, module in (modules or {}).items()}  # fmt: skip
    return counter.get_total_flops() / 1e9, parts


def shapes_image(size: int):
    """A picture of coloured shapes on grey, like the synthetic world's."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    s = size // 8
    for i, colour in enumerate([(220, 40, 40), (40, 180, 60), (40, 60, 220), (230, 200, 30)]):
        x, y = (i % 2) * size // 2 + s, (i // 2) * size // 2 + s
        (draw.ellipse if i % 2 else draw.rectangle)((x, y, x + 2 * s, y + 2 * s), fill=colour)
    return image


def load_model(args) -> SimpleNamespace:
    from visto.infer import Engine

    if args.model is None:
        pair = build_llava(SimpleNamespace(vocab=1024, preset=args.preset, seed=0))
        return SimpleNamespace(model=pair["model"], engine=pair["engine"], image=pair["image"])
    import visto

    model = visto.load(args.model, device="cpu").eval()
    image = shapes_image(model.config.vision.image_size)
    return SimpleNamespace(
        model=model, engine=Engine(model, model.processor.tokenizer), image=image
    )


class Stages:
    """CPU seconds per stage of the current call, and a record_function range around each
    (what torch.profiler's table shows)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self._open: list = []

    def enter(self, name: str) -> None:
        self._open.append((name, time.process_time(), record_function(name).__enter__()))

    def exit(self) -> None:
        name, start, rf = self._open.pop()
        rf.__exit__(None, None, None)
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - start


def ttft_call(m: SimpleNamespace, batch_size: int, stages: Stages):
    from visto.data.sample import Sample, Turn
    from visto.infer import SamplingParams

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch_size)]
    samples = [Sample("q", [m.image], [Turn("user", "<image>\n" + q)]) for q in questions]
    params = SamplingParams(max_new_tokens=1)

    def call():
        stages.cpu = {}
        stages.enter("total")
        stages.enter("preprocess")
        batch = m.model.prompt_batch(samples)
        stages.exit()
        m.engine.generate_batch(batch, params)
        stages.exit()
        return dict(stages.cpu)

    return call


def marked(m: SimpleNamespace) -> Stages:
    """Stage marks around the vision tower, the projector and the decoder pass."""
    stages = Stages()
    for module, name in ((m.model.vision_tower, "vision tower"),
                         (m.model.multi_modal_projector, "projector")):  # fmt: skip
        module.register_forward_pre_hook(lambda *_, name=name: stages.enter(name))
        module.register_forward_hook(lambda *_: stages.exit())
    runner = m.engine.runner
    forward = runner._forward

    def decoder_pass(*args, **kwargs):
        stages.enter("decoder prefill" if args[0].shape[1] > 1 else "decoder step")
        try:
            return forward(*args, **kwargs)
        finally:
            stages.exit()

    runner._forward = decoder_pass
    from visto.infer import runner as runner_module

    allocate = runner_module.RunnerState.allocate

    def timed_allocate(*args, **kwargs):
        stages.enter("kv cache allocation")
        try:
            return allocate(*args, **kwargs)
        finally:
            stages.exit()

    runner_module.RunnerState.allocate = timed_allocate  # this process only: a bench
    return stages


def profile_split(m: SimpleNamespace, stages: Stages, batch_size: int, calls: int) -> dict:
    """Median CPU ms per stage over `calls` calls, then one call under torch.profiler."""
    call = ttft_call(m, batch_size, stages)
    for _ in range(3):
        call()
    per_call: dict[str, list[float]] = {name: [] for name in (*STAGES, "rest", "total")}
    for _ in range(calls):
        cpu = call()
        for name in STAGES:
            per_call[name].append(cpu.get(name, 0.0) * 1e3)
        per_call["total"].append(cpu["total"] * 1e3)
        per_call["rest"].append(per_call["total"][-1] - sum(per_call[s][-1] for s in STAGES))
    med = {name: statistics.median(v) for name, v in per_call.items()}
    stage_modules = {"vision tower": m.model.vision_tower, "projector": m.model.multi_modal_projector}
    (gflop, parts), peak = counted_gflop(call, stage_modules), gemm_peak_gflops()
    floor_ms = gflop / peak * 1e3
    print(f"\nbatch {batch_size}: median CPU ms per call over {calls} calls")
    for name in (*STAGES, "rest", "total"):
        print(f"  {name:<20} {med[name]:8.2f}  {100 * med[name] / med['total']:5.1f}%")
    print(f"  {gflop:.3f} GFLOP per call (matmuls, convolutions, attention); at this moment's "
          f"GEMM rate ({peak:.0f} GFLOP/s, 1024^2) that is {floor_ms:.2f} ms: the call runs "
          f"at {100 * floor_ms / med['total']:.0f}% of it")  # fmt: skip
    parts["decoder and the rest"] = gflop - sum(parts.values())
    print("  GFLOP by stage (ms at that GEMM rate): " + ", ".join(
        f"{k} {v:.3f} ({v / peak * 1e3:.2f})" for k, v in parts.items()))  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            call()
    events = [e for e in prof.key_averages() if e.key not in (*STAGES, "total")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("  torch.profiler, top operators (self ms per call, wall clock):")
    top = {}
    for e in events[:10]:
        top[e.key] = round(e.self_cpu_time_total / 3e3, 3)
        print(f"    {e.key:<52} {e.self_cpu_time_total / 3e3:7.2f}  x{e.count // 3}")
    return {"stages": {name: round(v, 3) for name, v in med.items()}, "top_ops_ms": top,
            "gflop": round(gflop, 4), "gemm_gflops": round(peak, 1),
            "gflop_by_stage": {k: round(v, 4) for k, v in parts.items()},
            "fraction_of_gemm_rate": round(floor_ms / med["total"], 3)}  # fmt: skip


def measure_compile(m: SimpleNamespace, batches: list[int], repeats: int,
                    mode: str | None = None) -> dict:  # fmt: skip
    """torch.compile of the vision tower's feature path (its modules, what dynamo traces)
    against visto's eager inference path (`ViT.forward` at inference: the patch embedding as
    one matmul, the fused blocks): compile seconds of the first call per batch size, CPU ms
    per call of each, in turns."""
    tower = m.model.vision_tower
    feature_layer = m.model.config.vision_feature_layer
    n_layers = feature_layer % (tower.config.layers + 1)

    def features(pixels):
        x = tower.pre_layrnorm(tower.embeddings(pixels))
        for block in tower.encoder.layers[:n_layers]:
            x = block(x)
        return x[:, tower.num_prefix :]

    compiled = torch.compile(features, mode=mode)
    out = {}
    for B in batches:
        # Rows differ (the image's values shifted per row): the eager path runs an image
        # repeated in a batch once (distinct_images), the compiled module path every row.
        pixels = m.model.processor.pixel_values([m.image] * B)[0]
        pixels = pixels + 0.01 * torch.arange(B, dtype=pixels.dtype)[:, None, None, None]
        with torch.inference_mode():
            # .forward: without the stage marks' hooks
            eager = lambda pixels=pixels: tower.forward(  # noqa: E731
                pixels, feature_layer=feature_layer, pooled=False
            ).features
            start = time.perf_counter()
            compiled(pixels)
            compile_s = time.perf_counter() - start
            diff = float((eager() - compiled(pixels)).abs().max())
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for _ in range(repeats):
                runs = (("eager", eager), ("compiled", lambda pixels=pixels: compiled(pixels)))
                for name, fn in runs:
                    start_cpu = time.process_time()
                    for _ in range(5):
                        fn()
                    times[name].append((time.process_time() - start_cpu) / 5 * 1e3)
        eager_ms, comp_ms = (statistics.median(times[k]) for k in ("eager", "compiled"))
        saved = (eager_ms - comp_ms) / 1e3
        out[str(B)] = {
            "compile_s": round(compile_s, 2), "eager_ms": round(eager_ms, 3),
            "compiled_ms": round(comp_ms, 3), "max_abs_diff": diff,
            "pays_after_calls": round(compile_s / saved) if saved > 0 else None,
        }  # fmt: skip
        print(f"\ncompile, vision tower at batch {B}: first call {compile_s:.1f} s; eager "
              f"{eager_ms:.2f} ms, compiled {comp_ms:.2f} ms per call (CPU, median of {repeats}); "
              f"pays after {out[str(B)]['pays_after_calls']} calls")  # fmt: skip
    return out


def measure_compile_decoder(m: SimpleNamespace, batches: list[int], repeats: int,
                            mode: str | None = None) -> dict:  # fmt: skip
    """torch.compile (dynamic shapes: prompt lengths vary) of the engine's decoder pass, the
    prefill's largest stage: compile seconds of the first prefill per batch size, then the
    decoder prefill's CPU ms eager vs compiled, in turns, on the same input embeddings."""
    from visto.data.sample import Sample, Turn

    runner = m.engine.runner
    marked_forward = runner._forward
    eager_forward = type(runner)._forward.__get__(runner)  # without the stage marks
    compiled_forward = torch.compile(eager_forward, dynamic=True, mode=mode)
    out = {}
    for B in batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(B)]
        batch = m.model.prompt_batch(
            [Sample("q", [m.image], [Turn("user", "<image>\n" + q)]) for q in questions]
        )
        inputs = m.model.prefill_inputs(batch)
        runner_inputs, runner.inputs = runner.inputs, lambda _batch, inputs=inputs: inputs
        try:
            runner._forward = eager_forward
            reference = runner.prefill(batch, room=1)[0]
            runner._forward = compiled_forward
            start = time.perf_counter()
            diff = float((runner.prefill(batch, room=1)[0] - reference).abs().max())
            compile_s = time.perf_counter() - start
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for _ in range(repeats):
                for name, forward in (("eager", eager_forward), ("compiled", compiled_forward)):
                    runner._forward = forward
                    start_cpu = time.process_time()
                    for _ in range(5):
                        runner.prefill(batch, room=1)
                    times[name].append((time.process_time() - start_cpu) / 5 * 1e3)
        finally:
            runner._forward, runner.inputs = marked_forward, runner_inputs
        eager_ms, comp_ms = (statistics.median(times[k]) for k in ("eager", "compiled"))
        saved = (eager_ms - comp_ms) / 1e3
        out[str(B)] = {
            "compile_s": round(compile_s, 2), "eager_ms": round(eager_ms, 3),
            "compiled_ms": round(comp_ms, 3), "max_abs_diff_logits": diff,
            "pays_after_calls": round(compile_s / saved) if saved > 0 else None,
        }  # fmt: skip
        print(f"\ncompile, decoder prefill at batch {B}: first call {compile_s:.1f} s; eager "
              f"{eager_ms:.2f} ms, compiled {comp_ms:.2f} ms per call (CPU, median of {repeats}); "
              f"pays after {out[str(B)]['pays_after_calls']} calls")  # fmt: skip
    return out


def measure_compile_decode(m: SimpleNamespace, batches: list[int], repeats: int,
                           steps: int = 31, mode: str | None = None) -> dict:  # fmt: skip
    """torch.compile (dynamic shapes: the window grows by a column per step) of the engine's
    decoder pass at decode, one token per row: compile seconds of the first `steps` steps
    after a prefill, then CPU ms per decode step eager vs compiled, in turns (prefill eager)."""
    from visto.data.sample import Sample, Turn

    runner = m.engine.runner
    marked_forward = runner._forward
    eager_forward = type(runner)._forward.__get__(runner)  # without the stage marks
    compiled = torch.compile(eager_forward, dynamic=True, mode=mode)

    def at_decode(x, *args, **kwargs):  # the prefill stays eager
        return (compiled if x.shape[1] == 1 else eager_forward)(x, *args, **kwargs)

    out = {}
    for B in batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(B)]
        batch = m.model.prompt_batch(
            [Sample("q", [m.image], [Turn("user", "<image>\n" + q)]) for q in questions]
        )

        def decode(batch=batch) -> tuple[float, list]:
            logits, state = runner.prefill(batch, room=steps)
            ids = logits.argmax(-1)
            tokens, start = [ids.tolist()], time.process_time()
            for _ in range(steps):
                logits, state = runner.decode_step(ids, state)
                ids = logits.argmax(-1)
                tokens.append(ids.tolist())
            return (time.process_time() - start) / steps * 1e3, tokens

        try:
            runner._forward = eager_forward
            reference = decode()[1]
            runner._forward = at_decode
            start = time.perf_counter()
            same = decode()[1] == reference
            compile_s = time.perf_counter() - start
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for _ in range(repeats):
                for name, forward in (("eager", eager_forward), ("compiled", at_decode)):
                    runner._forward = forward
                    times[name].append(decode()[0])
        finally:
            runner._forward = marked_forward
        eager_ms, comp_ms = (statistics.median(times[k]) for k in ("eager", "compiled"))
        saved = (eager_ms - comp_ms) / 1e3
        out[str(B)] = {
            "compile_s": round(compile_s, 2), "eager_ms_per_step": round(eager_ms, 3),
            "compiled_ms_per_step": round(comp_ms, 3), "same_tokens": same,
            "pays_after_steps": round(compile_s / saved) if saved > 0 else None,
        }  # fmt: skip
        print(f"\ncompile, decode step at batch {B}: first {steps} steps {compile_s:.1f} s; eager "
              f"{eager_ms:.2f} ms, compiled {comp_ms:.2f} ms per step (CPU, median of {repeats}); "
              f"same tokens {same}; pays after {out[str(B)]['pays_after_steps']} steps")  # fmt: skip
    return out


def measure_against(m: SimpleNamespace, src: str, batches: list[int], calls: int) -> dict:
    """This tree's runner against `src`'s (see --against), call by call."""
    import importlib.util

    from visto.data.sample import Sample, Turn
    from visto.infer import runner as this

    path = Path(src) / "visto" / "infer" / "runner.py"
    spec = importlib.util.spec_from_file_location("against_runner", path)
    other = importlib.util.module_from_spec(spec)
    sys.modules["against_runner"] = other  # dataclasses look their module up
    spec.loader.exec_module(other)
    lm = m.model.language_model
    out = {}
    for B in batches:
        samples = [Sample("q", [m.image], [Turn("user", "<image>\n" + QUESTIONS[i % len(QUESTIONS)])])
                   for i in range(B)]  # fmt: skip
        batch = m.model.prompt_batch(samples)
        with torch.inference_mode():
            inputs = m.model.prefill_inputs(batch)
        runners = {"this": this.DecoderRunner(lm, lambda _b, inputs=inputs: inputs),
                   "against": other.DecoderRunner(lm, lambda _b, inputs=inputs: inputs)}  # fmt: skip

        def generate(runner, steps: int, batch=batch) -> tuple[float, float, list]:
            start = time.process_time()
            logits, state = runner.prefill(batch, room=steps)
            prefill = time.process_time() - start
            ids, tokens = logits.argmax(-1), []
            start = time.process_time()
            for _ in range(steps):
                logits, state = runner.decode_step(ids, state)
                ids = logits.argmax(-1)
                tokens.append(ids.tolist())
            return prefill, (time.process_time() - start) / max(steps, 1), tokens

        same = generate(runners["this"], 32)[2] == generate(runners["against"], 32)[2]
        times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "step": []} for n in runners}
        for _ in range(calls):
            for name, runner in runners.items():
                prefill, step, _ = generate(runner, 8)
                times[name]["prefill"].append(prefill * 1e3)
                times[name]["step"].append(step * 1e3)
        row = {"same_tokens": same}
        for part in ("prefill", "step"):
            for name in runners:
                v = sorted(times[name][part])
                row[f"{part}_{name}_ms"] = {"p10": round(v[len(v) // 10], 3),
                                            "median": round(statistics.median(v), 3)}  # fmt: skip
            row[f"{part}_ratio"] = round(row[f"{part}_this_ms"]["median"]
                                         / row[f"{part}_against_ms"]["median"], 3)  # fmt: skip
            print(f"batch {B} {part:>7}: this {row[f'{part}_this_ms']['median']:.3f} ms "
                  f"(p10 {row[f'{part}_this_ms']['p10']:.3f}), against "
                  f"{row[f'{part}_against_ms']['median']:.3f} (p10 "
                  f"{row[f'{part}_against_ms']['p10']:.3f}): this / against "
                  f"{row[f'{part}_ratio']:.3f}")  # fmt: skip
        print(f"batch {B}: greedy tokens of 32 steps equal: {same}")
        out[str(B)] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a LLaVA checkpoint (default: the bench's)")
    parser.add_argument("--preset", choices=["tiny", "small"], default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calls", type=int, default=9, help="profiled calls per batch size")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds for --compile")
    parser.add_argument(
        "--inductor", nargs="*", default=[], choices=["cpp_wrapper", "freezing", "max_autotune"],
        help="--compile with these inductor settings: the C++ wrapper (no Python between "
        "kernels), freezing (weights as constants, prepacked), mode max-autotune-no-cudagraphs "
        "(its C++ GEMM template against MKL, per shape)",
    )  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=["vision", "decoder", "decode"],
                        choices=["vision", "decoder", "decode"], help="what --compile measures")  # fmt: skip
    parser.add_argument("--against", default=None, metavar="SRC",
                        help="also time this tree's runner against SRC/visto/infer/runner.py")
    parser.add_argument("--against-calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    m = load_model(args)
    stages = marked(m)
    load_before = load_average()
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model "
          f"{args.model or 'generate_vs_hf LLaVA ' + args.preset}: "
          f"{sum(p.numel() for p in m.model.parameters()) / 1e6:.2f}M params")  # fmt: skip
    result: dict = {"model": args.model or f"generate_vs_hf:{args.preset}", "split_ms": {}}
    for B in args.batches:
        result["split_ms"][str(B)] = profile_split(m, stages, B, args.calls)
    if args.compile:
        # Each measure compiles afresh (a reset: no graphs of the previous one reused), with
        # room for a graph per batch size and call shape (past the default limit of 8 dynamo
        # falls back to eager for that function, which would time a mix).
        from torch._inductor import config as inductor

        torch._dynamo.config.recompile_limit = 64
        inductor.cpp_wrapper = "cpp_wrapper" in args.inductor
        inductor.freezing = "freezing" in args.inductor
        mode = "max-autotune-no-cudagraphs" if "max_autotune" in args.inductor else None
        result["inductor"] = sorted(args.inductor)
        for part, key, measure in (
            ("vision", "compile_vision", measure_compile),
            ("decoder", "compile_decoder", measure_compile_decoder),
            ("decode", "compile_decode_step", measure_compile_decode),
        ):
            if part in args.parts:
                torch._dynamo.reset()
                result[key] = measure(m, args.batches, args.repeats, mode=mode)
    if args.against:
        result["against"] = {"src": args.against, **measure_against(
            m, args.against, args.batches, args.against_calls)}  # fmt: skip
    result["load"] = [load_before, load_average()]
    print(f"uptime: {os.popen('uptime').read().strip()}")
    if args.json:
        from visto.utils.io import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
