"""The region connector's detector on seen and held-out colour-shape pairs: is an answer's
error the eye's or the decoder's?

For every object of the first `--n` images of a split, the detected object whose box overlaps
it most (IoU >= 0.3) is taken, and its most likely shape, colour and size (the connector's
dense heads) are compared with the truth: recall (an object found at all), per-attribute
accuracy, and "pair" (shape and colour both right). The quickstart's VQA colour and shape on
the same split, against these, say how much the decoder loses on top of the detector.

    python bench/detector_heldout.py runs/w0/checkpoint --world runs/w0/world --n 200
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--world", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--splits", nargs="+", default=["test", "heldout"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    from visto.checkpoint import load
    from visto.connectors.named import KINDS, box_iou
    from visto.data.images import open_image
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.data.synth import iter_records

    model = load(a.checkpoint).eval()
    connector, embed = model.multi_modal_projector, model.language_model.model.embed_tokens
    world = Path(a.world)
    print(f"{a.checkpoint}: first {a.n} images per split, load {os.getloadavg()[0]:.1f}")
    print("| split | objects | recall (IoU >= 0.3) | shape | colour | size | shape and colour |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for split in a.splits:
        right = dict.fromkeys([*KINDS, "pair"], 0)
        found = total = 0
        with torch.no_grad():
            for r in itertools.islice(iter_records(world, split), a.n):
                image = open_image(world / r["image"])
                batch = model.prompt_batch([Sample("0", [image], [Turn("user", f"{IMAGE_PLACEHOLDER}\n?")])])
                objects = connector.objects(model.patch_features(batch.pixel_values[:1]), embed)
                width = r["truth"]["width"]
                for o in r["truth"]["objects"]:
                    total += 1
                    truth_box = torch.tensor(o["box"], dtype=torch.float32)[None, None] / width
                    iou = box_iou(truth_box, objects.boxes)[0, 0].masked_fill(~objects.present[0], -1)
                    if iou.max() < 0.3:
                        continue
                    found += 1
                    m, at, ok = int(iou.argmax()), 0, {}
                    for kind, names in KINDS.items():
                        ok[kind] = names[int(objects.attributes[0, m, at : at + len(names)].argmax())] == o[kind]
                        right[kind] += ok[kind]
                        at += len(names)
                    right["pair"] += ok["shape"] and ok["colour"]
        share = {k: v / max(found, 1) for k, v in right.items()}
        print(f"| {split} | {total} | {found / max(total, 1):.3f} | {share['shape']:.3f} | {share['colour']:.3f} "
              f"| {share['size']:.3f} | {share['pair']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
