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
