"""Evaluation: metrics per model family and the run report (`visto eval`).

`evaluator_for(family)` returns the kind and evaluation function for a model family; each
function returns an `EvalResult`: the flat `eval.json` dict (name -> number, DESIGN.md
names) and notes for the report. Adding a family kind (generative VLMs: VQA, captioning,
...) means one module, one entry in `EVALUATORS`, and its families in `FAMILY_KIND`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from visto.errors import UserError


@dataclass
class EvalResult:
    """What every family's evaluation returns: the flat eval.json dict and report notes."""

    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)


# family -> kind of evaluation. Two-tower models embed images and texts in one space.
FAMILY_KIND: dict[str, str] = {
    "clip": "two_tower",
    "siglip": "two_tower",
}


def _two_tower() -> Callable[..., Any]:
    from visto.eval.twotower import evaluate_two_tower

    return evaluate_two_tower


# kind -> loader of its evaluation function (imported lazily: torch, sklearn are heavy).
EVALUATORS: dict[str, Callable[[], Callable[..., Any]]] = {
    "two_tower": _two_tower,
}


def evaluator_for(family: str) -> tuple[str, Callable[..., EvalResult]]:
    """(kind, evaluate) for a model family, where every evaluate is called as

        evaluate(model, data_dir, *, split, n, batch_size, seed, log, **kind_options)

    and kind_options are that kind's own settings (two-tower: templates, paraphrase).
    """
    kind = FAMILY_KIND.get(family)
    if kind is None or kind not in EVALUATORS:
        known = ", ".join(sorted(FAMILY_KIND))
        raise UserError(
            f"`visto eval` has no evaluation for model family {family!r} yet; it evaluates: {known}"
        )
    return kind, EVALUATORS[kind]()
