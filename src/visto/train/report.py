"""The end-of-run report: `RUN/plots/*.png` (loss, then every other metric) and `RUN/report.md`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visto.utils.io import atomic_write_text, save_figure

SKIP = {"step", "split", "lr", "samples_per_s", "elapsed_s", "grad_norm"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(rows: list[dict[str, Any]], name: str, out: Path) -> bool:
    """One metric against step, a line per split. False when no row has it."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        if isinstance(row.get(name), (int, float)):
            steps, values = series.setdefault(row.get("split", "train"), ([], []))
            steps.append(row["step"])
            values.append(row[name])
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for split, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)
    return True


def write_report(run_dir: str | Path, recipe: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Plot metrics.jsonl into RUN/plots and write RUN/report.md; returns the report path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    names = ["loss"] + sorted(
        {k for row in rows for k, v in row.items() if k not in SKIP | {"loss"} and isinstance(v, (int, float))}
    )
    plots = [name for name in names if _plot(rows, name, run_dir / "plots" / f"{name}.png")]
    last_val = next((r for r in reversed(rows) if r.get("split") == "val"), None)
    last_train = next((r for r in reversed(rows) if r.get("split") == "train"), None)

    lines = [f"# Training run: {recipe.get('name') or run_dir.name}", ""]
    if recipe.get("description"):
        lines += [recipe["description"], ""]
    lines += ["| | |", "|---|---|"]
    for key, value in summary.items():
        lines.append(f"| {key} | {_fmt(value)} |")
    for label, row in (("train", last_train), ("val", last_val)):
        if row:
            for key, value in row.items():
                if key not in SKIP:
                    lines.append(f"| final {label} {key} | {_fmt(value)} |")
    lines.append("")
    for name in plots:
        lines += [f"![{name}](plots/{name}.png)", ""]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2), "```", ""]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
