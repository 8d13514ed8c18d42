"""Evaluation: metrics per model family and the run report (`visto eval`).

`evaluator_for(family)` returns the evaluation function for a model family; each function
returns an `EvalResult`: the flat `eval.json` dict (name -> number, DESIGN.md names) and
notes for the report. Adding a family kind
(generative VLMs: VQA, captioning, ...) means adding one module and one entry in `EVALUATORS`.
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


def evaluator_for(family: str) -> Callable[..., Any]:
    kind = FAMILY_KIND.get(family)
    if kind is None or kind not in EVALUATORS:
        known = ", ".join(sorted(FAMILY_KIND))
        raise UserError(
            f"`visto eval` has no evaluation for model family {family!r} yet; it evaluates: {known}"
        )
    return EVALUATORS[kind]()
