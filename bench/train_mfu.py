"""Training throughput against the machine's limit: model FLOPs utilisation (MFU) of visto's
training steps, and a stage-2 LLaVA step against transformers' on the same config and batch.

    .venv/bin/python bench/train_mfu.py --json bench/out/train_mfu.json          # 1 thread
    .venv/bin/python bench/train_mfu.py --world runs/r3/world --rounds 5 --profile --json F
    .venv/bin/python bench/train_mfu.py --threads 2 --cases llava_stage2 --no-hf

In one run, alternating in rounds so that a load change hits every figure alike:
  peak          an fp32 GEMM (--gemm N: N x N @ N x N), best of 2 per round: GFLOP/s
  llava_stage2  a quickstart stage-2 step: the quickstart's LLaVA (conv-stem ViT 128 px / 16,
                4 x 128; object-token projector; decoder 4 x 256), random weights, vision
                frozen, recipe quickstart-stage2's AdamW and clipping, batch 16 of the
                'instruct+caption' mix (independent turns) of the world
  clip          a clip-synth step (the README's CLIP: conv-stem ViT 128 px, 3 x 128; text
                2 x 128), batch 32 of captions
  dense         a dense vision-pretraining step of the quickstart's vision stage (its ViT +
                dense heads, batch 16)
  hf pair       the quickstart's sizes with what transformers' LLaVA can hold (patch stem, MLP
                projector: 64 visual tokens), visto's step against LlavaForConditionalGeneration's
                (the same weights through export_hf; forward, loss, backward, clip, AdamW step;
                vision frozen on both sides) on the same batch as one causal conversation per
                sample (transformers has no independent-turns mask). The first losses must
                agree (checked), so both sides compute the same thing.

A step's FLOPs are counted once with torch.utils.flop_counter over its forward and backward:
every matmul, convolution and attention the step runs, so for the trained layers 6 * N *
tokens plus attention, for a frozen tower its forward only (2 * N * tokens); padding counts
(the pad share is printed). MFU = FLOPs / (step seconds * peak FLOP/s), per round with that
round's GEMM; figures are medians over --rounds. Seconds are this process's CPU seconds
(time.process_time): on a machine shared with other jobs, wall time also holds their share
(wall figures are in the JSON too); with --threads 1 the two agree on an idle machine. Batches are built before timing (data
prefetched); the time to build one (sample + decode + processor) is printed beside the step.
--profile adds torch.profiler's split of the stage-2 step (matmul, attention, softmax and
loss, optimizer, elementwise, ...).

The JSON (--json FILE): {"peak_gflops", "mfu": {"llava_stage2", "clip", "dense"},
"step_ratio_vs_hf" (transformers step time / visto's: > 1 = ours faster), and the details}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten

# torch 2.13's flop counter knows the CUDA attention kernels, not the CPU one SDPA runs here.
try:

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                out_shape=None, **kwargs) -> int:  # fmt: skip
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

except RuntimeError:  # a newer torch counts them itself
    pass


@dataclass
class Case:
    name: str
    step: Callable[[], Any]  # one training step on the next prefetched batch
    flops: float  # per step
    info: str


def load() -> str:
    return open("/proc/loadavg").read().split(" ")[0] if os.path.exists("/proc/loadavg") else "?"


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def gemm_gflops(n: int) -> tuple[float, float]:
    """(wall, CPU) GFLOP/s of the best of 2 fp32 n x n GEMMs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    runs = [timed(lambda: torch.mm(a, b)) for _ in range(2)]
    return tuple(2 * n**3 / min(r[i] for r in runs) / 1e9 for i in (0, 1))  # type: ignore[return-value]


def counted_flops(forward_backward: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    return float(counter.get_total_flops())


def cycling(items: list) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


def visto_step(model, optimizer, batches: list[dict], grad_clip: float | None) -> Callable[[], Any]:
    from visto.train.loop import train_step

    nxt = cycling(batches)
    return lambda: train_step(model, optimizer, [nxt()], grad_clip, torch.device("cpu"))


def forward_backward(model, batch: dict) -> Callable[[], None]:
    def run() -> None:
        model(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)

    return run


# ----------------------------------------------------------------------------- the cases


def quickstart_processor(world: Path) -> Any:
    from visto.quickstart import QuickstartConfig, build_processor

    return build_processor(QuickstartConfig(), world)


def stage2_samples(world: Path, loc_bins: int, n: int, independent: bool = True) -> list:
    import dataclasses
    import itertools

    from visto.data.synth.mixes import mix_source

    source = mix_source("instruct+caption", world, {"train": "train"}, seed=0, loc_bins=loc_bins)
    samples = list(itertools.islice(source("train"), n))
    if not independent:  # one causal conversation per sample: the same tokens, plain mask
        samples = [dataclasses.replace(s, independent_turns=False) for s in samples]
    return samples


def llava_model(world: Path, tokenizer: Any, hf_layout: bool = False, seed: int = 0) -> Any:
    from dataclasses import replace

    from visto.data.processor import Processor
    from visto.models.llava import Llava
    from visto.quickstart import QuickstartConfig, llava_config

    # A small world's tokenizer may hold fewer than the quickstart's 1,024 ids.
    cfg = replace(QuickstartConfig(), vocab_size=tokenizer.vocab_size)
    if hf_layout:  # what transformers' LLaVA holds: patch stem, MLP projector
        cfg = replace(cfg, vision_stem="patch", projector="mlp")
    config = llava_config(cfg, tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = Llava(config)
    model.processor = Processor(config.processor, tokenizer)
    return model.train()


def stage2_recipe() -> Any:
    from visto.train.recipe import load_recipe

    return load_recipe("quickstart-stage2", ["model.init_from=null"])


def batches_of(collate: Callable, samples: list, batch: int) -> list[dict]:
    return [collate(samples[i : i + batch]) for i in range(0, len(samples) - batch + 1, batch)]


def llava_case(world: Path, tokenizer: Any, samples: list, batch: int) -> tuple[Case, float]:
    from visto.train.optim import build_optimizer

    recipe = stage2_recipe()
    model = llava_model(world, tokenizer)
    optimizer = build_optimizer(model, recipe)  # vision_tower lr 0: frozen
    batches = batches_of(model.collate, samples, batch)
    flops = counted_flops(forward_backward(model, batches[0]))
    mask = batches[0]["attention_mask"]
    pad = 1 - float(mask.float().mean())
    t = time.perf_counter()
    model.collate(samples[:batch])
    collate_s = time.perf_counter() - t
    T = mask.shape[1]
    info = (f"batch {batch} x {T} tokens (pad {pad:.0%}), {model.config.image_tokens} visual tokens, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
            f"({sum(p.numel() for g in optimizer.param_groups for p in g['params']) / 1e6:.2f}M trained)")  # fmt: skip
    return Case("llava_stage2", visto_step(model, optimizer, batches, recipe.optim.grad_clip), flops, info), collate_s


def clip_case(world: Path, batch: int) -> Case:
    from visto.pretrained import build_model
    from visto.train.data import build_processor, source_from_spec
    from visto.train.optim import build_optimizer
    from visto.train.recipe import load_recipe

    recipe = load_recipe("clip-synth", [f"data.source={json.dumps(str(world))}"])
    source, _ = source_from_spec(recipe.data, recipe.seed)
    torch.manual_seed(0)
    model = build_model("clip", recipe.model.config)
    model.processor = build_processor(recipe.processor, source)
    model.train()
    optimizer = build_optimizer(model, recipe)
    samples = [s for _, s in zip(range(4 * batch), source("train"), strict=False)]
    batches = batches_of(model.collate, samples, batch)
    flops = counted_flops(forward_backward(model, batches[0]))
    info = f"batch {batch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"
    return Case("clip", visto_step(model, optimizer, batches, recipe.optim.grad_clip), flops, info)


def dense_case(world: Path, batch: int) -> Case:
    from visto.connectors.regions import DenseHeads
    from visto.nn.vision import ViT
    from visto.quickstart import QuickstartConfig, llava_config
    from visto.train.dense import batch_of, dense_loss, load_dense_targets

    cfg = QuickstartConfig()
    vit_cfg = llava_config(cfg, 1024).vision
    data = load_dense_targets(world, "train", cfg.size // cfg.patch_size)
    torch.manual_seed(0)
    vit, heads = ViT(vit_cfg).train(), DenseHeads(vit_cfg.width)
    params = list(vit.parameters()) + list(heads.parameters())
    # As visto.train.dense.pretrain_dense builds it.
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.vision_lr, betas=(0.9, 0.98),
    )  # fmt: skip
    n = data.pixels.shape[0]
    batches = [batch_of(data, torch.arange(i, i + batch)) for i in range(0, n - batch + 1, batch)]
    nxt = cycling(batches)

    def loss_of(x, t):
        return dense_loss(heads(vit(x, feature_layer=-1, pooled=False).features), t)[0]

    def step() -> None:
        x, t = nxt()
        loss = loss_of(x, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def fb() -> None:
        loss_of(*batches[0]).backward()
        opt.zero_grad(set_to_none=True)

    info = f"batch {batch}, {sum(p.numel() for p in params) / 1e6:.2f}M params, {n} images in memory"
    return Case("dense", step, counted_flops(fb), info)


def hf_pair(world: Path, tokenizer: Any, samples: list, batch: int) -> tuple[Case, Case, float, float, str]:
    """visto's and transformers' stage-2 steps on one config (patch stem, MLP projector), the
    same weights and the same batches; returns both cases and their first losses."""
    import transformers

    from visto.models.llava import export_hf
    from visto.train.optim import build_optimizer

    recipe = stage2_recipe()
    ours = llava_model(world, tokenizer, hf_layout=True)
    batches = batches_of(ours.collate, samples, batch)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp)
    hf.train()
    attn = hf.config._attn_implementation
    optimizer = build_optimizer(ours, recipe)  # freezes the vision tower (lr 0)
    o = recipe.optim
    hf.model.vision_tower.requires_grad_(False)
    trained = [p for p in hf.parameters() if p.requires_grad]
    hf_opt = torch.optim.AdamW(
        [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": o.weight_decay},
         {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps,
    )  # fmt: skip
    hf_batches = [
        {"input_ids": b["input_ids"], "pixel_values": b["pixel_values"],
         "attention_mask": b["attention_mask"], "labels": b["labels"]}
        for b in batches
    ]  # fmt: skip
    with torch.no_grad():
        loss_ours = float(ours(batches[0])["loss"])
        loss_hf = float(hf(**hf_batches[0]).loss)
    nxt = cycling(hf_batches)

    def hf_step() -> None:
        out = hf(**nxt())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, o.grad_clip or float("inf"))
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def hf_fb() -> None:
        hf(**hf_batches[0]).loss.backward()
        hf.zero_grad(set_to_none=True)

    info = f"batch {batch} x {batches[0]['input_ids'].shape[1]} tokens, {ours.config.image_tokens} visual tokens"
    a = Case("hf_pair.visto", visto_step(ours, optimizer, batches, o.grad_clip), counted_flops(forward_backward(ours, batches[0])), info)
    b = Case("hf_pair.transformers", hf_step, counted_flops(hf_fb), f"transformers {transformers.__version__}, attention {attn}")
    return a, b, loss_ours, loss_hf, attn


# ----------------------------------------------------------------------------- profile

CATEGORIES = (  # first match wins: (category, substrings of an op's name)
    ("optimizer", ("adam", "optimizer", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("softmax / loss", ("softmax", "nll_loss", "cross_entropy")),
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "aten::linear", "convolution", "conv2d")),
    ("norm", ("layer_norm", "rms", "norm")),
    ("copies / layout", ("copy_", "clone", "contiguous", "cat", "index", "scatter", "masked", "to_copy", "where")),
)


def profile_step(case: Case, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    case.step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            case.step()
    wall_us = (time.perf_counter() - t) * 1e6
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key.startswith("Optimizer")]
    by_cat: dict[str, float] = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "elementwise / other ops")
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_cpu_time_total
    ops = sum(by_cat.values())
    by_cat["Python, dispatch, autograd bookkeeping (wall - ops)"] = max(0.0, wall_us - ops)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "share": {k: round(v / wall_us, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [(e.key, round(e.self_cpu_time_total / wall_us, 3)) for e in top],
    }


# ----------------------------------------------------------------------------- main


def render_world(n: int) -> Path:
    from visto.data.synth import WorldConfig
    from visto.data.synth.generate import generate_world

    out = Path(tempfile.mkdtemp()) / "world"
    generate_world(WorldConfig(n=n, seed=0, size=128, splits={"train": 0.85, "val": 0.05, "test": 0.05, "heldout": 0.05}), out, workers=1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, help="a 128-px world (default: render 400 images)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per case per round")
    p.add_argument("--gemm", type=int, default=2048)
    p.add_argument("--batches", type=int, default=3, help="distinct batches per case")
    p.add_argument("--cases", nargs="+", default=["llava_stage2", "clip", "dense"])
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load()
    world = args.world or render_world(400)

    tokenizer = quickstart_processor(world)
    loc_bins = 100  # QuickstartConfig.loc_bins
    cases: list[Case] = []
    collate_s = None
    samples = stage2_samples(world, loc_bins, 16 * args.batches)
    if "llava_stage2" in args.cases:
        case, collate_s = llava_case(world, tokenizer, samples, 16)
        cases.append(case)
    if "clip" in args.cases:
        cases.append(clip_case(world, 32))
    if "dense" in args.cases:
        cases.append(dense_case(world, 16))
    losses = None
    if not args.no_hf:
        plain = stage2_samples(world, loc_bins, 16 * args.batches, independent=False)
        a, b, loss_ours, loss_hf, _ = hf_pair(world, tokenizer, plain, 16)
        assert abs(loss_ours - loss_hf) < 1e-3 * max(1.0, abs(loss_ours)), (loss_ours, loss_hf)
        losses = (loss_ours, loss_hf)
        cases += [a, b]
    for c in cases:
        print(f"{c.name}: {c.info}; {c.flops / 1e9:.1f} GFLOP per step")
        c.step()  # warm-up

    # CPU seconds (this process, --threads threads) are what the code costs; on a shared
    # machine wall seconds also hold the other jobs' share. Both are reported; MFU and the
    # ratio come from CPU seconds, each round against that round's GEMM.
    walls: dict[str, list[float]] = {c.name: [] for c in cases}
    cpus: dict[str, list[float]] = {c.name: [] for c in cases}
    peaks: list[tuple[float, float]] = []
    mfus: dict[str, list[float]] = {c.name: [] for c in cases}
    ratios: list[float] = []
    for r in range(args.rounds):
        peaks.append(gemm_gflops(args.gemm))
        for c in cases:
            runs = [timed(c.step) for _ in range(args.steps)]
            walls[c.name].append(statistics.median(w for w, _ in runs))
            cpus[c.name].append(statistics.median(u for _, u in runs))
            mfus[c.name].append(c.flops / cpus[c.name][-1] / (peaks[-1][1] * 1e9))
        if not args.no_hf:
            ratios.append(cpus["hf_pair.transformers"][-1] / cpus["hf_pair.visto"][-1])
        print(f"round {r + 1}: GEMM {peaks[-1][1]:.1f} GFLOP/s CPU ({peaks[-1][0]:.1f} wall); "
              + "; ".join(f"{n} {cpus[n][-1] * 1e3:.0f} ms CPU, {walls[n][-1] * 1e3:.0f} wall "
                          f"({mfus[n][-1]:.1%})" for n in cpus), flush=True)  # fmt: skip
    med = statistics.median
    result: dict[str, Any] = {
        "peak_gflops": round(med(p[1] for p in peaks), 2),
        "mfu": {n: round(med(v), 4) for n, v in mfus.items() if not n.startswith("hf_pair")},
        "step_ratio_vs_hf": round(med(ratios), 3) if ratios else None,
        "step_ms_cpu": {n: round(med(v) * 1e3, 1) for n, v in cpus.items()},
        "step_ms_wall": {n: round(med(v) * 1e3, 1) for n, v in walls.items()},
        "peak_gflops_wall": round(med(p[0] for p in peaks), 2),
        "gflop_per_step": {c.name: round(c.flops / 1e9, 2) for c in cases},
        "mfu_hf_pair": {n.split(".")[1]: round(med(v), 4) for n, v in mfus.items() if n.startswith("hf_pair")},
        "first_loss_visto_transformers": losses,
        "collate_ms_per_llava_batch": None if collate_s is None else round(collate_s * 1e3, 1),
        "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
        "torch": torch.__version__, "load_before": load_before,
    }  # fmt: skip
    if args.profile and cases and cases[0].name == "llava_stage2":
        result["profile_llava_stage2"] = profile_step(cases[0], 2)
    result["load_after"] = load()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
