"""Several datasets mixed by weight into one sample source (a recipe's `data.sources`).

    weights 3 : 1  ->  a a a b a a a b ...   (then the BatchStream's seeded shuffle)

Each draw goes to the source furthest below its share of the draws so far, as Megatron-LM's
blended datasets do: deterministic without a random generator, and at every point of the
stream each source's count is within one sample of weight x draws, so a short run sees the
mix it asked for. A source that runs out starts its next pass (a small dataset with a large
weight is seen several times); one epoch of the mixture ends when every source has been read
through once. The order within the epoch is then shuffled by `BatchStream` (seeded), so the
same seed gives the same batches, and a resumed run replays the epoch as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError

Pass = Callable[[], Iterable[Sample]]  # one read through one dataset, from its start


def interleave_by_weight(
    passes: Sequence[Pass], weights: Sequence[float], names: Sequence[str]
) -> Iterator[Sample]:
    """One epoch of the mixture of `passes` (see the module doc); `names` for errors."""
    assert len(passes) == len(weights) == len(names) and passes
    total = float(sum(weights))
    shares = [w / total for w in weights]
    readers = [iter(p()) for p in passes]
    drawn = [0] * len(passes)  # samples taken from each source this epoch
    in_pass = [0] * len(passes)  # samples read in each source's current pass
    finished = [False] * len(passes)  # read through once this epoch
    n = 0
    while True:
        # The source furthest below its share after this draw (ties: the first listed).
        i = max(range(len(passes)), key=lambda j: shares[j] * (n + 1) - drawn[j])
        sample = next(readers[i], None)
        if sample is None:
            if in_pass[i] == 0:
                raise UserError(f"{names[i]} has no samples; check its path and settings")
            finished[i] = True
            if all(finished):
                return
            readers[i], in_pass[i] = iter(passes[i]()), 0
            continue
        drawn[i] += 1
        in_pass[i] += 1
        n += 1
        yield sample


def mixture_source(
    sources: Sequence[Callable[[str], Iterable[Sample]]],
    has_val: Sequence[bool],
    weights: Sequence[float],
    names: Sequence[str],
) -> Callable[[str], Iterable[Sample]]:
    """A sample source (role -> samples) mixing `sources` by weight: "train" all of them,
    "val" those with validation data (`has_val`), by the same weights."""

    def source(role: str) -> Iterable[Sample]:
        present = [k for k in range(len(sources)) if role == "train" or has_val[k]]
        if not present:
            return iter(())
        passes = [functools.partial(sources[k], role) for k in present]
        return interleave_by_weight(passes, [weights[k] for k in present],
                                    [names[k] for k in present])  # fmt: skip

    return source


# ---------------------------------------------------------------- replay (data.replay)
# Fine-tuning on new data alone forgets what the model knew (bench/README.md, "LoRA
# fine-tuning"); replay mixes a share of the model's original training data into the
# fine-tuning batches, as LLaVA's instruction mixes carry general data beside task data.
# A recipe's data.replay is turned into one more source of data.sources (weight: the share),
# read from the `model.init_from` checkpoint's card (what it was trained on) or a path.

# The settings of one dataset that a checkpoint card's data section records and a replayed
# source takes over (val_split and val_source are not: validation stays the new data's).
CARD_SOURCE_KEYS = ("source", "format", "split", "tasks", "mix", "image_root", "caption_key",
                    "image_key")  # fmt: skip


def card_section(checkpoint: str | Path, title: str) -> Any:
    """A JSON section ("## data", ...) of the README.md card that `visto train` writes into
    each checkpoint (`visto.checkpoint.render_card`), or None when the card has none."""
    import json

    from visto.checkpoint import CARD_FILE

    path = Path(checkpoint) / CARD_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(f"## {title}")
    except ValueError:
        return None
    body = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        body.append(line)
    text = "\n".join(body).strip()
    if not (text.startswith("```json") and text.endswith("```")):
        return None
    try:
        return json.loads(text.removeprefix("```json").removesuffix("```"))
    except json.JSONDecodeError:
        return None


def trained_on(checkpoint: str | Path, whole_mix: bool = True) -> list[dict[str, Any]]:
    """The datasets `checkpoint` was trained on, as its card records them: one dict of
    `CARD_SOURCE_KEYS` (and "weight") per dataset; a world mix by its name (`whole_mix`), or
    else as the tasks it holds, one exchange per sample. A UserError saying what
    to set instead when the card records none (a transformers directory, an export, a
    checkpoint `visto train` did not write) or names data that is gone."""
    from visto.models.transformers_format import is_transformers_dir

    where = f"data.replay.source 'init_from' replays what model.init_from ({checkpoint}) was trained on"
    instead = ("give data.replay.source the path of that data (e.g. a LLaVA JSON with "
               "data.replay.image_root), or set data.replay to null to fine-tune without replay")  # fmt: skip
    if not Path(checkpoint).exists():
        raise UserError(f"{where}, but there is no checkpoint there; fix model.init_from")
    if is_transformers_dir(checkpoint):
        raise UserError(f"{where}, but a transformers directory records no training data: {instead}")
    card = card_section(checkpoint, "data")
    if not isinstance(card, dict) or not (card.get("source") or card.get("sources")):
        raise UserError(f"{where}, but its card (README.md) records no training data (it was "
                        f"not written by `visto train`): {instead}")  # fmt: skip
    parts = card["sources"] if card.get("sources") else [card]
    out = []
    for part in parts:
        spec = {k: part.get(k) for k in CARD_SOURCE_KEYS if part.get(k) is not None}
        mix = spec.get("mix")
        if isinstance(mix, dict):  # the card spells a mix out; a recipe names it
            if whole_mix or not mix.get("tasks"):
                spec["mix"] = mix["name"]
            else:
                del spec["mix"]
                spec["tasks"] = list(mix["tasks"])
        if not Path(spec["source"]).exists():
            raise UserError(f"{where}: {spec['source']}, which does not exist here (paths are "
                            f"as the training run saw them): {instead}")  # fmt: skip
        out.append(spec | {"weight": float(part.get("weight", 1.0))})
    return out


def with_replay(
    new: list[dict[str, Any]], old: list[dict[str, Any]], share: float
) -> list[dict[str, Any]]:
    """data.sources (dicts with a "weight") of the `new` datasets and the `old` ones, so that
    `share` of the samples drawn come from `old` (split among them by their own weights) and
    the rest from `new` (likewise). The old ones are marked `replay: true`."""
    assert 0 < share < 1 and new and old
    new_total = sum(s.get("weight", 1.0) for s in new)
    old_total = sum(s.get("weight", 1.0) for s in old)
    scale = share / (1 - share) * new_total / old_total
    return [*new, *({**s, "weight": s.get("weight", 1.0) * scale, "val_split": None,
                     "replay": True} for s in old)]  # fmt: skip
