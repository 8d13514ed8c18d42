"""Evaluation: metrics per model family and the run report (`visto eval`).

`evaluator_for(family)` returns the kind and evaluation function for a model family; each
function returns an `EvalResult`: the flat `eval.json` dict (name -> number, DESIGN.md
names) and notes for the report. Three kinds exist:

    two_tower    CLIP-like: zero-shot classification, retrieval, clustering (`eval.twotower`)
    generative   image-to-text models: every task of the world asked and scored
                 (`eval.generative`, driven by `visto.tasks.runner.make_generate`)
    dense        text-prompted segmenters and detectors (clipseg): mIoU and AP50
                 (`eval.dense`; the world only)

`dataset_evaluator_for(family)` does the same for a dataset in any format
(`eval.dataset`: what the data carries decides what is scored).

A new family of an existing kind is one line in `FAMILY_KIND`; a new kind is one module and
one entry in `EVALUATORS` (and in `DATASET_EVALUATORS`).
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


# family -> kind of evaluation. Two-tower models embed images and texts in one space;
# generative ones answer questions through the engine protocol (prefill/decode_step).
FAMILY_KIND: dict[str, str] = {
    "clip": "two_tower",
    "siglip": "two_tower",
    "llava": "generative",
    "blip2": "generative",
    "flamingo": "generative",
    "fuyu": "generative",
    "cogvlm": "generative",
    "clipseg": "dense",
}


def _two_tower() -> Callable[..., Any]:
    from visto.eval.twotower import evaluate_two_tower

    return evaluate_two_tower


def _generative() -> Callable[..., Any]:
    from visto.eval.generative import evaluate_generative_model

    return evaluate_generative_model


def _dense() -> Callable[..., Any]:
    from visto.eval.dense import evaluate_dense

    return evaluate_dense


# kind -> loader of its evaluation function (imported lazily: torch, sklearn are heavy).
EVALUATORS: dict[str, Callable[[], Callable[..., Any]]] = {
    "two_tower": _two_tower,
    "generative": _generative,
    "dense": _dense,
}


def _two_tower_dataset() -> Callable[..., Any]:
    from visto.eval.dataset import evaluate_two_tower_dataset

    return evaluate_two_tower_dataset


def _generative_dataset() -> Callable[..., Any]:
    from visto.eval.dataset import evaluate_generative_model_on_dataset

    return evaluate_generative_model_on_dataset


DATASET_EVALUATORS: dict[str, Callable[[], Callable[..., Any]]] = {
    "two_tower": _two_tower_dataset,
    "generative": _generative_dataset,
}


def dataset_evaluator_for(family: str) -> tuple[str, Callable[..., EvalResult]]:
    """(kind, evaluate) on a dataset's samples, where every evaluate is called as

        evaluate(model, samples, *, batch_size, seed, log, **kind_options)

    (generative kind_options as `evaluator_for`'s; two-tower: none).
    """
    kind = _kind_of(family)
    return kind, DATASET_EVALUATORS[kind]()


def _kind_of(family: str) -> str:
    kind = FAMILY_KIND.get(family)
    if kind is None or kind not in EVALUATORS:
        known = ", ".join(sorted(FAMILY_KIND))
        raise UserError(
            f"`visto eval` has no evaluation for model family {family!r} yet; it evaluates: {known}"
        )
    return kind


def evaluator_for(family: str) -> tuple[str, Callable[..., EvalResult]]:
    """(kind, evaluate) for a model family, where every evaluate is called as

        evaluate(model, data_dir, *, split, n, batch_size, seed, log, **kind_options)

    and kind_options are that kind's own settings (two-tower: templates, paraphrase;
    generative: tasks, constrain_json, blind, max_new_tokens, json_max_new_tokens).
    """
    kind = _kind_of(family)
    return kind, EVALUATORS[kind]()
