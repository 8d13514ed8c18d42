"""`visto export`: a checkpoint as a directory transformers (and vLLM) load."""

from __future__ import annotations

import argparse
from pathlib import Path

from visto.commands._common import add_command
from visto.errors import UserError

ORDER = 35

DESCRIPTION = """\
Write a visto checkpoint as a transformers directory: config.json, model.safetensors, the
tokenizer with its chat template and the processor settings, so that
`LlavaForConditionalGeneration.from_pretrained(OUT)`, `AutoProcessor.from_pretrained(OUT)`
and vLLM (`vllm serve OUT`) load it and compute the same logits. LoRA adapters are merged
into the exported weights (the checkpoint itself is left as it is).

Exports LLaVA. What transformers has no counterpart for is refused with the part and what to
change, e.g. a conv-stem vision tower (train it with `visto quickstart --vision-stem patch`).

Examples:
  visto quickstart --out runs/qs-patch --vision-stem patch
  visto export runs/qs-patch/checkpoint --out runs/qs-hf
  visto export runs/qs-patch/checkpoint --out runs/qs-hf --overwrite
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export", "write a checkpoint in the transformers format", DESCRIPTION)
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a visto checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="the directory to write")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("hf",),
        default="hf",
        help="hf: transformers' from_pretrained layout (default, the only one)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import visto
    from visto.checkpoint import read_config
    from visto.models.transformers_format import export_transformers, is_transformers_dir

    if is_transformers_dir(args.checkpoint):
        raise UserError(f"{args.checkpoint} is already a transformers directory; nothing to export")
    read_config(args.checkpoint)  # a clear error for a run, a missing or a foreign directory
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists; choose another --out or pass --overwrite")
    if args.out.resolve() == args.checkpoint.resolve():
        raise UserError("--out must not be the checkpoint itself")
    model = visto.load(args.checkpoint)
    out = export_transformers(model, args.out)
    print(f"wrote {out} ({model.family}, transformers format)")
    print(f"load it with transformers.AutoModelForImageTextToText.from_pretrained({str(out)!r})")
    return 0
