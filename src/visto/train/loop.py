"""The one training loop. Every family and every stage trains through `train(recipe, run_dir)`.

Read it top to bottom (in the spirit of nanoGPT's train.py and torchtitan's trainer):

    setup      seed, threads, device, model (fresh, from a checkpoint, or resumed), frozen
               modules and per-module learning rates, AdamW, data streams
    loop       train_step (forward, loss / grad_accum, backward, clip, step), the lr schedule,
               a metrics row every log_every steps, evaluation every eval_every steps,
               a checkpoint every checkpoint_every steps
    finish     final evaluation, final checkpoint, plots and report.md

`train` is those three parts in order: `_setup` builds the `RunState` (everything the run
holds between steps), `_loop` steps it, and the finish evaluates, saves and reports; each
step of them is a plain function of the state.

Helpers live beside it: `optim.py` (per-module lrs, schedule), `data.py` (the batch stream),
`distributed.py` (torchrun), `report.py` (plots), `recipe.py` (the settings).

A run is a directory:
    RUN/config.json          the resolved recipe (what --resume reads back)
    RUN/metrics.jsonl        one JSON object per log step / evaluation
    RUN/checkpoints/step_N   periodic checkpoints (the last keep_checkpoints are kept)
    RUN/checkpoint           the latest (at the end: final) checkpoint, with trainer_state.pt
    RUN/report.md, RUN/plots/*.png

Models are written for one device. Under torchrun (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel from outside (or sharded with FSDP2: recipe `distributed: "fsdp"`,
`fsdp.py`) and each rank reads its own shard of the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visto.checkpoint import (
    is_checkpoint,
    load,
    load_trainer_state,
    save_checkpoint,
)
from visto.config import format_config, to_dict
from visto.device import pick_device
from visto.errors import UserError
from visto.nn.lora import apply_lora, has_lora
from visto.pretrained import build_model
from visto.train.data import (
    BatchStream,
    PrefetchedBatches,
    SampleSource,
    data_card,
    first_batches,
    needs_loc_bins,
    run_processor,
    source_from_spec,
    training_loc_bins,
)
from visto.train.distributed import (
    Distributed,
    all_reduce_sums,
    barrier,
    gather_objects,
    init_distributed,
)
from visto.train.objective import fsdp_root, loss_module, select_objective
from visto.train.optim import build_optimizer, lr_factor, schedule_progress, set_lr
from visto.train.recipe import Recipe, recipe_from_dict, resolve_replay
from visto.train.report import write_report
from visto.utils.io import atomic_directory, atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------- steps


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def scalar_outputs(out: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a forward's output ("loss", "acc", ...) as floats."""
    scalars = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            scalars[k] = float(v.detach().float())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            scalars[k] = float(v)
    return scalars


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # fp32 weights everywhere; bf16 matmuls on GPU only (bf16 is ~50x slower on our CPUs).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, Any]],
    grad_clip: float | None,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns mean scalars.

    Each micro-batch's loss is divided by their number, so accumulating k micro-batches of
    B samples gives the gradient of one batch of k*B (for losses that are means over samples).
    """
    sums: dict[str, float] = {}
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        # Under DDP and FSDP only the last micro-batch reduces gradients.
        last = i == n - 1
        if hasattr(fsdp_root(model), "set_requires_gradient_sync"):  # FSDP2
            fsdp_root(model).set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device):
                out = model(to_device(batch, device))
            assert "loss" in out and out["loss"].ndim == 0, "forward must return a scalar 'loss'"
            (out["loss"] / n).backward()
        for k, v in scalar_outputs(out).items():
            sums[k] = sums.get(k, 0.0) + v / n
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # clip_grad_norm_ with max_norm=inf only measures: the norm is worth logging either way.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the shards
        grad_norm = grad_norm.full_tensor()
    sums["grad_norm"] = float(grad_norm)
    return sums


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[dict[str, Any]], device: torch.device, dist_info: Distributed
) -> dict[str, float]:
    """Scalar outputs averaged over the evaluation batches (weighted by batch size), all ranks."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0.0
    for batch in batches:
        size = batch_size_of(batch)
        with autocast(device):
            out = model(to_device(batch, device))
        for k, v in scalar_outputs(out).items():
            sums[k] = sums.get(k, 0.0) + v * size
        count += size
    model.train(was_training)
    sums["_count"] = count
    sums = all_reduce_sums(sums, dist_info)
    count = sums.pop("_count")
    return {k: v / count for k, v in sums.items()} if count else {}


def batch_size_of(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    raise AssertionError("a batch needs at least one tensor with a batch dimension")


# ----------------------------------------------------------------------------- state


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as plain lists and numbers (picklable, and readable by
    torch.load(weights_only=True))."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class LogWindow:
    """Sums of step scalars since the last metrics row."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0

    def add(self, scalars: dict[str, float], samples: int, seconds: float) -> None:
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.samples += samples
        self.seconds += seconds


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    model: nn.Module
    val_metrics: dict[str, float]
    train_metrics: dict[str, float]
    stopped_early: bool = False  # Ctrl-C: a checkpoint was saved, --resume continues
    steps_cut: int = 0  # steps of max_steps that the max_minutes cap took away


class _StopRequest:
    """First Ctrl-C: finish the current step, save a checkpoint and stop. Second: abort."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def load_run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a run was started with (RUN/config.json), with `--set` overrides applied."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run: it has no config.json to resume from")
    return recipe_from_dict(json.loads(path.read_text()), overrides, where=str(path))


@dataclass
class RunState:
    """What a run holds from setup to finish; the loop's steps read and update it."""

    recipe: Recipe
    run_dir: Path
    dist_info: Distributed
    device: torch.device
    model: nn.Module  # the family's model, as saved
    loss_model: nn.Module  # the module whose forward is the recipe's objective (objective.py)
    train_model: nn.Module  # loss_model, or DDP around it
    optimizer: torch.optim.Optimizer
    source: SampleSource
    has_val: bool
    make_batch: Any  # samples -> the objective's batch
    stream: BatchStream | PrefetchedBatches
    shell: Any  # FSDP: rank 0's plain copy of the model that gathered weights are saved in
    step: int
    elapsed_before: float  # seconds trained before a resume
    window: LogWindow
    metrics_file: Any = None  # RUN/metrics.jsonl, open on the main process
    plain_log: bool = False  # no live bar (a log file, CI): one printed line per log row
    console: Any = None
    started: float = field(default_factory=time.perf_counter)
    val_batches: list[dict[str, Any]] | None = None  # read once, at the first evaluation
    steps_cut: int = 0

    @property
    def sharded(self) -> bool:
        return self.dist_info.enabled and self.recipe.distributed == "fsdp"

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def train(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    resume: bool = False,
    source: SampleSource | None = None,
    console: Any = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train `recipe` into `run_dir`; with `resume`, continue from `run_dir/checkpoint`.

    `source` (role "train"/"val" -> samples) replaces the recipe's data section, for training
    on samples built in Python. Returns the trained model and the final metrics.
    """
    from rich.console import Console

    run_dir = Path(run_dir)
    if recipe.data.replay is not None:  # left for now by a recipe whose start did not exist yet
        recipe = dataclasses.replace(recipe, data=resolve_replay(recipe.data, recipe.model))
    console = console or Console(soft_wrap=True)
    dist_info = init_distributed()
    _check_run_dir(run_dir, resume)
    run = _setup(recipe, run_dir, resume, source, dist_info)
    run.console = console
    _open_run_dir(run, resume)
    run.plain_log = show_progress and dist_info.main and not console.is_terminal
    live_bar = show_progress and dist_info.main and console.is_terminal
    run.started = time.perf_counter()
    if resume and _budget_fraction(recipe, run.step, run.elapsed_before) >= 1:
        raise UserError(
            f"{run_dir} has already used its budget (step {run.step}); raise max_steps or "
            "max_minutes with --set to train it further"
        )
    with _StopRequest() as stop, _progress(console, live_bar) as bar, contextlib.closing(run.stream):
        val_metrics, train_metrics, factor, evaluated_at = _loop(run, stop, bar)
        # ---- finish
        if run.window.steps:
            train_metrics = _log_window(run, factor)
        stopped_early = stop.requested and not _budget_fraction(recipe, run.step, run.elapsed()) >= 1
        # The step budget is the run; a max_minutes cap that ended it sooner says by how much.
        run.steps_cut = 0 if stopped_early or recipe.max_steps is None else recipe.max_steps - run.step
        if evaluated_at != run.step and not stopped_early:
            val_metrics = _run_eval(run)
        _save(run, run_dir / "checkpoint", val_metrics)
    if run.metrics_file is not None:
        run.metrics_file.close()
    if dist_info.main:
        _report(run, stopped_early)
    train_metrics = {k: v for k, v in train_metrics.items() if not k.startswith("_")}
    return TrainResult(run_dir, run.step, run.model, val_metrics, train_metrics, stopped_early,
                       run.steps_cut)  # fmt: skip


# ----------------------------------------------------------------------------- setup


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise UserError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
            "or pass another --out"
        )
    ckpt_dir = run_dir / "checkpoint"
    if resume and not is_checkpoint(ckpt_dir):
        raise UserError(f"cannot resume {run_dir}: it has no checkpoint yet ({ckpt_dir})")


def _setup(recipe: Recipe, run_dir: Path, resume: bool, source: SampleSource | None,
           dist_info: Distributed) -> RunState:  # fmt: skip
    """Seed, threads, device, model, optimizer, parallelism and data, in that order."""
    seed_everything(recipe.seed)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    device = pick_device(recipe.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    model, trainer_state, source, has_val = _model_and_data(recipe, run_dir, resume, source)
    objective = select_objective(model, recipe.model.objective)
    model.to(device).train()
    # FSDP shards the model in place before the optimizer sees its parameters; rank 0 keeps
    # a plain shell to save the gathered weights in.
    sharded = dist_info.enabled and recipe.distributed == "fsdp"
    shell = None
    if sharded:
        from visto.train import fsdp

        shell = fsdp.Shell(model) if dist_info.main else None
        fsdp.shard_model(model)
    optimizer = build_optimizer(model, recipe)
    if trainer_state is not None:
        _restore_optimizer(model, optimizer, trainer_state, sharded, run_dir)
    # The recipe's objective is the forward of `loss_model`; data parallel is applied to it
    # from outside, and the model never knows about it.
    loss_model = loss_module(model, objective, sharded)
    train_model: nn.Module = loss_model
    if dist_info.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            loss_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    make_batch = getattr(model, objective.batches)

    # ---- data (the source was opened above: a new processor may be trained on it)
    # This rank's saved RNG and data position (rank 0's when the world size changed).
    rank_state = None
    if trainer_state is not None:
        ranks = trainer_state["ranks"]
        rank_state = ranks[dist_info.rank] if len(ranks) == dist_info.world_size else ranks[0]
    stream: BatchStream | PrefetchedBatches = BatchStream(
        source, "train", make_batch, recipe.micro_batch_size,
        seed=recipe.seed, shuffle_buffer=recipe.data.shuffle_buffer,
        rank=dist_info.rank, world_size=dist_info.world_size,
        state=rank_state["data"] if rank_state else None,
    )
    if recipe.data.prefetch:
        stream = PrefetchedBatches(stream, recipe.data.prefetch)
    if rank_state:
        set_rng_state(rank_state["rng"])
    else:
        # Each rank draws different dropout masks; rank 0 draws what a single process would.
        torch.manual_seed(recipe.seed + dist_info.rank)
    return RunState(
        recipe=recipe, run_dir=run_dir, dist_info=dist_info, device=device, model=model,
        loss_model=loss_model, train_model=train_model, optimizer=optimizer, source=source,
        has_val=has_val, make_batch=make_batch, stream=stream, shell=shell,
        step=trainer_state["step"] if trainer_state else 0,
        elapsed_before=trainer_state["elapsed_s"] if trainer_state else 0.0,
        window=LogWindow(**trainer_state["log_window"]) if trainer_state else LogWindow(),
    )  # fmt: skip


def _model_and_data(recipe: Recipe, run_dir: Path, resume: bool, source: SampleSource | None
                    ) -> tuple[nn.Module, dict[str, Any] | None, SampleSource, bool]:  # fmt: skip
    """The model (resumed, started from a checkpoint, or fresh) with its processor and
    adapters, its trainer state if resumed, and the data source (with or without val)."""
    ckpt_dir = run_dir / "checkpoint"
    if resume:
        model = load(ckpt_dir)
        trainer_state = load_trainer_state(ckpt_dir)
    elif recipe.model.init_from:
        model = load(recipe.model.init_from)
        trainer_state = None
    else:
        model = build_model(recipe.model.family, recipe.model.config)  # parts the config names read
        trainer_state = None
    if source is None:
        # A mix writes boxes in the location tokens of the processor the model trains with.
        processor_spec = recipe.processor if trainer_state is None else None
        loc_bins = training_loc_bins(model, processor_spec) if needs_loc_bins(recipe.data) else None
        source, has_val = source_from_spec(recipe.data, recipe.seed, loc_bins=loc_bins)
    else:
        has_val = True
    if recipe.processor is not None:
        # A fresh model (or one from init_from) gets the recipe's processor; a resumed model
        # keeps the one its checkpoint carries. processor.max_length applies to either.
        model.processor = run_processor(recipe.processor, model, source, trainer_state is not None)
    if trainer_state is None and recipe.lora is not None and not has_lora(model):
        # Adapters go in before the optimizer is built, so it sees only what LoRA trains.
        apply_lora(model, recipe.lora)
    if recipe.model.family and model.family != recipe.model.family:
        raise UserError(
            f"model.family is {recipe.model.family!r} but the checkpoint holds a {model.family!r} model"
        )
    return model, trainer_state, source, has_val


def _restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                       trainer_state: dict[str, Any], sharded: bool, run_dir: Path) -> None:  # fmt: skip
    # The recipe (possibly changed with --set on resume) sets the lrs, not the saved state.
    peak_lrs = [g["peak_lr"] for g in optimizer.param_groups]
    try:
        if sharded:
            from visto.train import fsdp

            fsdp.load_optimizer_state(model, optimizer, trainer_state["optimizer"])
        else:
            optimizer.load_state_dict(trainer_state["optimizer"])
    except ValueError as e:
        raise UserError(
            f"cannot resume {run_dir}: the trained/frozen parameters differ from the "
            f"checkpoint's ({e}); keep optim.module_lrs' zeros as they were"
        ) from None
    for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
        group["peak_lr"] = peak


def _open_run_dir(run: RunState, resume: bool) -> None:
    """RUN/config.json, the recipe and model printed, RUN/metrics.jsonl open (main process)."""
    recipe, model, optimizer, dist_info = run.recipe, run.model, run.optimizer, run.dist_info
    if dist_info.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.run_dir / "config.json", to_dict(recipe))
        if resume:
            _truncate_metrics(run.run_dir / "metrics.jsonl", run.step)
        run.console.print(format_config(recipe, title=f"recipe ({run.run_dir})"))
        n_train = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        run.console.print(
            f"model: {model.family}, {sum(p.numel() for p in model.parameters()):,} parameters "
            f"({n_train:,} trained) on {run.device}"
            + (f", {dist_info.world_size} processes" if dist_info.enabled else "")
            + (f"; resuming at step {run.step}" if resume else "")
        )
        run.metrics_file = open(run.run_dir / "metrics.jsonl", "a")  # noqa: SIM115


# ----------------------------------------------------------------------------- the loop


def _loop(run: RunState, stop: _StopRequest, bar: Any) -> tuple[dict[str, float], dict[str, float], float, int]:
    """Steps until the budget is spent or Ctrl-C: (val metrics, train metrics, the last lr
    factor, the step of the last evaluation)."""
    recipe = run.recipe
    val_metrics: dict[str, float] = {}
    train_metrics: dict[str, float] = {}
    evaluated_at = -1
    factor = _lr_factor(run)
    task = bar.add_task("train", total=1.0, loss=float("nan"), rate=0.0, step=run.step)
    while not _done(run, stop):
        t0 = time.perf_counter()
        factor = _lr_factor(run)
        set_lr(run.optimizer, factor)
        micro_batches = [next(run.stream) for _ in range(recipe.grad_accum)]
        scalars = train_step(run.train_model, run.optimizer, micro_batches, recipe.optim.grad_clip,
                             run.device)  # fmt: skip
        run.step += 1
        step = run.step
        if not math.isfinite(scalars["loss"]):
            raise UserError(
                f"the loss became {scalars['loss']} at step {step}; lower optim.lr, raise "
                "schedule.warmup_steps or set optim.grad_clip (the last checkpoint is intact)"
            )
        run.window.add(scalars, recipe.batch_size * run.dist_info.world_size, time.perf_counter() - t0)

        if step % recipe.log_every == 0:
            train_metrics = _log_window(run, factor)
            bar.update(task, loss=train_metrics["loss"], rate=train_metrics["_rate"])
        if recipe.eval_every and step % recipe.eval_every == 0:
            val_metrics, evaluated_at = _run_eval(run), step
        if recipe.checkpoint_every and step % recipe.checkpoint_every == 0:
            _save_periodic(lambda path, metrics: _save(run, path, metrics), run.run_dir, step,
                           val_metrics, recipe.keep_checkpoints, run.dist_info)  # fmt: skip
        bar.update(task, completed=_budget_fraction(recipe, step, run.elapsed()), step=step)
    return val_metrics, train_metrics, factor, evaluated_at


def _lr_factor(run: RunState) -> float:
    recipe = run.recipe
    return lr_factor(run.step, schedule_progress(recipe, run.step, run.elapsed()),
                     recipe.schedule.warmup_steps, recipe.schedule.min_lr_ratio)  # fmt: skip


def _done(run: RunState, stop: _StopRequest) -> bool:
    recipe = run.recipe
    over = (recipe.max_steps is not None and run.step >= recipe.max_steps) or (
        recipe.max_minutes is not None and run.elapsed() >= 60 * recipe.max_minutes
    )
    if run.dist_info.enabled:  # every rank must stop at the same step
        flag = all_reduce_sums({"over": float(over or stop.requested)}, run.dist_info)["over"]
        return flag > 0
    return over or stop.requested


def _log_row(run: RunState, row: dict[str, Any]) -> None:
    if run.metrics_file is not None:
        run.metrics_file.write(json.dumps(row) + "\n")
        run.metrics_file.flush()


def _log_window(run: RunState, factor: float) -> dict[str, float]:
    """Write the train row for the steps since the last one; return its means."""
    recipe, window, dist_info = run.recipe, run.window, run.dist_info
    means = all_reduce_sums(window.sums, dist_info)
    means = {k: v / (window.steps * dist_info.world_size) for k, v in means.items()}
    rate = window.samples / max(window.seconds, 1e-9)
    _log_row(run, {
        "step": run.step, "split": "train", **means, "lr": recipe.optim.lr * factor,
        "samples_per_s": round(rate, 2), "elapsed_s": round(run.elapsed(), 3),
    })  # fmt: skip
    run.window = LogWindow()
    if run.plain_log:
        run.console.print(
            f"step {run.step}  loss {means['loss']:.4f}  lr {recipe.optim.lr * factor:.3g}  "
            f"{rate:.1f} samples/s  {run.elapsed() / 60:.1f} min", highlight=False,
        )
    return {**means, "_rate": rate}


def _run_eval(run: RunState) -> dict[str, float]:
    recipe, dist_info = run.recipe, run.dist_info
    if not run.has_val or recipe.eval_batches == 0:
        return {}
    if run.val_batches is None:
        run.val_batches = first_batches(
            run.source, "val", run.make_batch, recipe.micro_batch_size,
            recipe.eval_batches, rank=dist_info.rank, world_size=dist_info.world_size,
        )
        if run.sharded:
            from visto.train import fsdp

            run.val_batches = fsdp.equal_batch_counts(run.val_batches, dist_info)
    metrics = evaluate(run.loss_model, run.val_batches, run.device, dist_info)
    if metrics:
        _log_row(run, {"step": run.step, "split": "val", **metrics,
                       "elapsed_s": round(run.elapsed(), 3)})  # fmt: skip
    return metrics


# ----------------------------------------------------------------------------- finish


def _save(run: RunState, path: Path, val_metrics: dict[str, float]) -> None:
    """A checkpoint with the trainer state: every rank takes part, the main process writes."""
    recipe, dist_info, model, optimizer = run.recipe, run.dist_info, run.model, run.optimizer
    # Each rank's RNG and data position, so that every rank resumes where it was.
    per_rank = gather_objects({"rng": rng_state(), "data": run.stream.state()}, dist_info)
    if run.sharded:  # collective: every rank sends its shards, rank 0 receives them whole
        from visto.train import fsdp

        weights = fsdp.gathered_model_state(model)
        optimizer_state = fsdp.gathered_optimizer_state(model, optimizer)
    if dist_info.main:
        state = {
            "step": run.step,
            "optimizer": optimizer_state if run.sharded else optimizer.state_dict(),
            "ranks": per_rank,
            "elapsed_s": run.elapsed(),
            "log_window": to_dict(run.window),
        }
        card = {
            "recipe": recipe.name or "(unnamed)",
            "data": data_card(recipe.data),
            "training": {"steps": run.step, "max_steps": recipe.max_steps,
                         "max_minutes": recipe.max_minutes, "minutes": round(run.elapsed() / 60, 2),
                         "batch_size": recipe.batch_size * dist_info.world_size,
                         **({"steps_cut": run.steps_cut} if run.steps_cut else {})},
        }  # fmt: skip
        processor_config = getattr(getattr(model, "processor", None), "config", None)
        if getattr(processor_config, "max_length", None) is not None:
            # training's truncation, and whether the recipe set it (processor.max_length)
            card["processor"] = {"max_length": processor_config.max_length,
                                 "max_length_from": "recipe" if recipe.processor and
                                 recipe.processor.max_length else "processor"}  # fmt: skip
        if val_metrics:
            card["metrics (val)"] = val_metrics
        saved = run.shell.filled(weights) if run.sharded else model
        save_checkpoint(saved, path, card=card, trainer_state=state)
    barrier(dist_info)


def _report(run: RunState, stopped_early: bool) -> None:
    """RUN/report.md and the closing lines (main process)."""
    recipe, console, ckpt_dir = run.recipe, run.console, run.run_dir / "checkpoint"
    summary = {
        "family": run.model.family,
        "steps": run.step,
        "minutes": round(run.elapsed() / 60, 2),
        **({"steps_cut": run.steps_cut} if run.steps_cut else {}),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "checkpoint": str(ckpt_dir),
    }
    report = write_report(run.run_dir, to_dict(recipe), summary)
    if stopped_early:
        console.print(f"stopped at step {run.step}; continue with: visto train --resume {run.run_dir}")
    elif run.steps_cut:
        console.print(
            f"max_minutes ({recipe.max_minutes:g}) stopped training at step {run.step} of "
            f"max_steps {recipe.max_steps}: {run.steps_cut} steps cut"
        )
    console.print(f"checkpoint: {ckpt_dir}\nreport: {report}")


# ----------------------------------------------------------------------------- helpers


def _budget_fraction(recipe: Recipe, step: int, elapsed_s: float) -> float:
    fraction = 0.0
    if recipe.max_steps is not None:
        fraction = step / recipe.max_steps
    if recipe.max_minutes is not None:
        fraction = max(fraction, elapsed_s / (60 * recipe.max_minutes))
    return min(1.0, fraction)


def _save_periodic(save: Any, run_dir: Path, step: int, val_metrics: dict[str, float],
                   keep: int, dist_info: Distributed) -> None:
    """RUN/checkpoints/step_N (the last `keep` of them) and a copy as RUN/checkpoint."""
    latest = run_dir / "checkpoint"
    if keep <= 0:
        save(latest, val_metrics)
        return
    step_dir = run_dir / "checkpoints" / f"step_{step}"
    save(step_dir, val_metrics)
    if dist_info.main:
        with atomic_directory(latest) as tmp:
            shutil.copytree(step_dir, tmp, dirs_exist_ok=True)
        old = sorted(
            (p for p in step_dir.parent.glob("step_*") if p.name[5:].isdigit()),
            key=lambda p: int(p.name[5:]),
        )
        for path in old[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    barrier(dist_info)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be logged again)."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("step {task.fields[step]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
