"""Start a quickstart run from another run's trained vision stage, so only the settings after
it (the connector, the decoder's initial draw, stages 1 and 2) differ.

Copies the world, then builds a fresh LLaVA from today's `llava_config` for the given
QuickstartConfig overrides, seeded with `--init-seed`, and copies in the source run's tower and
object detector (and its OCR reader when `text_slots` or `read_slots` ask for one). The tokenizer is the
source run's (plus `<focus>` when the config writes focus slots). Its `done.json` carries the
new settings, so `visto quickstart --out DST` with the same options goes on from stage 1.
Every run in bench/README.md's "Question focus" and r8-r13 was started this way.

    python bench/reuse_tower.py runs/r3 runs/h1 --set '{"focus": true}' --init-seed 1
    visto quickstart --out runs/h1 --threads 1 --focus
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a quickstart run directory with world/ and vision/")
    ap.add_argument("dest", type=Path, help="the new run directory (must not exist)")
    ap.add_argument("--set", default="{}", help="QuickstartConfig overrides as JSON")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the fresh connector and decoder")
    ap.add_argument("--reader-from", type=Path, help="a run whose vision stage trained the OCR reader")
    a = ap.parse_args()
    from visto.checkpoint import load, save_checkpoint
    from visto.data.processor import Processor
    from visto.data.tokenizer import with_focus_token
    from visto.models.llava import Llava
    from visto.quickstart import QuickstartConfig, focus_slots, llava_config, mark_done

    if a.dest.exists():
        raise SystemExit(f"{a.dest} exists; pick a new run directory")
    cfg = dataclasses.replace(QuickstartConfig(), **json.loads(a.set)).validate()
    old = load(a.source / "vision" / "checkpoint")
    tokenizer = with_focus_token(old.processor.tokenizer) if focus_slots(cfg) else old.processor.tokenizer
    config = llava_config(cfg, tokenizer.vocab_size)
    torch.manual_seed(a.init_seed)
    model = Llava(config)
    model.vision_tower.load_state_dict(old.vision_tower.state_dict())
    model.multi_modal_projector.heads.load_state_dict(old.multi_modal_projector.heads.state_dict())
    if config.projector.text_slots or config.projector.read_slots:
        reader = load((a.reader_from or a.source) / "vision" / "checkpoint").multi_modal_projector.reader
        model.multi_modal_projector.reader.load_state_dict(reader.state_dict())
    model.processor = Processor(config.processor, tokenizer)
    shutil.copytree(a.source / "world", a.dest / "world")
    vision = a.dest / "vision"
    done = json.loads((a.source / "vision" / "done.json").read_text())
    card = {"data": str(a.dest / "world"),
            "training": {"stage": f"dense vision pretraining ({a.source}'s tower, reused)"},
            "metrics": done.get("val", {})}  # fmt: skip
    save_checkpoint(model, vision / "checkpoint", card=card)
    for name in ("metrics.jsonl", "report.md"):
        if (a.source / "vision" / name).exists():
            shutil.copy(a.source / "vision" / name, vision / name)
    extra = {k: v for k, v in done.items() if k not in ("settings", "seconds", "load")}
    mark_done(vision, cfg.stage_settings("vision"), done["seconds"], extra)
    print(f"{a.dest}: {a.source}'s tower, a fresh connector and decoder (init seed {a.init_seed}), "
          f"focus slots {config.processor.focus_tokens}, vocabulary {tokenizer.vocab_size}")  # fmt: skip


if __name__ == "__main__":
    main()
