"""`visto export`: a checkpoint as a directory transformers (and vLLM) load, or as a visto
checkpoint with its LoRA adapters merged."""

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

Exports LLaVA (LlavaForConditionalGeneration), BLIP-2 (Blip2ForConditionalGeneration), Fuyu
(FuyuForCausalLM) and Flamingo (IdeficsForVisionText2Text). The export is exact or refused: what
transformers' class has no counterpart for is named with what to change, e.g. a conv-stem
vision tower (vision.stem 'patch' exports), a BLIP-2 tower with a LayerNorm before its blocks,
a Flamingo that drops the CLS token.

The quickstart's model (`visto quickstart`, any flags) does not export to transformers: its
regions connector (an object detector writing each object as the decoder's words, with the
question focus, named words and a pointer head) and its conv stem have no transformers
counterpart, and an approximation would answer differently. Run it with `visto chat` or
`visto serve` (an OpenAI-compatible API), or export it with --format visto / --int8. What
exports: a LLaVA with projector kind 'mlp' and a patch-stem CLIP tower, e.g. a transformers
LLaVA fine-tuned with `visto train --recipe llava-lora --set data.replay=null`.

--format visto writes a visto checkpoint with the LoRA adapters merged into the weights: plain
Linear layers again, any family, for chat/serve without the adapters' extra matmuls (and for
--int8 or another LoRA round). A checkpoint without adapters is copied as it is.

--int8 writes a visto checkpoint for the CPU instead, any generative family: the Linear layers
of the vision tower, connector and decoder stored as int8 with per-channel scales, and their
other large matrices (a conv stem, the question focus's maps, the OCR reader's) as int8 rows
that run in fp32 (about 3x smaller on disk than fp32: bench/README.md, "int8 inference"); the
token embeddings and the output head stay fp32. `visto chat/serve --model OUT` run it in int8.
transformers has no loader for these weights, so --int8 and --format hf do not mix.

Examples:
  visto export runs/lora-hf/checkpoint --out runs/lora-hf-export
  visto export runs/lora-hf/checkpoint --out runs/lora-hf-export --overwrite
  visto export runs/quickstart/checkpoint --out runs/qs-int8 --int8
  visto export runs/lora/checkpoint --out runs/lora-merged --format visto
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export", "write a checkpoint in the transformers format", DESCRIPTION)
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a visto checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="the directory to write")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("hf", "visto"),
        help="hf: transformers' from_pretrained layout (the default without --int8); "
        "visto: a visto checkpoint with LoRA merged",
    )
    p.add_argument("--int8", action="store_true",
                   help="write an int8 visto checkpoint for the CPU (not the transformers format)")
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
    if args.int8:
        if args.fmt == "hf":
            raise UserError("--int8 writes a visto checkpoint, whose int8 weights transformers "
                            "cannot load: drop --format hf (or drop --int8 to export for "
                            "transformers)")
        return export_int8(args)
    if args.fmt == "visto":
        return export_merged(args)
    model = visto.load(args.checkpoint)
    out = export_transformers(model, args.out)
    print(f"wrote {out} ({model.family}, transformers format)")
    print(f"load it with transformers.AutoModelForImageTextToText.from_pretrained({str(out)!r})")
    return 0


def export_merged(args: argparse.Namespace) -> int:
    import visto
    from visto.checkpoint import save_checkpoint
    from visto.nn.lora import has_lora, merge_lora

    model = visto.load(args.checkpoint)
    merged = has_lora(model)
    if merged:
        merge_lora(model)
    card = {"export": f"{args.checkpoint}" + (" with its LoRA adapters merged" if merged else "")}
    out = save_checkpoint(model, args.out, card=card)
    what = "LoRA merged" if merged else "no LoRA adapters to merge"
    print(f"wrote {out} ({model.family}, visto checkpoint; {what})")
    return 0


def export_int8(args: argparse.Namespace) -> int:
    import visto
    from visto.checkpoint import save_checkpoint
    from visto.nn.quantize import int8_summary, quantize_int8

    model = visto.load(args.checkpoint)
    if getattr(model, "lora_config", None) is not None:
        from visto.nn.lora import merge_lora

        merge_lora(model)  # int8 quantizes plain Linear layers: fold the adapters in first
    quantize_int8(model)
    out = save_checkpoint(model, args.out, card={"int8": f"quantized from {args.checkpoint}"})
    print(f"wrote {out} ({model.family}, int8 visto checkpoint; {int8_summary(model)})")
    print(f"run it with: visto chat --model {out} IMAGE QUESTION (on the CPU)")
    return 0
