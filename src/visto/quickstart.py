"""The quickstart pipeline: synthetic world -> vision tower -> LLaVA stage 1 -> stage 2 -> eval.

`visto quickstart` calls these functions in order; each stage writes its own directory under
the run directory and a `done.json` with the settings it ran with, so a second run skips
every stage whose settings did not change (and `--fresh` redoes them all):

    RUN/config.json        the resolved QuickstartConfig
    RUN/world/             the synthetic world (data step)
    RUN/vision/            dense pretraining of the ViT (metrics.jsonl, checkpoint/)
    RUN/stage1-init/       with --copy-verdicts or --question-pointer only: the vision checkpoint
                           with those connector options' parameters added (stage1_init)
    RUN/stage1/            LLaVA stage 1 (a `visto.train` run of recipe quickstart-stage1: mix "captions")
    RUN/stage2/            LLaVA stage 2 (a `visto.train` run of recipe quickstart-stage2: mix "instruct+caption+prefixes")
    RUN/checkpoint/        the final model (a copy of stage2/checkpoint)
    RUN/eval.json          flat figures, test split and `heldout.` split
    RUN/predictions.jsonl  every question asked at evaluation, with the answer and its score
    RUN/metrics.jsonl      every stage's rows, with "stage" and run-wide "elapsed_s"
    RUN/report.md, RUN/plots/*.png

Where the CPU budget goes (DESIGN.md "What the compute budget buys"):
- The vision tower learns from dense per-patch labels (`visto.train.dense`), not from the LM
  loss: one image gives ~64 labelled patches instead of one answer.
- Stage 2 packs every question of an image into one sample with independent turns
  (shared-prefix packing, `visto.data.synth.mixes`), so one vision forward and one decoder
  pass supervise ~20 answers, none of which can read another.
- Budgets are optimizer steps, so a seed gives the same model on any machine; `minutes` is an
  optional cap, and a stage it stops early records how many of its steps it cut.
- Boxes are 4 location tokens (Pix2Seq) instead of ~12 digit and comma tokens.
- Torch threads: on a machine already busier than its cores, one thread per process beats
  two (measured: 2.5 s vs 8 s per ViT step at load 10 on 2 cores), so `threads=0` picks that.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError
from visto.utils.io import atomic_directory, atomic_write_json, atomic_write_text

STAGES = ("data", "vision", "stage1", "stage2", "eval")
# Connector options that stage 1 adds to the vision stage's checkpoint (`stage1_init`): not in
# the vision stage's settings, so a change reruns stages 1 and 2 only.
STAGE1_OPTIONS = ("copy_verdicts", "question_pointer")


@dataclass
class QuickstartConfig:
    """Every setting of a quickstart run (saved as RUN/config.json)."""

    # Training budgets in optimizer steps, so that a seed gives the same model on any machine.
    # Measured times per stage (and the load they ran under): bench/README.md, "Quickstart".
    vision_steps: int = 4000
    stage1_steps: int = 400
    stage2_steps: int = 200
    # An optional wall-clock cap on the three training stages together, split by the shares
    # below; a stage it stops early says how many of its steps it cut. None = no cap.
    minutes: float | None = None
    n: int = 5000  # images in the world
    size: int = 128  # image side in pixels
    seed: int = 0
    workers: int = 2  # rendering processes
    threads: int = 0  # torch threads; 0 = 1 when the machine is already busy, else all cores
    # Shares of the `minutes` cap for the training stages (the rest covers data and eval).
    vision_share: float = 0.25
    stage1_share: float = 0.08
    stage2_share: float = 0.55
    # Vision tower: 16 px patches -> 8x8 = 64 patches at 128 px.
    patch_size: int = 16
    # "conv" (conv stem: same budget, dense loss 0.87 vs 1.20 and shape patch accuracy 0.34 vs
    # 0.26 in bench/dense_stem.py; no transformers export) | "patch" (exports to transformers)
    vision_stem: str = "conv"
    vision_width: int = 128
    vision_layers: int = 4
    # "regions": one token per detected object (<= `slots`), tied to the decoder's word
    # embeddings (visto.connectors.regions; bench/binding_probe.py measured why);
    # "mlp": 64 patch tokens; "pixel_shuffle": 16
    projector: str = "regions"
    slots: int = 10  # regions: object tokens per image (the world has at most 9 objects)
    # regions: each object token followed by its box's 4 location tokens (ProjectorConfig.
    # box_tokens), and lines of text read by the connector's OCR reader (connectors.text_reader,
    # trained in the vision stage for `reader_steps` steps). Off by default: with both on
    # (62 visual tokens instead of 10) the same budget learned less, not more (VQA 0.695 ->
    # 0.532, grounding and OCR unchanged near 0: bench/README.md, "Quickstart", r6).
    box_tokens: bool = False
    text_slots: int = 0
    # regions: each answer's question picks the objects it names (connectors.focus, top-down
    # attention), so the decoder need not learn to search for them: stage-1 colour 0.32 -> 0.90
    # and shape 0.59 -> 0.93 at the same seed (bench/README.md, "Question focus")
    focus: bool = True
    # with focus: <focus> slots before each answer (ProcessorConfig.focus_tokens): 4 = the named
    # object's box as its 4 location tokens, so a grounding answer copies it; 0 = none
    focus_slots: int = 4
    # with focus and 4 focus slots: this many more <focus> slots hold the tokens the OCR reader
    # (trained in the vision stage) read, so an answer that reads copies them, as grounding
    # copies the box (ProjectorConfig.read_slots; 0 = no reader)
    read_slots: int = 8
    # with focus slots: answers copy the slots' tokens (the box, what was read) through a
    # pointer head beside the LM head, not through attention (connectors.pointer): a copy
    # probe of this decoder copies at 1.000 after 50 steps with it, 0.000 after 300 without
    # (bench/README.md, "Read slots, copies in stage 1")
    pointer: bool = True
    # with focus: the question's attribute words pick, count and relate the detected objects by
    # their predicted attributes (connectors.named; NS-VQA's filter/count/relate); counting,
    # existence and relations left their blind twins' figures with it (bench/README.md,
    # "Named words")
    named: bool = True
    # a detected object whose box overlaps a more confident one's by more than this IoU is the
    # same object found twice (greedy NMS; 0 = off; bench/README.md, "Named words")
    box_nms: float = 0.3
    # with focus: the count histograms' bump width (ProjectorConfig.count_width): at 1.0 the
    # decoder answered "1" for 2 objects in 33 of 86 questions whose count the focus had right
    count_width: float = 0.35
    # regions: object tokens left to right (ProjectorConfig.object_order), as the JSON answer
    # lists the objects; "raster": by the centre's patch
    object_order: str = "left_to_right"
    # with named words and the pointer: answers about the named subject may copy its detected
    # size, colour and shape words and its count (ProjectorConfig.copy_answers; measured in
    # bench/README.md, "Copied answers")
    copy_answers: bool = True
    # with copy_answers: the pointer may also copy the executed yes/no of an existence or
    # relation question as one more run (ProjectorConfig.copy_verdicts); and with the pointer,
    # its slot scores also read the answer's question, pooled, through a zero-initialised map
    # (ProjectorConfig.question_pointer): which run an answer copies is then one linear read of
    # the question's words. `visto compare` ships both (bench/README.md, "compare: yes/no
    # verdicts through the pointer"). Stage-1 options: the vision stage's checkpoint is built
    # without them and stage 1 adds their parameters to it (`stage1_init`), so turning one on
    # reruns stages 1 and 2, not the vision stage. On since runs/qp19 (bench/README.md,
    # "Question pointer and verdicts in the quickstart"): box -> description 0.086 -> 0.646,
    # relations 0.918 -> 0.972, every other figure within a question or two.
    copy_verdicts: bool = True
    question_pointer: bool = True
    # with the pointer: a JSON answer may copy, token by token, the JSON the connector writes
    # from its detections and what it read (ProjectorConfig.copy_json; connectors.script;
    # measured in bench/README.md, "Copied JSON" and "Detector boxes in the JSON labels")
    copy_json: bool = True
    # with copy_json: stage 2's JSON answers write each object's box as the frozen detector
    # finds it (where it matches the truth at IoU >= 0.5; RUN/stage2-boxes), so the pointer
    # is taught to copy the script's box numbers instead of the LM head to write its own
    # (bench/README.md, "Detector boxes in the JSON labels")
    detector_json_boxes: bool = True
    reader_steps: int = 1000
    decoder_width: int = 256
    decoder_layers: int = 4
    decoder_init: str = "mimetic"  # attention starts as a similarity (DecoderConfig.attention_init)
    vocab_size: int = 1024
    loc_bins: int = 100
    max_length: int = 512
    # 16: four times the steps of 64 for the same images (bench/README.md, "Quickstart")
    vision_batch: int = 16
    # Stage 1's training mix (visto.data.synth.mixes); stage 2's is stage2_mix. "look+copy":
    # short questions that name objects, plus a grounding and the OCR question whose answers copy
    # the focus slots, at 400 x 16 (bench/README.md, "Read slots, copies in stage 1").
    stage1_mix: str = "look+copy"
    stage1_batch: int = 16
    stage2_batch: int = 16
    # Stage 2's mix and truncation length (processor.max_length): "instruct+caption+prefixes" puts
    # system turns and instruction lines (short ones, JSON-schema format instructions, prose up
    # to ~900 tokens) in front of the questions of a share of the samples, so text in front of
    # a question does not turn its answer into the world's JSON (bench/README.md, "Text in
    # front of the question"); 1024 tokens holds a long prefix and a few exchanges. Long ones
    # come in blocks of 16 samples (data.synth.prefixes.PromptMix.block), one batch each at
    # stage2_batch 16; the others keep to 512 tokens as before.
    stage2_mix: str = "instruct+caption+prefixes"
    stage2_max_length: int = 1024
    vision_lr: float = 2e-3
    stage1_lr: float = 2e-3
    stage2_lr: float = 2e-3
    eval_images: int = 200  # first images of the test split, and of the held-out split
    eval_batch: int = 64
    # JSON answers: grammar-constrained to the world's schema (needs xgrammar) and this long.
    constrain_json: bool = True
    json_max_tokens: int = 320

    def validate(self) -> QuickstartConfig:
        problems = []
        if self.minutes is not None and self.minutes <= 0:
            problems.append(f"--minutes must be positive (or left out: no cap), got {self.minutes}")
        for name in ("vision_steps", "reader_steps", "stage1_steps", "stage2_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.size % self.patch_size:
            problems.append(f"--size {self.size} must be a multiple of patch_size {self.patch_size}")
        from visto.nn.vision import STEMS

        if self.vision_stem not in STEMS:
            problems.append(f"vision_stem must be one of {STEMS}, got {self.vision_stem!r}")
        if self.projector not in ("regions", "mlp", "pixel_shuffle"):
            problems.append(f"projector must be 'regions', 'mlp' or 'pixel_shuffle', got {self.projector!r}")
        if self.focus_slots not in (0, 4):
            problems.append(f"--focus-slots must be 0 or 4, got {self.focus_slots}")
        if self.read_slots < 0:  # without the focus's box slots they are not used (read_slots())
            problems.append(f"--read-slots must be 0 or more, got {self.read_slots}")
        if self.text_slots < 0:
            problems.append(f"--text-slots must be 0 or more, got {self.text_slots}")
        if self.vision_batch < 1:
            problems.append(f"--vision-batch must be at least 1, got {self.vision_batch}")
        from visto.data.synth.mixes import MIXES

        if self.stage1_mix not in MIXES:
            problems.append(f"--stage1-mix must be one of {', '.join(MIXES)}, got {self.stage1_mix!r}")
        if self.stage2_mix not in MIXES:
            problems.append(f"stage2_mix must be one of {', '.join(MIXES)}, got {self.stage2_mix!r}")
        if self.stage2_max_length < 1:
            problems.append(f"stage2_max_length must be at least 1, got {self.stage2_max_length}")
        if self.eval_images < 1:
            problems.append(f"eval_images must be at least 1, got {self.eval_images}")
        if problems:
            raise UserError("quickstart: " + "; ".join(problems))
        return self

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings that change a stage's output (a changed one reruns it and later ones)."""
        d = asdict(self)
        data_keys = ("n", "size", "seed")
        keys = {
            "data": data_keys,
            "vision": data_keys + ("vision_steps", "minutes", "vision_share", "patch_size", "vision_stem",
                                   "vision_width", "vision_layers", "vision_batch", "vision_lr",
                                   # the saved checkpoint holds a fresh connector and decoder too
                                   "projector", "slots", "box_tokens", "text_slots", "focus", "focus_slots",
                                   "read_slots", "pointer", "named", "box_nms", "count_width", "object_order", "copy_answers", "copy_json", "reader_steps",
                                   "decoder_width", "decoder_layers",
                                   "decoder_init", "vocab_size", "loc_bins", "max_length"),
        }  # fmt: skip
        if stage in keys:
            return {k: d[k] for k in keys[stage]}
        for k in STAGE1_OPTIONS:  # off is what runs stamped before these options ran with
            if not d[k]:
                d.pop(k)
        d.pop("workers")
        d.pop("threads")
        if stage == "stage1":  # stage 1 asks no JSON question, and reads neither stage-2 setting
            for k in ("detector_json_boxes", "stage2_mix", "stage2_max_length"):
                d.pop(k)
        if stage != "eval":
            for k in ("eval_images", "eval_batch", "constrain_json", "json_max_tokens"):
                d.pop(k)
        return d

    def stage_cap(self, stage: str) -> float | None:
        """The wall-clock cap (minutes) of a training stage: its share of `minutes`, or None."""
        share = {"vision": self.vision_share, "stage1": self.stage1_share, "stage2": self.stage2_share}
        return None if self.minutes is None else self.minutes * share[stage]


def pick_threads(requested: int) -> int:
    """Torch intra-op threads: `requested`, or (0) 1 on a busy machine and all cores otherwise."""
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return 1 if load >= cores else cores


def machine_load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


# ----------------------------------------------------------------------------- stage bookkeeping


def stage_done(stage_dir: Path, settings: dict[str, Any]) -> bool:
    try:
        done = json.loads((stage_dir / "done.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return done.get("settings") == settings


def mark_done(stage_dir: Path, settings: dict[str, Any], seconds: float, extra: dict | None = None) -> None:
    atomic_write_json(
        stage_dir / "done.json",
        {"settings": settings, "seconds": round(seconds, 2), "load": machine_load(), **(extra or {})},
    )


def stage_seconds(run_dir: Path) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        path = run_dir / ("world" if stage == "data" else stage) / "done.json"
        if stage == "eval":
            path = run_dir / "eval_done.json"
        try:
            out[stage] = float(json.loads(path.read_text())["seconds"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
    return out


# ----------------------------------------------------------------------------- stages


def run_data(cfg: QuickstartConfig, run_dir: Path, console: Any, fresh: bool) -> Path:
    """Render the world into RUN/world (reused when its settings match) and its contact sheet."""
    from visto.data.synth import WorldConfig
    from visto.data.synth.generate import generate_world_with_progress
    from visto.data.synth.show import show_world

    world_dir = run_dir / "world"
    wcfg = WorldConfig(n=cfg.n, seed=cfg.seed, size=cfg.size).validate()
    settings = cfg.stage_settings("data")
    if not fresh and world_is_current(world_dir, wcfg) and stage_done(world_dir, settings):
        console.print(f"[bold]data[/]: reusing {world_dir} (same settings)")
        return world_dir
    console.print(f"[bold]data[/]: rendering {wcfg.n} images of {wcfg.size} px into {world_dir}")
    t0 = time.perf_counter()
    generate_world_with_progress(wcfg, world_dir, cfg.workers)
    show_world(world_dir, world_dir / "show.png", split="train", n=12)
    mark_done(world_dir, settings, time.perf_counter() - t0)
    console.print(f"[bold]data[/]: contact sheet {world_dir / 'show.png'}")
    return world_dir


def world_is_current(world_dir: Path, wcfg: Any) -> bool:
    from visto.config import to_dict
    from visto.data.synth.config import WORLD_VERSION

    try:
        meta = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return meta.get("version") == WORLD_VERSION and meta.get("config") == to_dict(wcfg)


def llava_config(cfg: QuickstartConfig, vocab_size: int) -> Any:
    from visto.connectors.projector import ProjectorConfig
    from visto.data.processor import ProcessorConfig
    from visto.models.llava import LlavaConfig
    from visto.nn.language import DecoderConfig
    from visto.nn.vision import ViTConfig

    vision = ViTConfig(
        image_size=cfg.size, patch_size=cfg.patch_size, width=cfg.vision_width,
        layers=cfg.vision_layers, heads=4, mlp_hidden=4 * cfg.vision_width, stem=cfg.vision_stem,
    )  # fmt: skip
    pointer = cfg.pointer and focus_slots(cfg) > 0
    named = cfg.named and cfg.focus and cfg.projector == "regions"
    projector = ProjectorConfig(
        kind=cfg.projector, scale_factor=2, slots=cfg.slots, box_tokens=cfg.box_tokens,
        text_slots=cfg.text_slots if cfg.projector == "regions" else 0,
        focus=cfg.focus and cfg.projector == "regions", read_slots=read_slots(cfg),
        pointer=pointer, named=named,
        box_nms=cfg.box_nms if cfg.projector == "regions" else 0.0,
        count_width=cfg.count_width, object_order=cfg.object_order,
        copy_answers=cfg.copy_answers and named and pointer,
        copy_verdicts=cfg.copy_verdicts and cfg.copy_answers and named and pointer,
        question_pointer=cfg.question_pointer and pointer,
        copy_json=cfg.copy_json and pointer and cfg.projector == "regions",
    )  # fmt: skip
    patches = vision.num_patches
    decoder = DecoderConfig(
        vocab_size=vocab_size, hidden_size=cfg.decoder_width, num_layers=cfg.decoder_layers,
        num_heads=8, num_kv_heads=4, intermediate_size=3 * cfg.decoder_width,
        max_position_embeddings=max(2048, cfg.max_length), attention_init=cfg.decoder_init,
    )  # fmt: skip
    processor = ProcessorConfig(
        image_size=cfg.size, resize_mode="resize", image_tokens=projector.num_tokens(patches),
        image_delimiters=False, max_length=cfg.max_length, vocab_size=cfg.vocab_size,
        loc_bins=cfg.loc_bins, focus_tokens=focus_slots(cfg),
    )  # fmt: skip
    return LlavaConfig(
        vision=vision, vision_feature_layer=-1, projector=projector, decoder=decoder,
        processor=processor,
    )  # fmt: skip


def focus_slots(cfg: QuickstartConfig) -> int:
    """The processor's `<focus>` slots before each answer (ProcessorConfig.focus_tokens): the
    box's, then the read text's."""
    return cfg.focus_slots + read_slots(cfg) if cfg.focus and cfg.projector == "regions" else 0


def read_slots(cfg: QuickstartConfig) -> int:
    """`<focus>` slots of read text (ProjectorConfig.read_slots)."""
    return cfg.read_slots if cfg.focus and cfg.focus_slots and cfg.projector == "regions" else 0


def build_processor(cfg: QuickstartConfig, world_dir: Path) -> Any:
    """A tokenizer trained on the texts the model will read and write (loc tokens included,
    and `<focus>` when the model writes focus slots)."""
    from visto.data.processor import Processor, ProcessorConfig
    from visto.data.synth.mixes import tokenizer_texts
    from visto.data.tokenizer import with_focus_token

    texts = tokenizer_texts(world_dir, cfg.loc_bins)
    pcfg = ProcessorConfig(
        image_size=cfg.size, resize_mode="resize", image_tokens=1, image_delimiters=False,
        vocab_size=cfg.vocab_size, loc_bins=cfg.loc_bins,
    )  # fmt: skip
    tokenizer = Processor.train(texts, pcfg).tokenizer
    return with_focus_token(tokenizer) if focus_slots(cfg) else tokenizer


def run_reader(cfg: QuickstartConfig, world_dir: Path, console: Any, processor: Any = None) -> Any:
    """The connector's OCR reader, trained on the world's text boxes (visto.train.reader), on
    pixels normalised as `processor` (a ProcessorConfig) normalises them."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from visto.train.reader import load_reader_data, train_reader

    console.print(f"[bold]vision[/]: OCR reader (find lines + CTC), {cfg.reader_steps} steps at batch 16")
    train = load_reader_data(world_dir, "train", cfg.size)
    has_val = any(True for _ in open(world_dir / "val.jsonl"))  # noqa: SIM115
    val = load_reader_data(world_dir, "val", cfg.size) if has_val else None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("OCR reader", total=cfg.reader_steps, info="")
        result = train_reader(
            train, val, cfg.reader_steps, batch_size=16, seed=cfg.seed, processor=processor,
            on_step=lambda step, loss: progress.update(bar, completed=step, info=f"loss {loss:.3f}"),
        )  # fmt: skip
    exact = result.val.get("exact", float("nan"))
    console.print(f"[bold]vision[/]: OCR reader {result.seconds / 60:.1f} min, val exact {exact:.3f}")
    return result


def run_vision(cfg: QuickstartConfig, run_dir: Path, world_dir: Path, console: Any, fresh: bool) -> Path:
    """Dense pretraining of the ViT; saves a LLaVA checkpoint holding that tower (fresh
    projector and decoder) and the quickstart's processor: stage 1 starts from it."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.models.llava import Llava
    from visto.train.dense import load_dense_targets, pretrain_dense

    stage_dir = run_dir / "vision"
    settings = cfg.stage_settings("vision")
    if not fresh and stage_done(stage_dir, settings):
        console.print(f"[bold]vision[/]: reusing {stage_dir / 'checkpoint'}")
        return stage_dir / "checkpoint"
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    tokenizer = build_processor(cfg, world_dir)
    # Without the stage-1 options, whatever they are: the checkpoint depends on this stage's
    # settings alone, and stage 1 adds them (stage1_init).
    config = llava_config(replace(cfg, **dict.fromkeys(STAGE1_OPTIONS, False)), tokenizer.vocab_size)
    grid = cfg.size // cfg.patch_size
    cap = cfg.stage_cap("vision")
    console.print(
        f"[bold]vision[/]: dense pretraining of the ViT ({grid}x{grid} patches: shape, colour, "
        f"size, centre + box, characters), {cfg.vision_steps} steps at batch {cfg.vision_batch}"
        + (f", capped at {cap:.1f} min" if cap is not None else "")
    )
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())  # fmt: skip
    rows: list[dict] = []
    with Progress(*columns, console=console) as progress:
        n_train = sum(1 for _ in open(world_dir / "train.jsonl"))  # noqa: SIM115
        task = progress.add_task("reading images + masks", total=n_train, info="")
        train = load_dense_targets(world_dir, "train", grid,
                                   on_progress=lambda k: progress.update(task, completed=k))  # fmt: skip
        has_val = any(True for _ in open(world_dir / "val.jsonl"))  # noqa: SIM115
        val = load_dense_targets(world_dir, "val", grid) if has_val else None
        progress.update(task, visible=False)
        bar = progress.add_task("vision tower", total=1.0, info="")

        def on_step(step: int, fraction: float, loss: float) -> None:
            done = max(fraction, step / cfg.vision_steps)
            progress.update(bar, completed=done, info=f"step {step} loss {loss:.3f}")

        # Reading the split counts against a cap (~80 s for 4000 images on a busy machine):
        # a capped stage ends on time, whatever the disk and decoder cost.
        left = math.inf if cap is None else max(0.1, cap - (time.perf_counter() - t0) / 60)
        result = pretrain_dense(
            config.vision, train, val, minutes=left, max_steps=cfg.vision_steps,
            batch_size=cfg.vision_batch, lr=cfg.vision_lr, seed=cfg.seed, log=rows.append,
            on_step=on_step, processor=config.processor,
        )  # fmt: skip
    atomic_write_text(stage_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(cfg.seed)
    model = Llava(config)
    model.vision_tower.load_state_dict(result.vit.state_dict())
    if cfg.projector == "regions":  # the dense heads are the object detector of the tokens
        model.multi_modal_projector.heads.load_state_dict(result.heads.state_dict())
    if config.projector.text_slots or config.projector.read_slots:
        reader = run_reader(cfg, world_dir, console, config.processor)
        model.multi_modal_projector.reader.load_state_dict(reader.reader.state_dict())
        result.val.update({f"reader_{k}": v for k, v in reader.val.items()})
    model.processor = Processor(config.processor, tokenizer)
    budget = step_budget(result.steps, cfg.vision_steps, cap)
    card = {"data": str(world_dir), "training": {"stage": "dense vision pretraining", **budget,
            "batch_size": cfg.vision_batch, "minutes": round(result.seconds / 60, 2)},
            "metrics": result.val}  # fmt: skip
    save_checkpoint(model, stage_dir / "checkpoint", card=card)
    from visto.train.report import write_report

    write_report(stage_dir, {"name": "quickstart-vision", "description": "dense ViT pretraining"},
                 {**budget, "minutes": round(result.seconds / 60, 2)})  # fmt: skip
    mark_done(stage_dir, settings, time.perf_counter() - t0, {**budget, "val": result.val})
    print_cut(console, "vision", budget)
    console.print(
        f"[bold]vision[/]: {result.steps} steps; val patch accuracy shape "
        f"{result.val.get('shape_acc', math.nan):.3f}, colour {result.val.get('colour_acc', math.nan):.3f}, "
        f"characters {result.val.get('char_acc', math.nan):.3f}"
    )
    return stage_dir / "checkpoint"


def write_detector_boxes(checkpoint: Path, world_dir: Path, out: Path, console: Any, batch: int = 64) -> Path:
    """The boxes the checkpoint's frozen detector finds in every training image (present
    objects, ints 0..999, as its copied JSON writes them) -> `out`, JSON lines {"id", "boxes"}
    (the data.json_boxes of stage 2). The detector is frozen from the vision stage on, so these
    are the boxes the connector's JSON script holds for the image in training."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from visto.checkpoint import load
    from visto.connectors.script import world_boxes
    from visto.data.images import open_image
    from visto.data.synth.reader import iter_records

    model = load(checkpoint).eval()
    connector, embed = model.multi_modal_projector, model.language_model.model.embed_tokens
    records = list(iter_records(world_dir, "train"))
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with torch.no_grad(), Progress(*columns, console=console) as progress:
        bar = progress.add_task("detector boxes for the JSON answers", total=len(records))
        for at in range(0, len(records), batch):
            chunk = records[at : at + batch]
            pixels, _ = model.processor.pixel_values([open_image(world_dir / r["image"]) for r in chunk])
            objects = connector.objects(model.patch_features(pixels), embed)
            for b, record in enumerate(chunk):
                rows.append({"id": record["id"], "boxes": world_boxes(objects.boxes[b], objects.present[b])})
            progress.update(bar, completed=at + len(chunk))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def stage1_init(cfg: QuickstartConfig, run_dir: Path, vision_ckpt: Path, console: Any) -> Path:
    """The checkpoint stage 1 starts from: the vision stage's (`vision_ckpt`), or, where its
    connector's stage-1 options (STAGE1_OPTIONS) are not `cfg`'s, a copy with them set ->
    RUN/stage1-init. The copy keeps every weight the vision checkpoint holds (the trained tower,
    detector and reader, and the fresh connector and decoder: the same start as without the
    options); what the options add (the pointer's question map W_u, zero; the verdict run's
    keys, rows appended after the others') takes Llava's draw under `cfg.seed`. So the vision
    stage is not rerun for them, and a run gives the same model whether its vision stage was
    reused or not."""
    import torch

    from visto.checkpoint import load, read_config, save_checkpoint
    from visto.models.llava import Llava

    out = run_dir / "stage1-init"
    if out.exists():
        shutil.rmtree(out)
    if not (vision_ckpt / "config.json").is_file():
        return vision_ckpt  # nothing to read (the trainer says so)
    want = {k: getattr(llava_config(cfg, cfg.vocab_size).projector, k) for k in STAGE1_OPTIONS}
    projector = read_config(vision_ckpt)["config"].get("projector", {})
    if want == {k: projector.get(k, False) for k in STAGE1_OPTIONS}:
        return vision_ckpt
    old = load(vision_ckpt)
    config = replace(old.config, projector=replace(old.config.projector, **want))
    torch.manual_seed(cfg.seed)
    model = Llava(config)
    state, kept = model.state_dict(), old.state_dict()
    for name, value in state.items():
        if name not in kept:
            continue  # added by an option: the fresh draw
        if value.shape == kept[name].shape:
            value.copy_(kept[name])
        elif name.endswith("pointer.keys"):  # runs appended after the old ones: their rows fresh
            rows = min(len(value), len(kept[name]))
            old_runs, new_runs = old.multi_modal_projector.pointer.runs, model.multi_modal_projector.pointer.runs
            assert old_runs[: len(new_runs)] == new_runs[: len(old_runs)], (old_runs, new_runs)
            value[:rows].copy_(kept[name][:rows])
        else:
            raise UserError(f"stage1_init: {name} is {tuple(kept[name].shape)} in {vision_ckpt} but "
                            f"{tuple(value.shape)} with {want}")  # fmt: skip
    model.processor = getattr(old, "processor", None)
    on = ", ".join(k for k, v in want.items() if v) or "none"
    card = {"training": {"stage": f"{vision_ckpt} with the stage-1 connector options {want}"}}
    save_checkpoint(model, out, card=card)
    console.print(f"[bold]stage1[/]: starts from {vision_ckpt} with the connector options on: {on} ({out})")
    return out


def run_llava_stage(
    stage: str, cfg: QuickstartConfig, run_dir: Path, world_dir: Path, init: Path,
    console: Any, fresh: bool,
) -> Path:  # fmt: skip
    """LLaVA stage 1 or 2 through visto.train: the recipe quickstart-<stage> names its
    training mix (data.mix), so `visto train --recipe quickstart-<stage>` builds the same
    batches."""
    from visto.data.synth.mixes import get_mix
    from visto.train.loop import train
    from visto.train.recipe import load_recipe

    stage_dir = run_dir / stage
    settings = cfg.stage_settings(stage)
    if not fresh and stage_done(stage_dir, settings):
        console.print(f"[bold]{stage}[/]: reusing {stage_dir / 'checkpoint'}")
        return stage_dir / "checkpoint"
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    t0 = time.perf_counter()  # the stage's seconds include writing its JSON boxes
    if stage == "stage1":
        init = stage1_init(cfg, run_dir, init, console)
    boxes = None
    if stage == "stage2" and cfg.detector_json_boxes and cfg.copy_json and cfg.pointer and cfg.projector == "regions":
        boxes = write_detector_boxes(init, world_dir, run_dir / "stage2-boxes" / "train.jsonl", console)
    steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
    batch = cfg.stage1_batch if stage == "stage1" else cfg.stage2_batch
    lr = cfg.stage1_lr if stage == "stage1" else cfg.stage2_lr
    cap = cfg.stage_cap(stage)
    recipe = load_recipe(
        f"quickstart-{stage}",
        [
            f"model.init_from={json.dumps(str(init))}",
            f"data.source={json.dumps(str(world_dir))}",
            f"max_steps={steps}",
            f"max_minutes={json.dumps(cap)}",
            f"batch_size={batch}",
            f"optim.lr={lr}",
            f"seed={cfg.seed}",
            *([f"data.mix={json.dumps(cfg.stage1_mix)}"] if stage == "stage1" else []),
            *([f"data.mix={json.dumps(cfg.stage2_mix)}",
               f"processor.max_length={cfg.stage2_max_length}"] if stage == "stage2" else []),
            *([f"data.json_boxes={json.dumps(str(boxes))}"] if boxes is not None else []),
        ],
    )
    mix = get_mix(recipe.data.mix)
    if recipe.data.json_boxes is not None:
        console.print(f"[bold]{stage}[/]: JSON answers write the boxes of {recipe.data.json_boxes}")
    console.print(f"[bold]{stage}[/]: mix {mix.name!r} ({mix.description}), {steps} steps at batch {batch}"
                  + (f", capped at {cap:.1f} min" if cap is not None else ""))  # fmt: skip
    result = train(recipe, stage_dir, console=console)
    stop_if_interrupted(result, stage, console)
    budget = step_budget(result.step, steps, cap)
    mark_done(stage_dir, settings, time.perf_counter() - t0, {**budget, "data": mix.card()})
    print_cut(console, stage, budget)
    return stage_dir / "checkpoint"


def step_budget(steps: int, budget: int, cap: float | None) -> dict[str, Any]:
    """What a stage's done.json and card record of its budget: the steps reached, the step
    budget, and the steps the `minutes` cap cut from it."""
    return {"steps": steps, "budget_steps": budget, "minutes_cap": cap, "steps_cut": budget - steps}


def budget_sentence(cfg: QuickstartConfig, run_dir: Path) -> str:
    """The training budget in steps as the stages reached it, for the run's report."""
    parts = []
    for stage, budget in (("vision", cfg.vision_steps), ("stage1", cfg.stage1_steps), ("stage2", cfg.stage2_steps)):
        try:
            done = json.loads((run_dir / stage / "done.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            done = {}
        cut = done.get("steps_cut", 0)
        reached = f"{done['steps']} of {budget} (cut by the --minutes cap)" if cut > 0 else f"{budget}"
        parts.append(f"{stage} {reached}")
    cap = "no time cap" if cfg.minutes is None else f"capped at {cfg.minutes:g} min"
    return "training budget in steps: " + ", ".join(parts) + f" ({cap})"


def stop_if_interrupted(result: Any, stage: str, console: Any) -> None:
    """A stage that Ctrl-C stopped (its checkpoint saved) is not done: it is not marked so,
    and the interrupt goes on to the command (exit 130), so a second run trains it anew
    rather than reusing a model cut short."""
    if result.stopped_early:
        console.print(f"[bold yellow]{stage}[/]: stopped by Ctrl-C at step {result.step}; not marked "
                      "done, so the same command trains this stage again")  # fmt: skip
        raise KeyboardInterrupt


def print_cut(console: Any, stage: str, budget: dict[str, Any]) -> None:
    if budget["steps_cut"] > 0:
        console.print(
            f"[bold yellow]{stage}[/]: the --minutes cap ({budget['minutes_cap']:.1f} min for this "
            f"stage) stopped it at step {budget['steps']} of {budget['budget_steps']}: "
            f"{budget['steps_cut']} steps cut, so the model differs from the step budget's"
        )


# The blind twin of every figure: each test (held-out) image swapped for another test
# (held-out) image, so the report shows what the model gains from looking.
EVAL_BLIND = "swap"


def run_eval(cfg: QuickstartConfig, run_dir: Path, world_dir: Path, ckpt: Path, console: Any,
             fresh: bool) -> dict[str, float]:  # fmt: skip
    """Every task on the first `eval_images` test and held-out images, each answer the model's
    own; the JSON questions again under the world's grammar (json.constrained.*) when
    `constrain_json`; and every question again blind (blind.*, gain.*) -> RUN/eval.json."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from visto.checkpoint import load
    from visto.eval.generative import evaluate_generative_world, reportable_metrics
    from visto.tasks.runner import GenerateFn, make_constrained_generate, make_generate

    # The blind mode is in the stamp: an eval.json written before the blind twin is redone.
    settings = {**cfg.stage_settings("eval"), "blind": EVAL_BLIND}
    done_path = run_dir / "eval_done.json"
    if not fresh and (run_dir / "eval.json").is_file():
        try:
            if json.loads(done_path.read_text()).get("settings") == settings:
                console.print(f"[bold]eval[/]: reusing {run_dir / 'eval.json'}")
                return json.loads((run_dir / "eval.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    t0 = time.perf_counter()
    model = load(ckpt)
    model.eval()
    generate = make_generate(model, cfg.loc_bins, False, json_max_new_tokens=cfg.json_max_tokens)
    constrained = (
        make_constrained_generate(model, cfg.loc_bins, json_max_new_tokens=cfg.json_max_tokens)
        if cfg.constrain_json else None
    )  # fmt: skip
    tasks = ["vqa", "ground", "refdesc", "ocr", "json", "classify"]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress, torch.inference_mode():
        bar = progress.add_task("eval: questions answered", total=None)

        def counted(generate_fn: GenerateFn) -> GenerateFn:
            """`generate_fn` that moves the progress bar by the questions it answers."""

            def ask(samples: list[Sample]) -> list[str]:
                out = generate_fn(samples)
                progress.advance(bar, len(samples))
                return out

            return ask

        def log(msg: str) -> None:
            if msg.startswith("asking"):
                n = int(msg.split()[1])
                total = progress.tasks[0].total or 0
                progress.update(bar, total=total + n)

        result = evaluate_generative_world(
            counted(generate), world_dir, split="test", n=cfg.eval_images, tasks=tasks,
            batch_size=cfg.eval_batch, seed=cfg.seed, log=log,
            constrained_generate=counted(constrained) if constrained else None, blind=EVAL_BLIND,
        )  # fmt: skip
    metrics = reportable_metrics(result.metrics)
    atomic_write_json(run_dir / "eval.json", metrics)
    atomic_write_text(
        run_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in result.predictions)
    )
    atomic_write_json(done_path, {"settings": settings, "seconds": round(time.perf_counter() - t0, 2),
                                  "load": machine_load(), "notes": result.notes})  # fmt: skip
    return metrics


# ----------------------------------------------------------------------------- run summary

# (eval.json name, label, target or None). JSON figures are the model's own answers; the
# grammar-constrained ones stand beside them without a target (the grammar's, not the model's).
HEADLINE: list[tuple[str, str, float | None]] = [
    ("vqa.overall", "VQA overall", 0.95),
    ("count.acc", "counting", 0.95),
    ("ground.acc50", "grounding acc@0.5", 0.90),
    ("ocr.exact", "OCR exact", 0.90),
    ("pope.f1", "POPE F1", 0.95),
    ("json.valid", "JSON valid (own decoding)", 0.95),
    ("json.field_acc", "JSON fields (own decoding)", 0.90),
    ("json.constrained.valid", "JSON valid under the grammar", None),
    ("json.constrained.field_acc", "JSON fields under the grammar", None),
]
# The blind twin's VQA must stay at the level of answering from the question alone.
BLIND_VQA_CEILING = 0.45


def merge_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every stage's metrics rows in one list, with "stage" and a run-wide "elapsed_s"."""
    from visto.train.report import read_metrics

    rows, offset = [], 0.0
    seconds = stage_seconds(run_dir)
    for stage in ("vision", "stage1", "stage2"):
        stage_rows = read_metrics(run_dir / stage / "metrics.jsonl")
        for r in stage_rows:
            rows.append({**r, "stage": stage, "run_elapsed_s": round(offset + r.get("elapsed_s", 0), 2)})
        offset += seconds.get(stage, 0.0)
    return rows


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Training loss of every stage against run-wide minutes: one learning-curve figure."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visto.utils.io import save_figure

    train_rows = [r for r in rows if r.get("split") == "train" and "loss" in r]
    if not train_rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for stage in ("vision", "stage1", "stage2"):
        rs = [r for r in train_rows if r["stage"] == stage]
        if rs:
            axes[0].plot([r["run_elapsed_s"] / 60 for r in rs], [r["loss"] for r in rs], label=stage)
    axes[0].set_xlabel("minutes into training")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    for key, label in (("shape_acc", "vision: patch shape"), ("colour_acc", "vision: patch colour"),
                       ("char_acc", "vision: characters"), ("token_acc", "LLaVA: answer tokens")):  # fmt: skip
        rs = [r for r in train_rows if isinstance(r.get(key), (int, float))]
        if rs:
            axes[1].plot([r["run_elapsed_s"] / 60 for r in rs], [r[key] for r in rs], label=label)
    axes[1].set_xlabel("minutes into training")
    axes[1].set_ylabel("training accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_figures(metrics: dict[str, float], out: Path) -> Path | None:
    """Headline figures, test vs held-out vs the blind twin on test, against their targets."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visto.utils.io import save_figure

    names = [(k, label, target) for k, label, target in HEADLINE if k in metrics]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    xs = range(len(names))
    ax.bar([x - 0.27 for x in xs], [metrics[k] for k, _, _ in names], 0.27, label="test")
    ax.bar(list(xs), [metrics.get("heldout." + k, 0) for k, _, _ in names], 0.27,
           label="held-out pairs")  # fmt: skip
    ax.bar([x + 0.27 for x in xs], [metrics.get("blind." + k, 0) for k, _, _ in names], 0.27,
           label="blind (test, images swapped)", color="#9D9D9D")  # fmt: skip
    targets = [(x, t) for x, (_, _, t) in zip(xs, names, strict=True) if t is not None]
    ax.scatter([x for x, _ in targets], [t for _, t in targets], marker="_", s=400, color="black",
               label="target")  # fmt: skip
    ax.set_xticks(list(xs), [label for _, label, _ in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, out)


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def headline_table(cfg: QuickstartConfig, metrics: dict[str, float]) -> list[str]:
    """The report's headline rows: each figure on test beside its blind twin and the gain,
    then on the held-out pairs, and its target; a line on the blind VQA ceiling."""
    lines = [f"Evaluated on the first {cfg.eval_images} test and held-out images. Blind: the same "
             "questions with each image swapped for another image of its split (never its own); "
             "gain = figure - blind, what the model gains from looking.", "",
             "| figure | test | blind | gain | held-out pairs | held-out blind | target |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, label, target in HEADLINE:
        if key in metrics:
            cells = [metrics[key], metrics.get("blind." + key), metrics.get("gain." + key),
                     metrics.get("heldout." + key), metrics.get("blind.heldout." + key)]  # fmt: skip
            lines.append(f"| {label} (`{key}`) | " + " | ".join(_figure(v) for v in cells)
                         + f" | {'' if target is None else f'{target:g}'} |")  # fmt: skip
    blind_vqa = metrics.get("blind.vqa.overall")
    if blind_vqa is not None:
        verdict = "within" if blind_vqa <= BLIND_VQA_CEILING else "above"
        lines += ["", f"Blind VQA {blind_vqa:.3f}: {verdict} the ceiling of {BLIND_VQA_CEILING:g} "
                  "(a figure the blind model reaches too says nothing about vision)."]  # fmt: skip
    return lines


def write_run_report(cfg: QuickstartConfig, run_dir: Path, metrics: dict[str, float]) -> Path:
    """RUN/metrics.jsonl (all stages), RUN/plots/*.png and RUN/report.md."""
    from visto.eval.report import metrics_table

    rows = merge_metrics(run_dir)
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    curves = plot_curves(rows, run_dir / "plots" / "curves.png")
    figures = plot_figures(metrics, run_dir / "plots" / "figures.png")
    seconds = stage_seconds(run_dir)
    lines = ["# visto quickstart", "",
             f"Synthetic world of {cfg.n} images ({cfg.size} px), seed {cfg.seed}; "
             f"{budget_sentence(cfg, run_dir)}; {machine_load()} when the report was written.",
             "", "## Figures", ""]  # fmt: skip
    lines += headline_table(cfg, metrics)
    lines += ["", "Every figure (also in `eval.json`; blind and gain as `blind.<name>`, "
              "`gain.<name>`):", "", metrics_table(metrics)]  # fmt: skip
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {v:.1f} |" for s, v in seconds.items()]
    lines.append(f"| total | {sum(seconds.values()):.1f} |")
    lines.append("")
    if figures:
        lines += ["![figures](plots/figures.png)", ""]
    if curves:
        lines += ["## Learning curves", "", "![curves](plots/curves.png)", ""]
    for stage in ("vision", "stage1", "stage2"):
        if (run_dir / stage / "report.md").is_file():
            lines.append(f"- {stage}: [{stage}/report.md]({stage}/report.md)")
    lines += ["", "Per-question answers: `predictions.jsonl`. Final model: `checkpoint/`.", "",
              "## Settings", "", "```json", json.dumps(asdict(cfg), indent=2), "```", ""]  # fmt: skip
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))


def _done_stamps(run_dir: Path) -> list[str]:
    """The done.json of every training stage as text: any change means a stage just ran."""
    out = []
    for d in ("world", "vision", "stage1", "stage2"):
        path = run_dir / d / "done.json"
        out.append(path.read_text() if path.is_file() else "")
    return out


@dataclass
class QuickstartResult:
    run_dir: Path
    checkpoint: Path
    report: Path
    metrics: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


def run_quickstart(cfg: QuickstartConfig, run_dir: str | Path, *, fresh: bool = False,
                   console: Any = None, until: str = "eval") -> QuickstartResult:  # fmt: skip
    """The whole pipeline into `run_dir` (stages already done with the same settings are kept);
    `until` stops after that stage (one of STAGES)."""
    import torch
    from rich.console import Console

    cfg.validate()
    if until not in STAGES:
        raise UserError(f"--until must be one of {', '.join(STAGES)}, got {until!r}")
    console = console or Console()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = pick_threads(cfg.threads)
    torch.set_num_threads(threads)
    console.print(f"[bold]quickstart[/]: {run_dir}, {threads} torch thread(s), {machine_load()}")
    atomic_write_json(run_dir / "config.json", asdict(cfg))
    # A stage that runs makes every later stage stale: `fresh` grows as the pipeline goes.
    before = _done_stamps(run_dir)
    world_dir = run_data(cfg, run_dir, console, fresh)
    if until == "data":
        return QuickstartResult(run_dir, world_dir, world_dir / "show.png", {}, stage_seconds(run_dir))
    fresh = fresh or _done_stamps(run_dir) != before
    vision = run_vision(cfg, run_dir, world_dir, console, fresh)
    if until == "vision":
        return QuickstartResult(run_dir, vision, vision / "README.md", {}, stage_seconds(run_dir))
    fresh = fresh or _done_stamps(run_dir) != before
    stage1 = run_llava_stage("stage1", cfg, run_dir, world_dir, vision, console, fresh)
    if until == "stage1":
        return QuickstartResult(run_dir, stage1, run_dir / "stage1" / "report.md", {},
                                stage_seconds(run_dir))  # fmt: skip
    fresh = fresh or _done_stamps(run_dir) != before
    stage2 = run_llava_stage("stage2", cfg, run_dir, world_dir, stage1, console, fresh)
    fresh = fresh or _done_stamps(run_dir) != before
    final = run_dir / "checkpoint"
    if fresh or not (final / "model.safetensors").is_file():
        with atomic_directory(final) as tmp:
            shutil.copytree(stage2, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("trainer_state.pt"))  # fmt: skip
    metrics = run_eval(cfg, run_dir, world_dir, final, console, fresh)
    report = write_run_report(cfg, run_dir, metrics)
    return QuickstartResult(run_dir, final, report, metrics, stage_seconds(run_dir))


__all__ = [
    "HEADLINE",
    "QuickstartConfig",
    "QuickstartResult",
    "pick_threads",
    "run_quickstart",
    "write_run_report",
]
