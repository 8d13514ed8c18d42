"""What the JSON answer a checkpoint's connector writes from its detections scores, before any
decoder: the ceiling of `copy_json` (connectors/script.py), where the decoder copies it whole.

For the first `--n` images of a split: the detector's objects (present ones, most probable
values, boxes) and the reader's lines, written as the world writes its JSON answer, scored
with `visto eval`'s JSON field accuracy against the image's answer; and a check that the
script's tokens are the processor's tokens of the answer (the true answer, written by the same
function from the truth, must encode to the labels the decoder is trained on).

    python bench/json_script.py runs/y0/checkpoint --world runs/y0/world --n 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--world", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from visto.checkpoint import load
    from visto.connectors.script import detected_json
    from visto.data.images import open_image
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.data.synth import iter_records
    from visto.eval.metrics import json_field_matches

    t0 = time.time()
    model = load(a.checkpoint).eval()
    connector = model.multi_modal_projector
    embed = model.language_model.model.embed_tokens
    tokenizer = model.processor.tokenizer
    world = Path(a.world)
    right = total = exact = same_tokens = images = with_text = text_right = 0
    with torch.no_grad():
        for r in itertools.islice(iter_records(world, a.split), a.n):
            qa = r["tasks"]["json"]
            sample = Sample("j", [open_image(world / r["image"])],
                            [Turn("user", f"{IMAGE_PLACEHOLDER}\n{qa['q']}"), Turn("assistant", qa["a"])])  # fmt: skip
            batch = model.collate([sample])
            objects = connector.objects(model.patch_features(batch["pixel_values"]), embed)
            lines = connector.read_lines(batch["pixel_values"]) if connector.read_slots else [[]]
            written = detected_json(objects.attributes[0], objects.boxes[0], objects.present[0], lines[0])
            target = json.loads(qa["a"])
            c, n = json_field_matches(json.loads(written), target)
            right, total, exact = right + c, total + n, exact + (c == n)
            if target["text"]:
                with_text += 1
                text_right += json.loads(written)["text"] == target["text"]
            labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
            same_tokens += labels[:-1] == tokenizer.encode(qa["a"])  # the last label ends the answer
            images += 1
    out = {
        "checkpoint": a.checkpoint, "split": a.split, "images": images,
        "json_field_accuracy_of_the_script": round(right / max(total, 1), 4),
        "images_whose_script_is_all_right": round(exact / max(images, 1), 4),
        "text_list_right_where_there_is_text": round(text_right / max(with_text, 1), 4),
        "answers_whose_labels_are_the_script_encoding": round(same_tokens / max(images, 1), 4),
        "seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
