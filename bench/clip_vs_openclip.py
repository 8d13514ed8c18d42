"""Training step time of visto's CLIP against open_clip's, same towers, batch and precision.

Both models are built from one set of sizes (image/patch size, widths, layers, heads, MLP
ratio, context length, vocabulary, embedding width), get the same batch (random pixels and
token ids, every text `--context` tokens long so neither side gains from shorter padding),
the same loss (symmetric InfoNCE with a learned temperature), the same optimizer (AdamW),
in fp32 on the CPU (or --device). Steps alternate, ours then theirs, so a load change on a
shared machine hits both sides alike; each side's figure is the median of `--steps` steps
after `--warmup`. The ratio printed is theirs / ours: >= 1.0 means ours is not slower.

open_clip imports torchvision, which does not import beside visto's torch 2.13: run this
from the bench venv (bench/README.md), where torch 2.14.1 serves both sides.

    bench/.venv-openclip/bin/python bench/clip_vs_openclip.py
    bench/.venv-openclip/bin/python bench/clip_vs_openclip.py --batch 128 --steps 30 --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # Defaults: visto's "small" CLIP preset (the synthetic world's model on a CPU).
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--context", type=int, default=32, help="text context length (tokens)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="torch.profiler table for both sides")
    p.add_argument("--json", type=Path, help="also write the figures here (e.g. bench/out/...)")
    return p.parse_args()


# ----------------------------------------------------------------------------- the two models


def build_ours(a: argparse.Namespace) -> torch.nn.Module:
    from visto.models.clip import CLIP, CLIPConfig
    from visto.nn.text import TextConfig
    from visto.nn.vision import ViTConfig

    vision = ViTConfig(
        image_size=a.image_size,
        patch_size=a.patch,
        width=a.vision_width,
        layers=a.vision_layers,
        heads=a.vision_heads,
        mlp_hidden=a.mlp_ratio * a.vision_width,
        act="gelu",
        pool="cls",
    )
    text = TextConfig(
        kind="transformer",
        vocab_size=a.vocab,
        context_length=a.context,
        width=a.text_width,
        layers=a.text_layers,
        heads=a.text_heads,
        mlp_hidden=a.mlp_ratio * a.text_width,
        act="gelu",
        causal=True,
        pool="eos",
    )
    return CLIP(CLIPConfig(vision=vision, text=text, embed_dim=a.embed_dim, loss="infonce"))


def build_theirs(a: argparse.Namespace) -> torch.nn.Module:
    """open_clip's CLIP(embed_dim, vision_cfg, text_cfg) with the same sizes as ours."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=a.vision_layers,
        width=a.vision_width,
        head_width=a.vision_width // a.vision_heads,
        mlp_ratio=float(a.mlp_ratio),
        patch_size=a.patch,
        image_size=a.image_size,
        pool_type="tok",  # the CLS token, as our pool="cls"
    )
    text = CLIPTextCfg(
        context_length=a.context,
        vocab_size=a.vocab,
        width=a.text_width,
        heads=a.text_heads,
        layers=a.text_layers,
        mlp_ratio=float(a.mlp_ratio),
        pool_type="argmax",  # the EOS token (largest id in our batches), as our pool="eos"
    )
    return CLIP(embed_dim=a.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=False)


# ----------------------------------------------------------------------------- one batch


def make_batch(a: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random pixels and token ids; each text is <s> w1..wk </s> then padding to --context,
    with EOS = the largest id (open_clip's argmax pooling finds it, our EOS pooling too)."""
    g = torch.Generator().manual_seed(a.seed)
    B, T, V = a.batch, a.context, a.vocab
    pixels = torch.randn(B, 3, a.image_size, a.image_size, generator=g)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)  # real tokens incl. <s>, </s>
    ids = torch.randint(3, V - 1, (B, T), generator=g)
    ids[:, 0] = 1
    positions = torch.arange(T)[None, :]
    ids[positions == (lengths - 1)[:, None]] = V - 1  # </s>
    mask = (positions < lengths[:, None]).long()
    ids = ids * mask  # pad id 0 after </s>
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- the two steps


def step_ours(model, optimizer, batch) -> Callable[[], float]:
    def step() -> float:
        loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def step_theirs(model, optimizer, batch) -> Callable[[], float]:
    import math

    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()

    def step() -> float:
        image_features, text_features, logit_scale = model(
            batch["pixel_values"], batch["input_ids"]
        )
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # open_clip's train loop clamps after each step
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], float], device: torch.device) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one step. CPU time is the steadier figure
    on a shared machine: waiting for a core does not count (with --threads 1 it is the work)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, loss


def profile(name: str, step: Callable[[], float], n: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    print(f"\n== {name}: torch.profiler over {n} steps (top ops by self CPU time) ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    ours, theirs = build_ours(a).to(device).train(), build_theirs(a).to(device).train()
    batch = make_batch(a, device)
    steps = {
        "visto": step_ours(ours, torch.optim.AdamW(ours.parameters(), lr=a.lr), batch),
        "open_clip": step_theirs(theirs, torch.optim.AdamW(theirs.parameters(), lr=a.lr), batch),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, fp32; "
        f"batch {a.batch}, image {a.image_size}px/{a.patch}px patches, "
        f"vision {a.vision_layers}x{a.vision_width} ({a.vision_heads} heads), "
        f"text {a.text_layers}x{a.text_width} ({a.text_heads} heads, {a.context} tokens, "
        f"vocab {a.vocab}), embed {a.embed_dim}"
    )
    print(f"parameters: visto {n_params(ours):,}  open_clip {n_params(theirs):,}")

    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for i in range(a.warmup + a.steps):
        for name, step in steps.items():  # alternate: ours, theirs, ours, theirs, ...
            seconds, cpu_seconds, losses[name] = timed(step, device)
            if i >= a.warmup:
                times[name].append(seconds)
                cpu[name].append(cpu_seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    for name in steps:
        t = sorted(times[name])
        print(
            f"{name:>9}: median {1000 * med[name]:7.1f} ms/step wall "
            f"(min {1000 * t[0]:.1f}, max {1000 * t[-1]:.1f}; {a.batch / med[name]:,.0f} pairs/s), "
            f"{1000 * med_cpu[name]:7.1f} ms CPU; last loss {losses[name]:.3f}"
        )
    ratio = med["open_clip"] / med["visto"]
    ratio_cpu = med_cpu["open_clip"] / med_cpu["visto"]
    verdict = "ours is not slower" if ratio >= 1.0 else "ours is slower"
    print(f"ratio open_clip / visto = {ratio:.3f} wall  ({verdict}); {ratio_cpu:.3f} CPU time")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": str(device),
                    "args": {k: str(v) for k, v in vars(a).items()},
                    "median_s": med,
                    "median_cpu_s": med_cpu,
                    "ratio_openclip_over_visto": ratio,
                    "ratio_cpu_openclip_over_visto": ratio_cpu,
                },
                indent=2,
            )
            + "\n"
        )
    if a.profile:
        for name, step in steps.items():
            profile(name, step)


if __name__ == "__main__":
    main()
