"""A recipe: everything one training run needs, as a typed, nested dataclass.

Recipes live as JSON (`src/visto/train/recipes/NAME.json`, or any path) and are tweaked from
the command line with `--set a.b=value`. Unknown keys are errors, so a typo never silently
trains with a default. The resolved recipe is printed at the start of a run and saved as
`RUN/config.json`, which is what `--resume` reads back.

Training stages (pretrain the connector, then fine-tune everything) are recipes that differ
in `optim.module_lrs` (0 = frozen), `data` and `model.init_from`, not separate programs.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visto.config import from_dict, to_dict
from visto.errors import UserError
from visto.nn.lora import LoraConfig

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelSpec:
    family: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the family's config fields
    # Start from this checkpoint's weights (and config) instead of a fresh init: stage 2
    # starts from stage 1. `config` is then ignored.
    init_from: str | None = None
    # Which of the family's training objectives the run computes, for a family with several
    # (BLIP-2: "representation", stage 1's ITC/ITM/ITG; "generative", stage 2's LM loss; see
    # visto.train.objective). None = the one the model's config implies (its only one).
    objective: str | None = None


@dataclass
class SourceSpec:
    """One dataset: where it is and how to read it."""

    # A dataset path: a synthetic-world directory, LLaVA JSON, COCO, WebDataset, parquet.
    source: str = ""
    format: str | None = None  # None = detect from the path; see visto.data.formats
    # The synthetic world has splits and tasks ("vqa", "caption", ...; None = its default).
    split: str = "train"
    val_split: str | None = "val"  # None = no evaluation
    tasks: list[str] | None = None
    # A training mix of the synthetic world instead of one sample per task item: one sample
    # per image holding the mix's exchanges ("captions", "instruct", "instruct+caption"; see
    # visto.data.synth.mixes). The mix names its own tasks, so data.tasks stays null.
    mix: str | None = None
    # With a mix: a JSON-lines file of boxes per training image ({"id", "boxes": 0..999}) that
    # its JSON answers write in place of the truth's where one matches (IoU >= 0.5): the
    # quickstart writes its frozen detector's boxes there for a connector that copies the JSON
    # its detector writes (visto.data.synth.tasks.with_json_boxes).
    json_boxes: str | None = None
    # Real formats hold one split per file: validation data is another path (None = none).
    val_source: str | None = None
    # Where LLaVA JSON / COCO image paths point (LLaVA's --image_folder); None = beside the JSON.
    image_root: str | None = None
    # Field, column or WebDataset extension names of your data (None = the usual names:
    # "caption"/"text"/"captions" or a .txt file; "image"/"images" or .png/.jpg/...).
    caption_key: str | None = None
    image_key: str | None = None


@dataclass
class WeightedSource(SourceSpec):
    """One dataset of a mixture (data.sources). Its weight is its share of the training
    samples drawn, relative to the others' (3 and 1: three samples in four from the first)."""

    weight: float = 1.0
    # Old data replayed against forgetting: what data.replay turned into a source.
    replay: bool = False


REPLAY_FROM_CHECKPOINT = "init_from"


@dataclass
class ReplaySpec:
    """Old data mixed into fine-tuning so that the model keeps what it knew (data.replay).

    Fine-tuned on new data alone, a model forgets its old tasks (bench/README.md, "LoRA
    fine-tuning": the quickstart's VQA 0.69 -> 0.30 after 300 LoRA steps on new questions);
    LLaVA's instruction mix carries general data beside the task data for the same reason.
    `share` of the training samples are drawn from the old data, the rest from the new.

    `source`: "init_from" (the default) replays what the `model.init_from` checkpoint was
    trained on, as its card records it (the quickstart's: its world, in its stage-2 mix);
    or the path of a dataset in any format, read with the settings below as data.source is.
    The recipe's resolved form (RUN/config.json, the checkpoint card) lists the old data as a
    source of data.sources with `replay: true` and a weight that gives it `share`.

    `whole_mix`: a checkpoint trained on a world mix (the quickstart's stage 2: every task of an
    image in one sample, ~500 tokens) is replayed one exchange per sample, the mix's tasks, so
    that an old sample costs what a new one does (false, the default); true replays the mix's
    samples whole (a LoRA step at share 0.5 took 7x as long: bench/README.md).
    """

    share: float = 0.5
    source: str = REPLAY_FROM_CHECKPOINT
    whole_mix: bool = False
    format: str | None = None
    split: str = "train"
    tasks: list[str] | None = None
    mix: str | None = None
    image_root: str | None = None
    caption_key: str | None = None
    image_key: str | None = None


@dataclass
class DataSpec(SourceSpec):
    # Several datasets mixed by weight instead of one (LLaVA's mix665k is such a mixture):
    # [{"source": "a.json", "image_root": "images/", "weight": 3}, {"source": "b.parquet"}].
    # data.source and the per-dataset settings then stay unset here: each source has its own.
    sources: list[WeightedSource] | None = None
    # Old data mixed in against forgetting (a ReplaySpec: its share of the samples, and where
    # the old data is); None = the new data alone. Resolved into one more source of
    # data.sources when the recipe is read.
    replay: ReplaySpec | None = None
    # Samples held for shuffling (>= dataset size: a full shuffle). Each epoch starts by
    # reading this many, so a larger buffer shuffles better but stalls longer.
    shuffle_buffer: int = 1024
    # Batches read, decoded and collated ahead of the training step by a worker process, so
    # that data work overlaps the step (bench/README.md, "Data loading"); 0 = in the training
    # process, between steps. The batches are the same either way.
    prefetch: int = 2


# The settings of one dataset that a mixture's sources set each for itself.
PER_SOURCE = ("source", "format", "tasks", "mix", "json_boxes", "val_source", "image_root",
              "caption_key", "image_key")  # fmt: skip


def source_problems(spec: SourceSpec, where: str) -> list[str]:
    """What is wrong with one dataset's settings (`where`: "data" or "data.sources[i]")."""
    problems = []
    if spec.mix is not None:
        from visto.data.synth.mixes import MIXES

        if spec.mix not in MIXES:
            problems.append(f"unknown {where}.mix {spec.mix!r}; choose one of {', '.join(MIXES)}")
        elif spec.tasks is not None:
            problems.append(
                f"{where}.mix {spec.mix!r} names its own tasks "
                f"({', '.join(MIXES[spec.mix].tasks)}); set {where}.tasks to null"
            )
    if getattr(spec, "json_boxes", None) is not None and spec.mix is None:  # a ReplaySpec has none
        problems.append(f"{where}.json_boxes rewrites the JSON answers of a world mix: set {where}.mix "
                        f"(e.g. instruct+caption) or set {where}.json_boxes to null")  # fmt: skip
    return problems


def finish_problems(finish: FinishSpec, model: ModelSpec) -> list[str]:
    problems = []
    if finish.export is not None and finish.export not in FINISH_EXPORTS:
        problems.append(f"finish.export must be one of {', '.join(FINISH_EXPORTS)} or null, "
                        f"got {finish.export!r}")  # fmt: skip
    if finish.eval_n < 1:
        problems.append(f"finish.eval_n must be >= 1, got {finish.eval_n}")
    if finish.eval_start and not (finish.eval_source and model.init_from):
        problems.append("finish.eval_start scores the model.init_from checkpoint on "
                        "finish.eval_source: set both, or set eval_start to false")  # fmt: skip
    if finish.eval_image_root is not None and finish.eval_source is None:
        problems.append("finish.eval_image_root is set but finish.eval_source is not")
    return problems


def data_problems(data: DataSpec) -> list[str]:
    """What is wrong with a recipe's data section: its one dataset, or its mixture."""
    if data.prefetch < 0:
        return [f"data.prefetch is the number of batches prepared ahead (0 = none), got {data.prefetch}"]
    if data.sources is None:
        return source_problems(data, "data")
    if not data.sources:
        return ["data.sources is empty: name at least one dataset, or use data.source"]
    problems = []
    set_here = [name for name in PER_SOURCE if getattr(data, name) not in (None, "")]
    if set_here:
        problems.append(
            f"data.sources mixes datasets that each carry their own settings; "
            f"{', '.join('data.' + n for n in set_here)} belong in each source (or leave "
            "data.sources null for one dataset)"
        )
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}]"
        if not source.source:
            problems.append(f"{where}.source is not set: give the dataset's path")
        if not (source.weight > 0 and math.isfinite(source.weight)):
            problems.append(f"{where}.weight must be a positive number, got {source.weight}")
        problems += source_problems(source, where)
    return problems


def replay_problems(data: DataSpec, model: ModelSpec) -> list[str]:
    """What is wrong with data.replay's settings (the data itself is checked when resolved)."""
    replay = data.replay
    if replay is None:
        return []
    problems = []
    if not (isinstance(replay.share, (int, float)) and 0 < replay.share < 1):
        problems.append(f"data.replay.share is the fraction of training samples drawn from the "
                        f"old data, in (0, 1) (or data.replay null: none), got {replay.share!r}")  # fmt: skip
    if not replay.source:
        problems.append(f"data.replay.source is not set: {REPLAY_FROM_CHECKPOINT!r} (what "
                        "model.init_from was trained on) or a dataset path")  # fmt: skip
    elif replay.source == REPLAY_FROM_CHECKPOINT:
        if not model.init_from:
            problems.append("data.replay.source 'init_from' replays what model.init_from was "
                            "trained on: set model.init_from, or give data.replay.source a "
                            "dataset path")  # fmt: skip
        own = [n for n in ("format", "tasks", "mix", "image_root", "caption_key", "image_key")
               if getattr(replay, n) is not None]  # fmt: skip
        if own:
            problems.append(f"data.replay.{own[0]} applies to a dataset path; with source "
                            "'init_from' the checkpoint's card says how its data was read")  # fmt: skip
    else:
        problems += source_problems(replay, "data.replay")  # type: ignore[arg-type]
    if any(s.replay for s in data.sources or []):
        problems.append("data.replay is already resolved into data.sources (the source marked "
                        "replay true): change that source's weight, or start a new run")  # fmt: skip
    return problems


def replay_waits_for_checkpoint(data: DataSpec, model: ModelSpec) -> bool:
    """data.replay replays what model.init_from was trained on, and there is nothing at
    model.init_from yet (resolved by `train`, which stops with a UserError if still so)."""
    return (data.replay is not None and data.replay.source == REPLAY_FROM_CHECKPOINT
            and model.init_from is not None and not Path(model.init_from).exists())  # fmt: skip


def resolve_replay(data: DataSpec, model: ModelSpec) -> DataSpec:
    """`data` with data.replay turned into sources of data.sources (see ReplaySpec): the new
    datasets keep their settings and relative weights, the old ones get `replay.share` of
    the samples. Reads the init_from checkpoint's card; a UserError when the old data is not
    there. Without data.replay, `data` as it is."""
    import dataclasses

    from visto.config import from_dict
    from visto.train.mixture import trained_on, with_replay

    replay = data.replay
    if replay is None:
        return data
    if data.sources is not None:
        new = [to_dict(s) for s in data.sources]
    else:
        fields = [f.name for f in dataclasses.fields(SourceSpec)]
        new = [{name: getattr(data, name) for name in fields} | {"weight": 1.0}]
    if replay.source == REPLAY_FROM_CHECKPOINT:
        assert model.init_from is not None
        old = trained_on(model.init_from, whole_mix=replay.whole_mix)
    else:
        if not Path(replay.source).exists():
            raise UserError(f"data.replay.source {replay.source} does not exist; fix the path, "
                            "or set data.replay to null")  # fmt: skip
        old = [{k: v for k, v in to_dict(replay).items() if k not in ("share", "whole_mix")}]
    sources = [from_dict(WeightedSource, s, where=f"data.sources[{i}]")
               for i, s in enumerate(with_replay(new, old, replay.share))]  # fmt: skip
    cleared = {name: (None if name != "source" else "") for name in PER_SOURCE}
    return dataclasses.replace(data, **cleared, sources=sources, replay=None)


@dataclass
class ProcessorSpec:
    """The processor (image transform + tokenizer) a fresh model is given.

    `path`: an existing processor directory (processor.json + tokenizer.json). Otherwise a new
    one with `config` (visto.data.processor.ProcessorConfig fields), its tokenizer trained on
    the texts of the first `tokenizer_samples` training samples (deterministic).

    `max_length`: training's truncation length, set on whichever processor the run trains
    with. A section with neither `path` nor `config` keeps the model's own processor (the
    `model.init_from` checkpoint's, a resumed run's) and changes only this, so that
    `--set processor.max_length=1024` lets a fine-tune see longer samples than its starting
    checkpoint was trained on; the saved checkpoint's processor.json carries the new value.

    Image normalisation follows the model's vision tower (`train.data.model_normalisation`): a
    section that sets no `image_mean`/`image_std` takes the tower's, and one that sets others
    is refused.
    """

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer_samples: int = 5000
    max_length: int | None = None

    @property
    def keeps_model_processor(self) -> bool:
        """True when the section only changes the model's own processor (see above)."""
        return not self.path and not self.config


def processor_problems(spec: ProcessorSpec | None) -> list[str]:
    if spec is None or spec.max_length is None:
        return []
    n = spec.max_length
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return [f"processor.max_length must be a whole number of tokens >= 1 (or null: the "
                f"processor's own), got {n!r}"]  # fmt: skip
    return []


@dataclass
class OptimSpec:
    lr: float = 1e-3
    # {"module.prefix": lr}: the longest matching prefix of a parameter's name sets its lr.
    # lr 0 freezes: requires_grad False, no gradient and no optimizer state.
    module_lrs: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.1  # on matrices only; biases, norms and gains are not decayed
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping


@dataclass
class ScheduleSpec:
    # Linear warmup, then a cosine from each group's lr down to min_lr_ratio x that lr
    # (Loshchilov & Hutter 2017, SGDR, without restarts).
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


FINISH_EXPORTS = ("visto", "hf")


@dataclass
class FinishSpec:
    """What `visto train` does with the final checkpoint, on the main process."""

    # A held-out dataset in any format that `visto eval --data` scores the checkpoint on:
    # RUN/eval.json, predictions.jsonl and report.md's figures. None = no evaluation.
    eval_source: str | None = None
    eval_image_root: str | None = None  # where its image paths point (LLaVA JSON, COCO)
    eval_n: int = 200  # its first samples
    # Also score the model training started from (model.init_from), into RUN/eval-start/,
    # so that what training changed is measured on the same questions.
    eval_start: bool = False
    # "visto": RUN/export, a visto checkpoint with LoRA merged into its weights; "hf": a
    # transformers directory (LoRA merged; `visto export --help` says which models can).
    export: str | None = None


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    # None = the model needs none, or brings its own (a checkpoint's, a config's processor_dir).
    processor: ProcessorSpec | None = None
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    # Parameter-efficient fine-tuning: LoRA adapters on the named modules; everything else
    # (but `lora.trainable`) is frozen. None = train the model's own weights.
    lora: LoraConfig | None = None
    finish: FinishSpec = field(default_factory=FinishSpec)
    batch_size: int = 32  # samples per optimizer step on each process (all micro-batches)
    grad_accum: int = 1  # micro-batches per step; each holds batch_size / grad_accum samples
    # The budget is max_steps: the same seed gives the same model on any machine. max_minutes
    # is an optional cap (training stops at whichever comes first): under it the schedule's
    # progress is the larger of step / max_steps and elapsed / max_minutes, so the cosine
    # reaches its floor when the clock runs out (Li et al. 2020, "Budgeted Training"), and a
    # run it stops early reports the steps it cut.
    max_steps: int | None = 1000
    max_minutes: float | None = None
    log_every: int = 10
    eval_every: int | None = 100  # None = only at the end
    eval_batches: int = 8
    checkpoint_every: int | None = None  # None = only at the end
    keep_checkpoints: int = 2  # step_N directories kept under RUN/checkpoints
    seed: int = 0
    # Under torchrun: "ddp" replicates the model on every process, "fsdp" shards parameters,
    # gradients and optimizer state over them (FSDP2). One process ignores it.
    distributed: str = "ddp"
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    device: str | None = None  # None = cuda if present, else cpu

    def __post_init__(self) -> None:
        if self.finish is None:  # `--set finish=null`: nothing after training (no eval, no export)
            self.finish = FinishSpec()
        problems = []
        if not self.model.family and not self.model.init_from:
            problems.append("model.family (or model.init_from) must be set")
        if self.max_steps is None and self.max_minutes is None:
            problems.append("set max_steps or max_minutes (or both): a run needs a budget")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.grad_accum < 1 or self.batch_size < 1:
            problems.append("batch_size and grad_accum must be >= 1")
        elif self.batch_size % self.grad_accum:
            problems.append(
                f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"
            )
        for name, lr in {"optim.lr": self.optim.lr, **self.optim.module_lrs}.items():
            if lr < 0:
                problems.append(f"learning rate for {name!r} must be >= 0, got {lr}")
        problems += data_problems(self.data)
        problems += replay_problems(self.data, self.model)
        problems += processor_problems(self.processor)
        problems += finish_problems(self.finish, self.model)
        if self.distributed not in ("ddp", "fsdp"):
            problems.append(f'distributed must be "ddp" or "fsdp", got {self.distributed!r}')
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            problems.append("schedule.min_lr_ratio must be in [0, 1]")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (or null), got {value}")
        if problems:
            raise UserError(f"recipe {self.name or '(unnamed)'}: " + "; ".join(problems))
        # The resolved recipe (RUN/config.json, what --resume reads) names the replayed data.
        # A shipped recipe names a start that may not exist yet (llava-lora's
        # runs/quickstart/checkpoint): it still parses, and `train` resolves the replay (or
        # says what is missing) before it starts.
        if not replay_waits_for_checkpoint(self.data, self.model):
            self.data = resolve_replay(self.data, self.model)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


def list_recipes() -> dict[str, str]:
    """Shipped recipe names -> their one-line descriptions."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text()).get("description", "")
        except json.JSONDecodeError:
            out[path.stem] = "(invalid JSON)"
    return out


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe by name ("clip-synth"), or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.json"
    if not shipped.is_file():
        names = ", ".join(list_recipes()) or "(none)"
        raise UserError(
            f"no recipe named {name_or_path!r}; shipped recipes: {names} (or pass a JSON path)"
        )
    return shipped


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-4' -> (['optim', 'lr'], 0.0003). Values are JSON when they parse, else strings.

    Keys under optim.module_lrs may themselves contain dots:
    'optim.module_lrs.vision.encoder=0' sets the prefix 'vision.encoder'.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects key=value (e.g. optim.lr=3e-4), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.strip().split(".")
    if parts[:2] == ["optim", "module_lrs"] and len(parts) > 3:
        parts = parts[:2] + [".".join(parts[2:])]
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the recipe dict with each 'a.b=value' applied (validated later by from_dict)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: {'.'.join(parts[: i + 1])} is not a group of settings")
            node = child
        node[parts[-1]] = value
    return data


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | None = None, where: str = "recipe") -> Recipe:
    return from_dict(Recipe, apply_overrides(data, overrides or []), where=where)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"recipe {path} is not valid JSON: {e}") from None
    data.setdefault("name", path.stem)
    return recipe_from_dict(data, overrides, where=f"recipe {path.name}")


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return to_dict(recipe)
