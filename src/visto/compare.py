"""`visto compare`: every architecture family trained on the same world, for the same
compute budget, evaluated the same way, reported side by side.

    OUT/world/                   the synthetic world (or --data DIR)
    OUT/vision/                  the quickstart's dense-pretrained ViT, trained once, shared
    OUT/<family>/train/          a `visto.train` run (recipe `compare-<family>`, periodic checkpoints)
    OUT/<family>/eval.json       the `visto eval` figures (test + `heldout.`), predictions.jsonl
    OUT/<family>/summary.json    parameters, visual tokens, throughput, latency, probe curve
    OUT/compare.json             every family's summary + one row per task with its winner
    OUT/report.md, OUT/plots/accuracy.png

What is held equal (so that the architecture is what differs):
- data: the mix "instruct+caption" (`visto.data.synth.mixes`, named by the recipes'
  `data.mix`): every VQA, grounding, box -> description, OCR and JSON question of an image
  and one caption, as independent turns of one sample; the same image size and tokenizer
  for every family;
- the vision tower: the quickstart's ViT, pretrained once on the world's dense labels and
  frozen in every family that has a tower (`model.config.vision_init`);
- the question focus in front of every decoder (LLaVA's and CogVLM's regions projector,
  the others' `question_focus`): the tower's detector and OCR reader, the question's named
  words, `<focus>` slots before each answer and a pointer that copies them; the families
  differ in how the image itself reaches the decoder (bench/README.md measures that path
  apart in each: within these budgets most answers come through the focus);
- the budget: the optimizer steps each family takes in FAMILY_REFERENCE_MINUTES on the
  reference machine (2 idle cores): its recipe's `max_steps`, so a seed gives the same
  models on any machine (`--steps` sets one count for all; `--minutes` is an optional
  wall-clock cap per family, and a family it stops early reports the steps it cut). A
  family that has no vision tower to take the shared one (its config has no `vision_init`,
  or takes one only for an option its recipe leaves off, `VISION_INIT_ONLY_FOR`: Fuyu reads
  raw patches, its tower serves its question_focus alone) is credited the reference minutes
  of the shared tower's pretraining, as steps at its own reference pace: it learns to see
  inside its own budget, so it gets that compute back (`credit_vision_time`; reported either way);
- evaluation: the `visto eval` path (`visto.eval.evaluator_for`), greedy decoding through
  the one engine; latency on the same prompts through the same engine.

Nothing here branches on a family's name: what differs lives in the recipes
(`src/visto/train/recipes/compare-<family>.json`) and in `visto.models`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError
from visto.utils.io import atomic_write_json, atomic_write_text, save_figure

DEFAULT_FAMILIES = ("llava", "blip2", "flamingo", "fuyu", "cogvlm")
# The compare recipes' max_steps are what each family trains in this many minutes on the
# reference machine (2 idle cores). The shared tower is the quickstart's own (its world size,
# 4,000 dense steps at batch 16): 358 s of the quickstart's 424 s vision stage on that machine
# (the rest its OCR reader), so about this many steps a minute.
FAMILY_REFERENCE_MINUTES = 8.0
VISION_STEPS_PER_REFERENCE_MINUTE = 670

# (eval.json name, label, higher is better) in report order; VQA types are found in the
# metrics. Each is also reported with `heldout.` in front (unseen colour-shape pairs), and
# beside each family's figure its blind twin's (`blind.<name>`: every image swapped for
# another image of its split). JSON figures are the model's own decoding first, then the
# grammar's.
TASK_ROWS: list[tuple[str, str, bool]] = [
    ("vqa.overall", "VQA overall", True),
    ("count.acc", "counting", True),
    ("ground.acc50", "grounding acc@0.5", True),
    ("refdesc.acc", "box -> description", True),
    ("ocr.exact", "OCR exact", True),
    ("ocr.cer", "OCR character error rate", False),
    ("pope.f1", "POPE F1", True),
    ("json.valid", "JSON valid (own decoding)", True),
    ("json.field_acc", "JSON fields (own decoding)", True),
    ("json.constrained.valid", "JSON valid under the grammar", True),
    ("json.constrained.field_acc", "JSON fields under the grammar", True),
    ("classify.acc", "classification", True),
    ("caption.cider", "caption CIDEr", True),
]


@dataclass
class CompareConfig:
    """Every setting of a comparison (saved as OUT/config.json)."""

    families: list[str] = field(default_factory=lambda: list(DEFAULT_FAMILIES))
    steps: int | None = None  # optimizer steps per family; None = its recipe's max_steps
    minutes: float | None = None  # an optional wall-clock cap per family
    data: str | None = None  # an existing synthetic world; None = render one into OUT/world
    n: int = 5000  # images of a rendered world (the quickstart's: fewer overfit the tower)
    size: int = 128  # image side (the recipes are written for 128 px)
    seed: int = 0
    vision_steps: int = 4000  # the shared ViT's dense pretraining at batch 16 (once, not per family)
    reader_steps: int = 1000  # the shared OCR reader's training, beside the ViT (once)
    credit_vision_time: bool = True  # a family without a tower gets that pretraining's compute
    eval_images: int = 200  # test and held-out images for the final evaluation
    eval_batch: int = 32
    tasks: list[str] | None = None  # world tasks evaluated (None: visto eval's default, all)
    probe_images: int = 8  # test images whose VQA questions are asked at every checkpoint
    probe_points: int = 5  # checkpoints along the budget for the accuracy-vs-training curve
    latency_prompts: int = 8  # prompts timed one at a time for TTFT and decode tokens/s
    latency_tokens: int = 16
    workers: int = 2
    threads: int = 0  # torch threads; 0 = 1 on a busy machine (see quickstart.pick_threads)

    def validate(self) -> CompareConfig:
        from visto.models import FAMILIES
        from visto.train.recipe import RECIPES_DIR

        problems = []
        if not self.families:
            problems.append("--families is empty")
        for f in self.families:
            if f not in FAMILIES:
                problems.append(f"unknown family {f!r} (known: {', '.join(sorted(FAMILIES))})")
            elif not (RECIPES_DIR / f"compare-{f}.json").is_file():
                problems.append(f"family {f!r} has no compare-{f}.json recipe")
        from visto.data.synth import TASK_KINDS

        unknown = [t for t in self.tasks or [] if t not in TASK_KINDS]
        if unknown:
            problems.append(f"unknown task(s) {unknown}; choose from {', '.join(TASK_KINDS)}")
        if len(set(self.families)) != len(self.families):
            problems.append("--families names a family twice")
        if self.minutes is not None and self.minutes <= 0:
            problems.append(f"--minutes must be positive (or left out: no cap), got {self.minutes}")
        for name in ("steps", "vision_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("eval_images", "probe_images", "probe_points", "latency_prompts", "latency_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.data is not None and not (Path(self.data) / "world.json").is_file():
            problems.append(f"--data {self.data} is not a synthetic world (no world.json); "
                            "render one with `visto data synth` or leave --data out")  # fmt: skip
        if problems:
            raise UserError("compare: " + "; ".join(problems))
        return self

    def family_settings(self) -> dict[str, Any]:
        """What changes a family's training (a change retrains it)."""
        d = asdict(self)
        for k in ("families", "eval_images", "eval_batch", "tasks", "latency_prompts",
                  "latency_tokens", "workers", "threads"):  # fmt: skip
            d.pop(k)
        return d


# ----------------------------------------------------------------------------- tables


def winner(values: dict[str, float], higher_is_better: bool = True) -> tuple[str | None, float]:
    """(the best family, its margin over the runner-up) among the families with a figure;
    ("tie", 0.0) when the best two are equal, (None, nan) when no family has one, and a
    margin of nan when only one family has one."""
    finite = {f: v for f, v in values.items() if v is not None and not math.isnan(v)}
    if not finite:
        return None, math.nan
    ranked = sorted(finite.items(), key=lambda kv: kv[1], reverse=higher_is_better)
    if len(ranked) == 1:
        return ranked[0][0], math.nan
    (best, v1), (_, v2) = ranked[0], ranked[1]
    margin = abs(v1 - v2)
    return ("tie", 0.0) if margin < 1e-9 else (best, margin)


def task_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per task figure that some family has: {key, label, split, higher_is_better,
    values {family: value}, blind {family: the blind twin's value}, winner, margin}; test
    rows first, then the held-out ones. The winner is decided on the seeing figures."""
    keys = set().union(*(m.keys() for m in metrics.values())) if metrics else set()
    base = [r for r in TASK_ROWS]
    vqa_types = sorted({k.split(".", 1)[1] for k in keys if k.startswith("vqa.")} - {"overall"})
    base[1:1] = [(f"vqa.{t}", f"VQA {t}", True) for t in vqa_types]
    rows = []
    for prefix, split in (("", "test"), ("heldout.", "held-out")):
        for key, label, higher in base:
            name = prefix + key
            if name not in keys:
                continue
            values = {f: m[name] for f, m in metrics.items() if name in m}
            blind = {f: m["blind." + name] for f, m in metrics.items() if "blind." + name in m}
            best, margin = winner(values, higher)
            rows.append({"key": name, "label": label, "split": split, "higher_is_better": higher,
                         "values": values, "blind": blind, "winner": best, "margin": margin})  # fmt: skip
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def markdown_tables(families: list[str], rows: list[dict[str, Any]],
                    summaries: dict[str, dict[str, Any]]) -> list[str]:  # fmt: skip
    """The report's tables: tasks (test, held-out) with winners, each family's figure beside
    its blind twin's where there is one, then cost and speed."""
    lines: list[str] = []
    with_blind = any(r.get("blind") for r in rows)
    columns = [c for f in families for c in ([f, f"{f} blind"] if with_blind else [f])]
    head = "| task | " + " | ".join(columns) + " | winner | by |"
    rule = "|---|" + "---:|" * len(columns) + "---|---:|"
    for split in ("test", "held-out"):
        split_rows = [r for r in rows if r["split"] == split]
        if not split_rows:
            continue
        title = "Test split" if split == "test" else "Held-out colour-shape combinations"
        lines += [f"### {title}", "", head, rule]
        for r in split_rows:
            cells = []
            for f in families:
                v = r["values"].get(f)
                text = _fmt(v)
                cells.append(f"**{text}**" if f == r["winner"] else text)
                if with_blind:
                    cells.append(_fmt(r.get("blind", {}).get(f)))
            arrow = "" if r["higher_is_better"] else " (lower is better)"
            lines.append(f"| {r['label']}{arrow} | " + " | ".join(cells)
                         + f" | {r['winner'] or '–'} | {_fmt(r['margin'])} |")  # fmt: skip
        lines.append("")
    cost = [
        ("parameters (total)", lambda s: _count(s["parameters"])),
        ("parameters (trained)", lambda s: _count(s["trained_parameters"])),
        ("visual tokens per image", lambda s: str(s["visual_tokens"])),
        ("training budget (reference min)", lambda s: _fmt(s["budget_minutes"], 2)),
        ("optimizer steps", lambda s: str(s["steps"])),
        ("training samples/s", lambda s: _fmt(s["samples_per_s"], 1)),
        ("time to first token (ms)", lambda s: _fmt(s["ttft_ms"], 1)),
        ("decode tokens/s", lambda s: _fmt(s["decode_tokens_per_s"], 1)),
    ]
    lines += ["### Size, cost and speed", "", "| | " + " | ".join(families) + " |",
              "|---|" + "---:|" * len(families)]  # fmt: skip
    for label, get in cost:
        lines.append(f"| {label} | " + " | ".join(get(summaries[f]) for f in families) + " |")
    lines.append("")
    return lines


def plot_accuracy_curves(summaries: dict[str, dict[str, Any]], out: Path) -> Path:
    """Probe VQA accuracy of every family, one line each, against training steps (the budget,
    the same on any machine) and against minutes of training (this machine, at its load)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_minute) = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    for family, s in summaries.items():
        points = s.get("probe_curve") or []
        if points:
            vqa = [p["vqa"] for p in points]
            if all("step" in p for p in points):
                by_step.plot([p["step"] for p in points], vqa, marker="o", label=family)
            by_minute.plot([p["minutes"] for p in points], vqa, marker="o", label=family)
    by_step.set_xlabel("training steps")
    by_minute.set_xlabel("minutes of training (this machine)")
    by_step.set_ylabel("probe VQA accuracy (test images)")
    by_step.set_ylim(0, 1)
    for ax in (by_step, by_minute):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


# ----------------------------------------------------------------------------- measurements


def parameter_counts(model: Any, module_lrs: dict[str, float], base_lr: float) -> tuple[int, int]:
    """(total, trained): trained parameters are those whose lr (longest prefix) is above 0."""
    from visto.train.optim import module_lr

    total = trained = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if module_lr(name, base_lr, module_lrs) > 0:
            trained += p.numel()
    return total, trained


def visual_tokens(model: Any, image: Any) -> int:
    """Visual tokens per image: what the language side reads for one image (the config's
    `image_tokens` where the family defines it, else the image ids the processor writes)."""
    from visto.data.sample import IMAGE_PLACEHOLDER, Turn

    declared = getattr(model.config, "image_tokens", None)
    if isinstance(declared, int):
        return declared
    sample = Sample(id="probe", images=[image], turns=[Turn("user", f"{IMAGE_PLACEHOLDER}\nhi")])
    encoded = model.processor.encode(sample, train=False)
    return int((encoded.input_ids == model.processor.tokenizer.image_id).sum())


def latency(model: Any, prompts: list[Sample], new_tokens: int) -> dict[str, float]:
    """Median time to first token (ms) and decode tokens/s, one prompt at a time through the
    engine, every answer forced to `new_tokens` tokens (ignore_eos) so families decode alike."""
    import torch

    from visto.infer import SamplingParams
    from visto.tasks.runner import make_engine, prompt_batch

    engine = make_engine(model)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ttfts, tokens, seconds = [], 0, 0.0
    with torch.inference_mode():
        for k, prompt in enumerate([prompts[0], *prompts]):  # the first is a warm-up
            batch, _ = prompt_batch(model, [prompt], engine.device)
            timing = engine.generate_batch(batch, params)[0].timing
            if k == 0:
                continue
            ttfts.append(timing.ttft_s)
            tokens += timing.decode_tokens
            seconds += timing.decode_s
    return {"ttft_ms": 1000 * statistics.median(ttfts),
            "decode_tokens_per_s": tokens / seconds if seconds > 0 else math.nan}  # fmt: skip


def probe_prompts(world_dir: Path, n_images: int, seed: int) -> list[Any]:
    from visto.data.synth import iter_samples

    return list(iter_samples(world_dir, "test", tasks=["vqa"], seed=seed, limit=n_images))


def probe_accuracy(model: Any, samples: list[Sample], batch_size: int) -> float:
    """VQA accuracy on the probe samples through the eval path's generate."""
    from visto.eval.generative import evaluate_generative
    from visto.tasks.runner import make_generate

    # VQA answers are short: no JSON grammar to compile for every checkpoint.
    generate = make_generate(model, constrain_json=False)
    metrics, _ = evaluate_generative(generate, samples, batch_size=batch_size)
    return float(metrics["vqa.overall"])


# ----------------------------------------------------------------------------- one family


def _stamp_matches(path: Path, settings: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()).get("settings") == settings
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def family_budget(cfg: CompareConfig, recipe_steps: int, takes_tower: bool) -> tuple[int, float]:
    """(optimizer steps, the minutes they stand for on the reference machine) of one family:
    `cfg.steps` or its recipe's `recipe_steps` (FAMILY_REFERENCE_MINUTES there), plus, for a
    credited family without a vision tower, the shared tower's reference minutes at the
    family's own reference pace."""
    steps = cfg.steps or recipe_steps
    per_minute = recipe_steps / FAMILY_REFERENCE_MINUTES
    if not takes_tower and cfg.credit_vision_time:
        steps += round(per_minute * cfg.vision_steps / VISION_STEPS_PER_REFERENCE_MINUTE)
    return steps, steps / per_minute


def train_family(family: str, cfg: CompareConfig, out: Path, world_dir: Path, vision_ckpt: Path,
                 console: Any) -> dict[str, Any]:  # fmt: skip
    """Train one family for its budget (skipped when done with the same settings); returns
    the training facts (budget, steps, samples/s, checkpoints with their elapsed minutes)."""
    from visto.checkpoint import load_trainer_state
    from visto.models import FAMILIES
    from visto.quickstart import stop_if_interrupted
    from visto.train.loop import train
    from visto.train.recipe import load_recipe
    from visto.train.report import read_metrics

    run_dir = out / family / "train"
    stamp = out / family / "train_done.json"
    config_cls = FAMILIES[family][0]
    takes_tower = "vision_init" in {f.name for f in dataclasses.fields(config_cls)}
    overrides = [f"model.config.tokenizer_dir={json.dumps(str(vision_ckpt))}",
                 f"data.source={json.dumps(str(world_dir))}", f"seed={cfg.seed}"]  # fmt: skip
    recipe = load_recipe(f"compare-{family}", overrides)
    only_for = getattr(config_cls, "VISION_INIT_ONLY_FOR", None)
    if only_for is not None:
        # A tower that serves one option alone (Fuyu's question_focus): a plain Fuyu takes none
        # and is credited the tower's minutes; with the focus it reads the shared tower's
        # detector and reader, that pretraining's compute, so it takes it and is not credited.
        takes_tower = bool((recipe.model.config or {}).get(only_for))
    if takes_tower:
        overrides.append(f"model.config.vision_init={json.dumps(str(vision_ckpt))}")
        recipe = load_recipe(f"compare-{family}", overrides)
    assert recipe.max_steps is not None, f"compare-{family}.json needs max_steps"
    # A connector that copies the JSON its detector writes learns from JSON labels with the
    # boxes that detector (frozen, the shared tower's) finds, as the quickstart's stage 2 does
    # (LLaVA's `projector`, or a family's `question_focus`: BLIP-2's, Flamingo's).
    boxes = out / family / "json-boxes.jsonl"
    model_config = recipe.model.config or {}
    copies_json = takes_tower and any((model_config.get(key) or {}).get("copy_json", False)
                                      for key in ("projector", "question_focus"))  # fmt: skip
    if copies_json:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, json_boxes=str(boxes)))
    steps, budget_minutes = family_budget(cfg, recipe.max_steps, takes_tower)
    # A credited family's cap grows by its credit, as its steps do.
    cap = None if cfg.minutes is None else cfg.minutes * steps / (cfg.steps or recipe.max_steps)
    settings = {**cfg.family_settings(), "family": family, "budget_steps": steps,
                "json_boxes": copies_json}  # fmt: skip
    if _stamp_matches(stamp, settings):
        console.print(f"[bold]{family}[/]: reusing {run_dir} (same settings)")
        return json.loads(stamp.read_text())["facts"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if copies_json:
        from visto.quickstart import write_detector_boxes

        write_detector_boxes(vision_ckpt, world_dir, boxes, console)
    every = max(1, steps // cfg.probe_points)
    recipe = dataclasses.replace(recipe, max_steps=steps, max_minutes=cap, checkpoint_every=every)
    console.print(f"[bold]{family}[/]: training {steps} steps (~{budget_minutes:.1f} min on the reference "
                  f"machine{'' if cap is None else f', capped at {cap:.1f} min'}; "
                  f"{'shared ViT frozen' if takes_tower else 'no vision tower: learns to see from patches'}), "
                  f"mix {recipe.data.mix!r}, a checkpoint every {every} steps")  # fmt: skip
    t0 = time.perf_counter()
    result = train(recipe, run_dir, console=console)
    stop_if_interrupted(result, family, console)  # not stamped: a second run retrains it
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    last = rows[-1]["elapsed_s"] if rows else math.nan
    checkpoints = []
    for d in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])):
        checkpoints.append({"step": int(d.name[5:]), "path": str(d),
                            "minutes": load_trainer_state(d)["elapsed_s"] / 60})  # fmt: skip
    final = run_dir / "checkpoint"
    if not checkpoints or checkpoints[-1]["step"] != result.step:
        checkpoints.append({"step": result.step, "path": str(final),
                            "minutes": load_trainer_state(final)["elapsed_s"] / 60})  # fmt: skip
    total, trained = parameter_counts(result.model, recipe.optim.module_lrs, recipe.optim.lr)
    if result.steps_cut:
        console.print(f"[bold yellow]{family}[/]: the --minutes cap stopped it at step {result.step} "
                      f"of {steps}: {result.steps_cut} steps cut")  # fmt: skip
    facts = {
        "budget_minutes": budget_minutes, "budget_steps": steps, "steps_cut": result.steps_cut,
        "takes_shared_vision": takes_tower, "steps": result.step,
        "batch_size": recipe.batch_size, "train_seconds": last,
        "samples_per_s": training_rate(rows, recipe.batch_size),
        "parameters": total, "trained_parameters": trained, "checkpoints": checkpoints,
        "wall_seconds": time.perf_counter() - t0,
    }  # fmt: skip
    atomic_write_json(stamp, {"settings": settings, "facts": facts})
    return facts


def training_rate(rows: list[dict[str, Any]], batch_size: int) -> float:
    """Samples per second of the training steps themselves (each metrics row's rate covers
    the steps since the previous row); checkpoint writes and the first shuffle-buffer fill
    are left out where a row does not hold them."""
    samples = seconds = 0.0
    previous = 0
    for r in rows:
        n = (r["step"] - previous) * batch_size
        previous = r["step"]
        if r.get("samples_per_s", 0) > 0:
            samples += n
            seconds += n / r["samples_per_s"]
    return samples / seconds if seconds else math.nan


def evaluate_family(family: str, cfg: CompareConfig, out: Path, world_dir: Path,
                    facts: dict[str, Any], console: Any) -> dict[str, Any]:  # fmt: skip
    """The probe curve over the checkpoints, the `visto eval` figures, size and latency."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import visto
    from visto.checkpoint import read_config
    from visto.eval import evaluator_for
    from visto.eval.generative import reportable_metrics
    from visto.quickstart import EVAL_BLIND

    fam_dir = out / family
    # The blind mode is in the stamp: a summary written before the blind twin is redone.
    settings = {"train": facts, "eval_images": cfg.eval_images, "eval_batch": cfg.eval_batch,
                "tasks": cfg.tasks, "latency": [cfg.latency_prompts, cfg.latency_tokens],
                "probe": cfg.probe_images, "blind": EVAL_BLIND}  # fmt: skip
    stamp = fam_dir / "summary.json"
    if _stamp_matches(stamp, settings):
        console.print(f"[bold]{family}[/]: reusing {stamp}")
        return json.loads(stamp.read_text())["summary"]
    final = Path(facts["checkpoints"][-1]["path"])
    kind, evaluate = evaluator_for(read_config(final)["family"])
    if kind != "generative":
        raise UserError(f"compare: {family} is evaluated as {kind!r}; only generative families compare")
    probes = probe_prompts(world_dir, cfg.probe_images, cfg.seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    curve = []
    # No outer inference_mode: weights loaded under it would be inference tensors, which the
    # engine's fast path cannot version-check; make_generate brings its own.
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"{family}: probe checkpoints", total=len(facts["checkpoints"]))
        for point in facts["checkpoints"]:
            model = visto.load(point["path"])
            curve.append({"step": point["step"], "minutes": round(point["minutes"], 3),
                          "vqa": probe_accuracy(model, probes, cfg.eval_batch)})  # fmt: skip
            progress.advance(bar)
        model = visto.load(final)
        bar = progress.add_task(f"{family}: visto eval", total=None)

        def log(msg: str) -> None:  # "test: 50 sample(s)", "asking 900 question(s) ..."
            progress.update(bar, description=f"{family}: visto eval, {msg}")

        result = evaluate(model, world_dir, split="test", n=cfg.eval_images, batch_size=cfg.eval_batch,
                          seed=cfg.seed, tasks=cfg.tasks, blind=EVAL_BLIND, log=log)  # fmt: skip
    metrics = reportable_metrics(result.metrics)
    atomic_write_json(fam_dir / "eval.json", metrics)
    atomic_write_text(fam_dir / "predictions.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions))  # fmt: skip
    prompts = [dataclasses.replace(s, turns=s.turns[:-1]) for s in probes[: cfg.latency_prompts]]
    speed = latency(model, prompts, cfg.latency_tokens)
    summary = {
        "family": family, "metrics": metrics, "notes": result.notes, "probe_curve": curve,
        "visual_tokens": visual_tokens(model, probes[0].images[0]),
        **{k: facts[k] for k in ("parameters", "trained_parameters", "budget_minutes", "steps",
                                 "samples_per_s", "takes_shared_vision", "batch_size")},
        **speed,
    }  # fmt: skip
    atomic_write_json(stamp, {"settings": settings, "summary": summary})
    return summary


# ----------------------------------------------------------------------------- the run


def shared_vision(cfg: CompareConfig, out: Path, console: Any) -> tuple[Path, Path, float]:
    """(world dir, the quickstart's dense-pretrained vision checkpoint, seconds it took)."""
    from visto.quickstart import QuickstartConfig, run_data, run_vision

    # The quickstart's own tower and connector settings (batch 16, the pace
    # VISION_STEPS_PER_REFERENCE_MINUTE was measured at), whichever families are compared, so
    # one OUT/vision serves any subset and a quickstart's OUT/vision can be copied in and
    # reused. Its checkpoint carries a tokenizer with the `<focus>` token that every family
    # reads (their decoders are sized for it) and the OCR reader trained beside the ViT, which
    # the families whose recipes read text into read slots use (a minute of the stage).
    qcfg = QuickstartConfig(n=cfg.n, size=cfg.size, seed=cfg.seed, workers=cfg.workers,
                            threads=cfg.threads, vision_steps=cfg.vision_steps,
                            reader_steps=cfg.reader_steps)  # fmt: skip
    qcfg.validate()
    if cfg.data is not None:
        world_dir = Path(cfg.data)
        meta = json.loads((world_dir / "world.json").read_text())
        if meta.get("config", {}).get("size") != cfg.size:
            raise UserError(f"--data {world_dir} has {meta.get('config', {}).get('size')} px images; "
                            f"compare's recipes read {cfg.size} px: render a {cfg.size} px world")  # fmt: skip
    else:
        world_dir = run_data(qcfg, out, console, fresh=False)
    # run_vision stamps its settings in OUT/vision/done.json and is skipped when they match.
    vision = run_vision(qcfg, out, world_dir, console, fresh=False)
    seconds = json.loads((out / "vision" / "done.json").read_text())["seconds"]
    return world_dir, vision, float(seconds)


def budget_sentence(cfg: CompareConfig) -> str:
    """How long every family trained, in steps, for the report."""
    steps = (f"{cfg.steps} optimizer steps" if cfg.steps is not None else
             f"the optimizer steps it takes in {FAMILY_REFERENCE_MINUTES:g} minutes on the reference "
             "machine (2 idle cores; its recipe's max_steps, in the table below)")  # fmt: skip
    cap = "" if cfg.minutes is None else f", capped at {cfg.minutes:g} min"
    return f"Every family trained for {steps}{cap}"


def write_compare_report(cfg: CompareConfig, out: Path, summaries: dict[str, dict[str, Any]],
                         vision_seconds: float, load: str) -> Path:  # fmt: skip
    """OUT/compare.json, OUT/plots/accuracy.png and OUT/report.md."""
    families = list(summaries)
    rows = task_rows({f: s["metrics"] for f, s in summaries.items()})
    plot = plot_accuracy_curves(summaries, out / "plots" / "accuracy.png")
    wins: dict[str, int] = {f: 0 for f in families}
    for r in rows:
        if r["winner"] in wins:
            wins[r["winner"]] += 1
    atomic_write_json(out / "compare.json", {
        "settings": asdict(cfg), "vision_seconds": vision_seconds, "load": load,
        "families": summaries, "tasks": rows, "wins": wins,
    })  # fmt: skip
    credited = [f for f, s in summaries.items() if not s["takes_shared_vision"]]
    lines = [
        "# visto compare", "",
        budget_sentence(cfg) + " on the same synthetic world "
        f"({cfg.data or f'{cfg.n} images rendered'}, {cfg.size} px, seed {cfg.seed}): the mix "
        "instruct+caption (every question of an image and a caption, as independent turns), "
        "batch 16, the same tokenizer. The families with a vision tower share the quickstart's "
        f"dense-pretrained ViT ({cfg.vision_steps} steps, {vision_seconds / 60:.1f} min here, frozen). "
        + (f"{', '.join(credited)} has no vision tower and "
           + ("was credited that pretraining's reference minutes as steps." if cfg.credit_vision_time
              else "was not credited them.") if credited else ""),
        f"Evaluation: `visto eval` (greedy) on the first {cfg.eval_images} test and held-out images; "
        "beside each figure its blind twin (`<family> blind`: the same questions with every image "
        "swapped for another image of its split), so the difference is what the family gains from "
        "looking. "
        f"{load} when the report was written (a shared 2-core machine: absolute speeds vary).", "",
        "## Who wins what", "",
        "Wins per family: " + ", ".join(f"{f} {n}" for f, n in sorted(wins.items(), key=lambda kv: -kv[1])),
        "",
    ]  # fmt: skip
    lines += markdown_tables(families, rows, summaries)
    lines += ["## Accuracy against training time", "",
              f"VQA accuracy on the questions of the first {cfg.probe_images} test images, asked of "
              "each family's periodic checkpoints (x: minutes of training when it was saved).", "",
              f"![accuracy vs time](plots/{plot.name})", "",
              "Per family: `<family>/eval.json`, `<family>/predictions.jsonl`, "
              "`<family>/train/report.md`.", "",
              "## Settings", "", "```json", json.dumps(asdict(cfg), indent=2), "```", ""]  # fmt: skip
    return atomic_write_text(out / "report.md", "\n".join(lines))


@dataclass
class CompareResult:
    out: Path
    report: Path
    summaries: dict[str, dict[str, Any]]


def run_compare(cfg: CompareConfig, out: str | Path, console: Any = None) -> CompareResult:
    """Train, evaluate and compare every family of `cfg` into `out` (families already done
    with the same settings are reused)."""
    import torch
    from rich.console import Console

    from visto.quickstart import machine_load, pick_threads

    cfg.validate()
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(pick_threads(cfg.threads))
    each = f"{cfg.steps} steps" if cfg.steps is not None else "its recipe's steps"
    cap = "" if cfg.minutes is None else f" (capped at {cfg.minutes:g} min)"
    console.print(f"[bold]compare[/]: {', '.join(cfg.families)}, {each} each{cap}, into {out}; "
                  f"{torch.get_num_threads()} torch thread(s), {machine_load()}")  # fmt: skip
    atomic_write_json(out / "config.json", asdict(cfg))
    world_dir, vision_ckpt, vision_seconds = shared_vision(cfg, out, console)
    summaries = {}
    for family in cfg.families:
        facts = train_family(family, cfg, out, world_dir, vision_ckpt, console)
        summaries[family] = evaluate_family(family, cfg, out, world_dir, facts, console)
        m = summaries[family]["metrics"]
        console.print(f"[bold]{family}[/]: VQA {m.get('vqa.overall', math.nan):.3f}, "
                      f"held-out {m.get('heldout.vqa.overall', math.nan):.3f}, "
                      f"blind {m.get('blind.vqa.overall', math.nan):.3f}")  # fmt: skip
    report = write_compare_report(cfg, out, summaries, vision_seconds, machine_load())
    return CompareResult(out, report, summaries)


__all__ = [
    "CompareConfig", "CompareResult", "family_budget", "markdown_tables", "parameter_counts",
    "plot_accuracy_curves", "run_compare", "task_rows", "visual_tokens", "winner",
    "write_compare_report",
]  # fmt: skip
