"""The run report: `report.md` with a metrics table and PNG plots, for any model family.

Everything here reads the same flat `eval.json` dict (name -> number) and a run's
`metrics.jsonl`, so a new family gets a report by producing those, not by writing plots.
Metric names follow DESIGN.md: `<group>.<name>` with `heldout.` in front for the unseen
colour-shape pairs (`zeroshot.shape`, `heldout.zeroshot.shape`, `vqa.count`, ...), and for
generative models `blind.<name>` (the blind twin: images swapped for others) and
`gain.<name>` (figure - blind figure), shown beside their figure, not as rows of their own.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from visto.utils.io import atomic_write_text, save_figure

HELDOUT = "heldout."
BLIND, GAIN = "blind.", "gain."


def format_value(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.3f}"


def split_heldout(name: str) -> tuple[str, bool]:
    """'heldout.zeroshot.shape' -> ('zeroshot.shape', True)."""
    if name.startswith(HELDOUT):
        return name[len(HELDOUT) :], True
    return name, False


def is_twin(name: str) -> bool:
    """Whether `name` is a blind twin's figure or its gain (shown beside the figure)."""
    return name.startswith((BLIND, GAIN))


def twin_rows(metrics: Mapping[str, float]) -> list[tuple[str, float, float | None, float | None]]:
    """(name, value, blind value, gain) for every figure that is not itself a twin; None
    where the figure has no blind twin."""
    return [
        (name, value, metrics.get(BLIND + name), metrics.get(GAIN + name))
        for name, value in metrics.items()
        if not is_twin(name)
    ]


def metrics_table(metrics: Mapping[str, float]) -> str:
    """A markdown table with one row per metric and a column for seen and for held-out; where
    there is a blind twin, its figure and the gain beside each."""
    rows: dict[str, dict[bool, str]] = {}  # base name -> held-out? -> full name
    for name in metrics:
        if not is_twin(name):
            base, held = split_heldout(name)
            rows.setdefault(base, {})[held] = name
    has_heldout = any(True in r for r in rows.values())
    has_blind = any(k.startswith(BLIND) for k in metrics)
    splits = [(False, "seen" if has_heldout else "value"), (True, "held-out")][: 1 + has_heldout]
    twins = ("", BLIND, GAIN) if has_blind else ("",)
    head = [f"{label} {twin.rstrip('.')}".strip() for _, label in splits for twin in twins]
    lines = ["| metric | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for base, names in rows.items():
        cells = [
            format_value(metrics.get(twin + names[held]) if held in names else None)
            for held, _ in splits
            for twin in twins
        ]
        lines.append(f"| `{base}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_group_bars(
    metrics: Mapping[str, float], group: str, path: str | os.PathLike, title: str | None = None
) -> Path | None:
    """Bars for every `<group>.<name>` metric, seen beside held-out where there is one, and
    the blind twin's seen figure beside them where there is one.

    E.g. group 'zeroshot' plots shape / colour / class; group 'vqa' plots one bar per
    question type. Returns None (and writes nothing) when the group has no metrics.
    """
    prefix = group.rstrip(".") + "."
    names: list[str] = []
    seen: dict[str, float] = {}
    held: dict[str, float] = {}
    blind: dict[str, float] = {}
    for name, value in metrics.items():
        if name.startswith(BLIND + prefix):
            blind[name[len(BLIND + prefix) :]] = value
        if is_twin(name):
            continue
        base, is_held = split_heldout(name)
        if not base.startswith(prefix):
            continue
        short = base[len(prefix) :]
        if short not in names:
            names.append(short)
        (held if is_held else seen)[short] = value
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.2))
    series = [("seen", seen, "#4C78A8"), ("held-out", held, "#F58518"),
              ("blind (seen)", blind, "#9D9D9D")]  # fmt: skip
    series = [s for s in series if s[1] or s[0] == "seen"]
    width = 0.8 / len(series) if len(series) > 1 else 0.6
    xs = list(range(len(names)))
    nan = float("nan")
    for k, (label, values_of, colour) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [values_of.get(n, nan) for n in names], width,
               label=label, color=colour)  # fmt: skip
    if len(series) > 1:
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(series))
    ax.set_xticks(xs, names)
    values = [v for v in [*seen.values(), *held.values(), *blind.values()] if not math.isnan(v)]
    if values and max(values) <= 1.0 and min(values) >= 0.0:
        ax.set_ylim(0, 1.02)
    ax.set_title(title or group)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The training curve: one JSON object per line; unreadable lines are skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash must not hide the rest of the curve
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_curve(
    rows: Sequence[Mapping], path: str | os.PathLike, x: str = "step", max_panels: int = 6
) -> Path | None:
    """One small panel per numeric series (loss first) against `x`, one line per `split`
    (the training loop logs "train" and "val" rows into the same metrics.jsonl)."""
    # key -> split -> (xs, ys)
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for i, row in enumerate(rows):
        xv = row.get(x, i)
        split = str(row.get("split", ""))
        for key, value in row.items():
            if key == x or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            xs, ys = series.setdefault(key, {}).setdefault(split, ([], []))
            xs.append(float(xv))
            ys.append(float(value))
    # Loss curves first; skip bookkeeping series that only ever grow (time, epoch, tokens).
    skip = {"time", "elapsed", "elapsed_s", "epoch", "tokens", "samples", "wall_s"}
    keys = sorted((k for k in series if k not in skip), key=lambda k: ("loss" not in k, k))
    keys = [k for k in keys if max(len(xs) for xs, _ in series[k].values()) >= 2][:max_panels]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for split, (xs, ys) in series[key].items():
            ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 8 else None, ms=3, label=split)
        if len(series[key]) > 1:
            ax.legend(frameon=False, fontsize=8)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def metric_groups(metrics: Mapping[str, float]) -> list[str]:
    """'zeroshot', 'retrieval.t2i', 'cluster', ...: the name without its last part, in order."""
    groups: list[str] = []
    for name in metrics:
        if is_twin(name):
            continue  # drawn beside their figure
        base, _ = split_heldout(name)
        group = base.rsplit(".", 1)[0] if "." in base else base
        if group not in groups:
            groups.append(group)
    return groups


def write_report(
    out_dir: str | os.PathLike,
    title: str,
    metrics: Mapping[str, float],
    notes: Sequence[str] = (),
    curve: Sequence[Mapping] | None = None,
) -> Path:
    """Write `report.md` and one PNG per metric group (plus `curve.png`) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n", metrics_table(metrics)]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    for group in metric_groups(metrics):
        png = plot_group_bars(metrics, group, out / f"{group.replace('.', '_')}.png")
        if png is not None:
            parts.append(f"![{group}]({png.name})\n")
    if curve:
        png = plot_curve(curve, out / "curve.png")
        if png is not None:
            parts.append("## Training curve\n\n![training curve](curve.png)\n")
    return atomic_write_text(out / "report.md", "\n".join(parts))
