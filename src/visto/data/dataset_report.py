"""What a dataset holds, in one streaming pass: `visto data inspect`.

    report = survey("train.parquet", processor=Processor.load("runs/q/checkpoint"))
    print(render_report(report))

Counts what loaded and what was skipped (by reason, with the first records of each), the
tasks, exchanges and images per sample, image sizes, and sequence lengths: in the tokens a
processor makes (images included) against its `max_length`, or in words without one. Only
counters and the first few samples (for a contact sheet) are kept, so any size streams.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visto.data.formats import ReadStats, infer_format, read_samples
from visto.data.formats._common import CAPTION_PROMPT
from visto.data.sample import IMAGE_PLACEHOLDER, Sample

NO_LIMIT = 2**31  # encode()'s max_length when measuring: nothing is cut
HISTOGRAM_BINS = 8
BAR_WIDTH = 30


@dataclass
class DatasetReport:
    path: str
    format: str
    stats: ReadStats
    tasks: Counter[str] = field(default_factory=Counter)
    exchanges: Counter[int] = field(default_factory=Counter)  # assistant turns per sample
    images_per_sample: Counter[int] = field(default_factory=Counter)
    image_sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    lengths: Counter[int] = field(default_factory=Counter)
    length_unit: str = "words"  # "tokens" when a processor measured them
    max_length: int | None = None
    examples: list[Sample] = field(default_factory=list)  # the first samples, for --show
    stopped_at_limit: bool = False

    @property
    def over_max_length(self) -> int:
        if self.max_length is None:
            return 0
        return sum(n for length, n in self.lengths.items() if length > self.max_length)


def task_of(sample: Sample) -> str:
    """The task a sample trains: the synthetic world says so; other sources by their shape."""
    task = (sample.truth or {}).get("task")
    if isinstance(task, str):
        return task
    if len(sample.turns) == 2 and sample.turns[0].content.endswith(CAPTION_PROMPT):
        return "caption"
    return "conversation" if sample.images else "text only"


def sample_length(sample: Sample, processor: Any | None) -> int:
    """Tokens of the whole training sequence (images included), or words without a processor."""
    if processor is not None:
        return len(processor.encode(sample, max_length=NO_LIMIT).input_ids)
    return sum(len(t.content.replace(IMAGE_PLACEHOLDER, " ").split()) for t in sample.turns)


def survey(
    path: str | Path,
    fmt: str | None = None,
    *,
    processor: Any | None = None,
    max_length: int | None = None,
    limit: int | None = None,
    keep: int = 0,
    **read_options: Any,
) -> DatasetReport:
    """Read `path` once (at most `limit` samples) and count what it holds.

    processor: measures lengths in its tokens; max_length defaults to its config's.
    keep: how many of the first samples to keep (for a contact sheet).
    read_options: image_root, caption_key, image_key, as `read_samples` takes them.
    """
    fmt = fmt or infer_format(path)
    if max_length is None and processor is not None:
        max_length = processor.config.max_length
    report = DatasetReport(
        path=str(path),
        format=fmt,
        stats=ReadStats(),
        length_unit="tokens" if processor is not None else "words",
        max_length=max_length,
    )
    samples = read_samples(path, fmt, stats=report.stats, **read_options)
    for sample in itertools.islice(samples, limit):
        report.tasks[task_of(sample)] += 1
        report.exchanges[sum(t.role == "assistant" for t in sample.turns)] += 1
        report.images_per_sample[len(sample.images)] += 1
        report.image_sizes.update(image.size for image in sample.images)
        report.lengths[sample_length(sample, processor)] += 1
        if len(report.examples) < keep:
            report.examples.append(sample)
    report.stopped_at_limit = limit is not None and report.stats.read >= limit
    return report


def write_sheet(report: DatasetReport, out: str | Path) -> Path:
    """A PNG contact sheet of the kept samples: image, id, task, size and first exchange."""
    from visto.data.contact_sheet import grid, sample_cell
    from visto.data.sample import image_to_png_bytes
    from visto.utils.io import atomic_write_bytes

    assert report.examples, "no samples were kept"
    cells = []
    for sample in report.examples:
        size = "x".join(map(str, sample.images[0].size)) if sample.images else "no image"
        cells.append(sample_cell(sample, f"{sample.id} | {task_of(sample)} | {size}"))
    return atomic_write_bytes(out, image_to_png_bytes(grid(cells)))


def histogram(
    lengths: Counter[int], max_length: int | None, bins: int = HISTOGRAM_BINS
) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of equal width over the lengths; when a max_length falls
    inside the range, a bin edge sits on it, so one bin never straddles it."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))  # ceil
    start = low
    if max_length is not None and low <= max_length < high:
        start = max_length + 1 - width * (-(-(max_length + 1 - low) // width))
    edges = range(start, high + 1, width)
    return [
        (lo, lo + width - 1, sum(n for length, n in lengths.items() if lo <= length < lo + width))
        for lo in edges
    ]


def render_report(report: DatasetReport) -> str:
    """The report as plain text lines, for the terminal."""
    stats, total = report.stats, report.stats.read
    lines = [f"{report.path}: {report.format}"]
    loaded = f"loaded {total} sample(s)"
    if report.stopped_at_limit:
        loaded += " (the --limit; the rest was not read)"
    lines.append(f"{loaded}, skipped {stats.skipped}")
    for reason, n in stats.reasons.most_common():
        lines.append(f"  skipped, {reason}: {n}")
        lines += [f"    {example}" for example in stats.examples.get(reason, [])]
    if not total:
        return "\n".join(lines)
    lines.append("tasks: " + _counts(report.tasks))
    lines.append("exchanges per sample: " + _counts(report.exchanges, sort_keys=True))
    lines.append("images per sample: " + _counts(report.images_per_sample, sort_keys=True))
    if report.image_sizes:
        widths = [w for w, _ in report.image_sizes]
        heights = [h for _, h in report.image_sizes]
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in report.image_sizes.most_common(3))
        lines.append(
            f"image sizes: width {min(widths)}-{max(widths)}, height {min(heights)}-"
            f"{max(heights)}; most common {common}"
        )
    lengths, unit = report.lengths, report.length_unit
    lines.append(
        f"length in {unit}: min {min(lengths)}, median {_median(lengths)}, max {max(lengths)}"
        + ("" if unit == "tokens" else " (give --processor CKPT to count a model's tokens)")
    )
    if report.max_length is not None:
        over = report.over_max_length
        lines.append(
            f"over max_length {report.max_length}: {over} of {total} ({over / total:.1%}) "
            "would be truncated"
        )
    bins = histogram(report.lengths, report.max_length)
    top = max(n for _, _, n in bins) or 1
    for lo, hi, n in bins:
        over = report.max_length is not None and lo > report.max_length
        bar = "#" * round(BAR_WIDTH * n / top)
        lines.append(f"  {lo:>6}-{hi:<6} {n:>7} {bar}{'  > max_length' if over and n else ''}")
    return "\n".join(lines)


def _counts(counter: Counter, sort_keys: bool = False) -> str:
    items = sorted(counter.items()) if sort_keys else counter.most_common()
    return ", ".join(f"{key}: {n}" for key, n in items)


def _median(counts: Counter[int]) -> int:
    middle, seen = (counts.total() - 1) // 2, 0
    for value in sorted(counts):
        seen += counts[value]
        if seen > middle:
            return value
    raise AssertionError("empty counter")
