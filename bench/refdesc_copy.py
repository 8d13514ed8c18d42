"""Where a box -> description answer's colour word comes from: the pointer's copy or the LM
head. For the first 30 test images' first two box -> description questions, the reference
answer is teacher-forced and, at its colour word, the final probability of the reference colour
(pointer and LM head together) is read beside the LM head's own softmax; where they are equal
the pointer copied nothing there. Written for q0b, whose box -> description colour fell to
0.115 (bench/README.md, "Detector boxes in the JSON labels").

    PYTHONPATH=src python bench/refdesc_copy.py q0 q0b r1b      # run names under runs/
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from visto.checkpoint import load
from visto.connectors.pointer import PointerHead
from visto.data.images import open_image
from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.data.synth import iter_records
from visto.data.tokenizer import boxes_to_loc

SEEN: dict[str, torch.Tensor] = {}
_forward = PointerHead.forward


def watched_forward(self, hidden, logits, slots, tokens, script_next=None):  # noqa: ANN001
    """The pointer's forward, keeping its output and the LM head's own log-probabilities."""
    out = _forward(self, hidden, logits, slots, tokens, script_next)
    SEEN["lm_head"], SEEN["final"] = logits.log_softmax(-1), out
    return out


def main() -> None:
    torch.set_num_threads(1)
    PointerHead.forward = watched_forward
    for run in sys.argv[1:]:
        model = load(f"runs/{run}/checkpoint").eval()
        tok, world = model.processor.tokenizer, Path(f"runs/{run}/world")
        final = lm_head = right = n = 0.0
        with torch.no_grad():
            for record in itertools.islice(iter_records(world, "test"), 30):
                for item in record["tasks"]["refdesc"][:2]:
                    question = boxes_to_loc(item["q"], model.processor.config.loc_bins)
                    sample = Sample("d", [open_image(world / record["image"])],
                                    [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"),
                                     Turn("assistant", item["a"])])  # fmt: skip
                    _, labels = model.scored_answer_logits(model.collate([sample]))
                    colour = tok.encode(" " + item["a"].split()[1])[0]
                    k = labels.tolist().index(colour)
                    final += SEEN["final"][k, colour].exp().item()
                    lm_head += SEEN["lm_head"][k, colour].exp().item()
                    right += int(SEEN["final"][k].argmax() == colour)
                    n += 1
        print(f"{run}: {int(n)} answers; at the colour word p(reference) {final / n:.3f} "
              f"(LM head alone {lm_head / n:.3f}), argmax right {right / n:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
