"""The synthetic visual world: scenes with complete ground truth, and every task derived from it.

    from visto.data.synth import WorldConfig, generate_world, iter_samples
    generate_world(WorldConfig(n=2000, seed=0), "runs/world")
    for sample in iter_samples("runs/world", "train", tasks=["vqa"]):
        ...

Modules, in the order the data flows: `vocab` (shapes, colours, words, held-out pairs),
`scene` (sample objects and texts), `render` (pixels, mask, boxes), `tasks` (captions, VQA,
grounding, OCR, JSON, label), `generate` (the world directory), `reader` (Samples back),
`show` (a picture of the data).
"""

from visto.data.synth.config import SPLITS, WorldConfig
from visto.data.synth.generate import TASK_KINDS, VQA_TYPES, generate_world, make_image
from visto.data.synth.reader import DEFAULT_TASKS, iter_records, iter_samples, load_world
from visto.data.synth.vocab import COLOURS, SHAPES, SIZES, heldout_pairs

__all__ = [
    "COLOURS",
    "DEFAULT_TASKS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASK_KINDS",
    "VQA_TYPES",
    "WorldConfig",
    "generate_world",
    "heldout_pairs",
    "iter_records",
    "iter_samples",
    "load_world",
    "make_image",
]
