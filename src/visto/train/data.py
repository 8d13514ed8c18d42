"""Training data: an endless, seeded, shuffled stream of collated batches over any sample source.

A *source* is a function `role -> Iterable[Sample]` ("train" or "val": the synthetic world, or
`visto.data.formats.read_samples` on a file). `BatchStream` reads it epoch after epoch,
keeps every `world_size`-th sample for its rank (data parallel), shuffles through a bounded
buffer seeded by (seed, epoch), and turns micro-batches into tensors with `model.collate`.
Its position (epoch, samples taken) is part of the trainer state, so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import IterableDataset

from visto.data.sample import Sample
from visto.errors import UserError
from visto.pretrained import Normalisation, same_normalisation

SampleSource = Callable[[str], Iterable[Sample]]
Collate = Callable[[list[Sample]], dict[str, Any]]


def source_from_spec(spec: Any, seed: int, *, loc_bins: int | None = None) -> tuple[SampleSource, bool]:
    """The sample source a recipe's `data` section (a `DataSpec`) names, and whether it has
    validation data. The source answers two roles: "train" and "val".

    The synthetic world has splits (data.split, data.val_split); a file in a real format is
    one split, so its validation data is another file (data.val_source). A mix (data.mix)
    writes its boxes as `loc_bins` location tokens: those of the model's processor. Several
    datasets (data.sources) are mixed by weight (`visto.train.mixture`).
    """
    if spec.sources is None:
        return one_source(spec, seed, loc_bins=loc_bins)
    from visto.train.mixture import mixture_source

    parts = [one_source(s, seed, loc_bins=loc_bins, where=f"data.sources[{i}]")
             for i, s in enumerate(spec.sources)]  # fmt: skip
    names = [f"data.sources[{i}] ({s.source})" for i, s in enumerate(spec.sources)]
    weights = [s.weight for s in spec.sources]
    has_val = [val for _, val in parts]
    return mixture_source([src for src, _ in parts], has_val, weights, names), any(has_val)


def needs_loc_bins(spec: Any) -> bool:
    """Whether a recipe's data builds a world mix (which writes the model's location tokens)."""
    return any(s.mix is not None for s in (spec.sources or [spec]))


def one_source(spec: Any, seed: int, *, loc_bins: int | None = None, where: str = "data") -> tuple[SampleSource, bool]:
    """`source_from_spec` for one dataset (a `SourceSpec`); `where` names it in errors."""
    from visto.data.formats import infer_format, read_samples

    if not spec.source:
        raise UserError(
            "the recipe names no data: set data.source to a dataset path "
            "(e.g. --set data.source=runs/world after `visto data synth --out runs/world`)"
        )
    fmt = spec.format or infer_format(spec.source)
    real_only = [n for n in ("image_root", "caption_key", "image_key") if getattr(spec, n) is not None]
    if fmt == "synth" and real_only:
        raise UserError(f"{where}.{real_only[0]} applies to files in a real format; {spec.source} is a synthetic world")
    if fmt == "synth":
        splits = {"train": spec.split, "val": spec.val_split}
        if spec.mix is not None:
            from visto.data.synth.mixes import mix_source

            assert loc_bins is not None, "a mix needs the model's loc_bins"
            source = mix_source(spec.mix, spec.source, splits, seed=seed, loc_bins=loc_bins,
                                json_boxes=spec.json_boxes)  # fmt: skip
            return source, spec.val_split is not None

        def synth(role: str) -> Iterable[Sample]:
            return read_samples(spec.source, "synth", split=splits[role], tasks=spec.tasks, seed=seed)

        return synth, spec.val_split is not None
    if spec.tasks is not None or spec.mix is not None:
        which = f"{where}.tasks selects tasks" if spec.tasks is not None else f"{where}.mix builds samples"
        raise UserError(f"{which} of the synthetic world; {spec.source} is {fmt} data")
    paths = {"train": spec.source, "val": spec.val_source}
    # The same image root and key names serve the validation file: one dataset, two splits.
    names = {"caption_key": spec.caption_key, "image_key": spec.image_key}

    def files(role: str) -> Iterable[Sample]:
        return read_samples(
            paths[role], fmt if role == "train" else None, image_root=spec.image_root, **names
        )

    return files, spec.val_source is not None


def training_loc_bins(model: Any, processor_spec: Any) -> int:
    """The location bins of the processor the model trains with: the recipe's `processor`
    section (a `ProcessorSpec`, which replaces the model's), else the model's own."""
    from visto.config import from_dict
    from visto.data.processor import Processor, ProcessorConfig

    if processor_spec is not None and not processor_spec.keeps_model_processor:
        if processor_spec.path:
            return Processor.load(processor_spec.path).config.loc_bins
        return from_dict(ProcessorConfig, processor_spec.config, where="processor.config").loc_bins
    processor = getattr(model, "processor", None)
    if processor is None:
        raise UserError(
            "data.mix writes boxes as the model's location tokens, but the model has no "
            "processor: give the recipe a processor section or a model with a tokenizer"
        )
    return processor.config.loc_bins


def data_card(spec: Any) -> dict[str, Any]:
    """A recipe's `data` section as a checkpoint card records it: with the mix's facts
    (name, independent turns, tasks) where one was used."""
    from visto.config import to_dict
    from visto.data.synth.mixes import get_mix

    card = to_dict(spec)
    parts = [(spec, card), *zip(spec.sources or [], card["sources"] or [], strict=True)]
    for part, part_card in parts:
        if part.mix is not None:
            part_card["mix"] = get_mix(part.mix).card()
    return card


def buffered_shuffle(items: Iterable[Sample], buffer_size: int, rng: random.Random) -> Iterator[Sample]:
    """Shuffle a stream with a bounded buffer (a full shuffle when it fits in the buffer)."""
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class BatchStream:
    """Endless batches of `batch_size` samples from one split: shuffled, sharded, collated."""

    def __init__(
        self,
        source: SampleSource,
        split: str,
        collate: Collate,
        batch_size: int,
        *,
        seed: int,
        shuffle_buffer: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict[str, int] | None = None,
    ) -> None:
        assert batch_size >= 1 and 0 <= rank < world_size
        self.source, self.split, self.collate = source, split, collate
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        # Position: the epoch being read and how many of its (shuffled) samples were taken.
        self.epoch = state["epoch"] if state else 0
        self.taken = state["taken"] if state else 0
        self._samples = self._endless()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def _epoch(self, epoch: int) -> Iterator[Sample]:
        mine = (s for i, s in enumerate(self.source(self.split)) if i % self.world_size == self.rank)
        return buffered_shuffle(mine, self.shuffle_buffer, random.Random(f"{self.seed}/{epoch}"))

    def _endless(self) -> Iterator[Sample]:
        skip = self.taken  # resuming mid-epoch: replay the same shuffle, drop what was seen
        while True:
            count = 0
            for i, sample in enumerate(self._epoch(self.epoch)):
                count += 1
                if i < skip:
                    continue
                self.taken = i + 1
                yield sample
            if count == 0:
                raise UserError(
                    f"split {self.split!r} has no samples"
                    + (f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else "")
                )
            self.epoch, self.taken, skip = self.epoch + 1, 0, 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        samples = [next(self._samples) for _ in range(self.batch_size)]
        return self.collate(samples)

    def close(self) -> None:
        """Nothing to stop (`PrefetchedBatches.close` stops its worker)."""


class PrefetchedBatches:
    """A `BatchStream` run ahead in a worker process (a torch DataLoader with one worker):
    reading, image decoding and collation of the next `prefetch` batches overlap the
    training step instead of running between steps. The batches and their order are the
    stream's own. `state()` is the position after the last batch handed out (not where the
    worker has got to), so a checkpoint resumes where training stopped.

    One worker, because a shuffled stream is read in order: a second worker would have to
    decode every sample too, to skip the other's. `close()` stops the worker.
    """

    def __init__(self, stream: BatchStream, prefetch: int) -> None:
        import multiprocessing

        import torch
        from torch.utils.data import DataLoader

        assert prefetch >= 1
        self._state = stream.state()
        # fork where there is one: the worker inherits the source and the collate function
        # (a bound method of the model) instead of unpickling a copy of the model.
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        self._loader = DataLoader(
            _StreamDataset(stream), batch_size=None, num_workers=1, prefetch_factor=prefetch,
            collate_fn=_as_is, worker_init_fn=_ignore_interrupt, multiprocessing_context=context,
            # Its own generator: the worker's seed is drawn from it, not from the global RNG
            # (which draws the training run's dropout masks).
            generator=torch.Generator().manual_seed(stream.seed),
        )  # fmt: skip
        # The worker starts at the first batch asked for: the source is then as the
        # training process would read it.
        self._batches: Iterator[tuple[str, Any, dict[str, int] | None]] | None = None
        self._closed = False

    def state(self) -> dict[str, int]:
        return dict(self._state)

    def __iter__(self) -> PrefetchedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        assert not self._closed, "PrefetchedBatches: closed"
        if self._batches is None:
            self._batches = iter(self._loader)
        kind, payload, state = next(self._batches)
        if kind == "error":  # a UserError in the worker: raised here, as the stream would
            raise UserError(payload)
        assert state is not None
        self._state = state
        return payload

    def close(self) -> None:
        """Stop the worker; no batch is read after this."""
        self._closed = True
        if self._batches is not None:
            self._batches._shutdown_workers()  # type: ignore[attr-defined]
            self._batches = None


class _StreamDataset(IterableDataset):
    """The worker's side of `PrefetchedBatches`: (kind, batch or message, stream state)."""

    def __init__(self, stream: BatchStream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[str, Any, dict[str, int] | None]]:
        while True:
            try:
                batch = next(self.stream)
            except UserError as e:  # the message alone, not the worker's traceback
                yield "error", str(e), None
                return
            yield "batch", batch, self.stream.state()


def _as_is(item: Any) -> Any:
    return item


def _ignore_interrupt(_worker_id: int) -> None:
    # Ctrl-C is the training process's to handle: it finishes the step and saves.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def first_batches(
    source: SampleSource,
    split: str,
    collate: Collate,
    batch_size: int,
    num_batches: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, Any]]:
    """The first `num_batches` batches of a split, in file order (for evaluation).

    Fewer when the split is smaller; the last batch may be short.
    """
    batches, pending = [], []
    for i, sample in enumerate(source(split)):
        if i % world_size != rank:
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            batches.append(collate(pending))
            pending = []
            if len(batches) == num_batches:
                return batches
    if pending:
        batches.append(collate(pending))
    return batches


def build_processor(spec: Any, source: SampleSource, tower: Normalisation | None = None) -> Any:
    """A processor from a recipe's `processor` section (a `ProcessorSpec`, see there) that
    normalises pixels as the model's vision tower takes them (`tower`: `model_normalisation`;
    None: nothing to follow), see `follow_tower`."""
    import itertools

    from visto.config import from_dict
    from visto.data.processor import Processor, ProcessorConfig
    from visto.data.tokenizer import corpus_texts

    if spec.path:
        processor = Processor.load(spec.path)
        # A saved processor's mean/std were chosen, unless they are the default (as the
        # family configs' are read by visto.pretrained): the default takes the tower's.
        saved, default = processor.config, ProcessorConfig()
        chosen = not same_normalisation((saved.mean, saved.std), (default.mean, default.std))
        where = f"the processor at processor.path {spec.path}"
        config = follow_tower(saved, {"mean", "std"} if chosen else set(), tower, where)
        return processor if config == saved else type(processor)(config, processor.tokenizer)
    config = from_dict(ProcessorConfig, spec.config, where="processor.config")
    config = follow_tower(config, {"mean", "std"} & set(spec.config), tower, "processor.config")
    samples = itertools.islice(source("train"), spec.tokenizer_samples)
    return Processor.train(corpus_texts(samples), config)


def model_normalisation(model: Any) -> Normalisation | None:
    """The (mean, std) the model's vision tower takes its pixels with, where the model says so:
    the processor it carries (a `model.init_from` checkpoint's), else its config's processor
    settings where they are not its family's default (a `vision_init` tower's own are put there,
    `visto.pretrained.take_tower_normalisation`). None for a fresh tower: nothing to follow."""
    carried = getattr(getattr(model, "_processor", None), "config", None)
    if carried is not None:
        return carried.mean, carried.std
    config = getattr(model, "config", None)
    settings = getattr(config, "processor", None)
    if settings is None or not dataclasses.is_dataclass(config):
        return None
    field = next(f for f in dataclasses.fields(config) if f.name == "processor")
    missing = field.default_factory is dataclasses.MISSING
    default = field.default if missing else field.default_factory()  # type: ignore[misc]
    stats = (settings.mean, settings.std)
    if default is not None and same_normalisation(stats, (default.mean, default.std)):
        return None
    return stats


def follow_tower(config: Any, chosen: set[str], tower: Normalisation | None, where: str) -> Any:
    """`config` (a `ProcessorConfig`) with the normalisation of the model's vision tower
    (`tower`), which was trained on pixels so normalised: its settings named in `chosen` ("mean",
    "std": set by the recipe) must be the tower's, the others take the tower's."""
    if tower is None:
        return config
    mean, std = tower
    picked = (config.mean if "mean" in chosen else mean, config.std if "std" in chosen else std)
    if not same_normalisation(picked, tower):
        raise UserError(
            f"{where} normalises pixels with mean {list(picked[0])} / std {list(picked[1])}, but "
            f"the model's vision tower was trained on mean {list(mean)} / std {list(std)} (its "
            "vision_init's, or the processor of the checkpoint it starts from): leave "
            "processor.config's mean and std out (the tower's are taken) or set them to the tower's"
        )
    return dataclasses.replace(config, mean=tuple(mean), std=tuple(std))


def run_processor(spec: Any, model: Any, source: SampleSource, resumed: bool) -> Any:
    """The processor a run trains with: a resumed model's own, the model's own when the
    section only sets max_length (`ProcessorSpec.keeps_model_processor`), else the section's;
    then `spec.max_length`, if set, as its truncation length (checked against the model's
    positions)."""
    # A fresh model's `processor` is built on first use from its config and raises when the
    # config names no tokenizer: read it only when the run keeps it.
    if spec is not None and not resumed and not spec.keeps_model_processor:
        processor = build_processor(spec, source, model_normalisation(model))
    else:
        processor = getattr(model, "processor", None)
        if spec is None:
            return processor
        if processor is None and not resumed:
            processor = build_processor(spec, source, model_normalisation(model))
    if spec.max_length is None:
        return processor
    if processor is None or not hasattr(processor, "config"):
        raise UserError(
            "processor.max_length changes the processor the model trains with, but the model "
            "has none: give the recipe a processor section (path or config) as well"
        )
    positions = decoder_positions(model)
    if positions is not None and spec.max_length > positions:
        raise UserError(
            f"processor.max_length {spec.max_length} is longer than the {positions} positions "
            f"the model's decoder was built for (max_position_embeddings); use at most {positions}"
        )
    if processor.config.max_length == spec.max_length:
        return processor
    config = dataclasses.replace(processor.config, max_length=spec.max_length)
    return type(processor)(config, processor.tokenizer)


def decoder_positions(model: Any) -> int | None:
    """`max_position_embeddings` of the model's decoder, wherever its config (or a config
    inside it) holds it; None when none does (a two-tower model: its text tower truncates)."""

    def find(config: Any, depth: int) -> int | None:
        if hasattr(config, "max_position_embeddings"):
            return int(config.max_position_embeddings)
        if depth == 0 or not hasattr(config, "__dict__"):
            return None
        for value in vars(config).values():
            if hasattr(value, "__dict__") and (found := find(value, depth - 1)) is not None:
                return found
        return None

    config = getattr(model, "config", None)
    return None if config is None else find(config, 2)
