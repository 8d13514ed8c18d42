"""`visto export`: a checkpoint as a directory transformers (and vLLM) load, or as a visto
checkpoint with its LoRA adapters merged."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from visto.commands._common import add_command
from visto.errors import UserError

ORDER = 35

DESCRIPTION = """\
Write a visto checkpoint as a transformers directory: config.json, model.safetensors, the
tokenizer with its chat template and the processor settings. LoRA adapters are merged into the
exported weights (the checkpoint itself is left as it is). Two kinds of directory, the exact
one for each model (--remote-code auto, the default, picks and says which it wrote):

Native, where a transformers class computes the model: LLaVA (LlavaForConditionalGeneration),
BLIP-2 (Blip2ForConditionalGeneration), Fuyu (FuyuForCausalLM) and Flamingo
(IdeficsForVisionText2Text). `LlavaForConditionalGeneration.from_pretrained(OUT)`,
`AutoProcessor.from_pretrained(OUT)` and vLLM (`vllm serve OUT`) load it with the same logits.
A LLaVA exports natively with projector kind 'mlp' (or 'linear') and a patch-stem CLIP tower,
e.g. a transformers LLaVA fine-tuned with `visto train --recipe llava-lora`.

Custom code ("remote code", as Phi-3-vision, Florence-2 and InternVL are published), for a
LLaVA that no transformers class computes: the quickstart's model (`visto quickstart`, any
flags: its regions connector with the question focus, named words, pointer head, read slots
and OCR reader, its conv stem), a conv-stem or SigLIP-layout tower. config.json's auto_map
names configuration_visto.py, modeling_visto.py and processing_visto.py written beside the
weights; they import visto and run visto's own model, so the directory loads in transformers
wherever visto is installed, offline:
  AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)  (or AutoModel,
  AutoModelForImageTextToText), AutoProcessor.from_pretrained(OUT, trust_remote_code=True)
Its forward returns what visto's engine samples from (with the pointer head's copies mixed
in: log-probabilities inside answers), equal to visto's within 1e-4, and generate() gives
visto's greedy tokens; it has no KV cache (each step recomputes the sequence), and vLLM does
not serve it (`visto serve` does, with an OpenAI-compatible API).
--remote-code never: native or an error naming each part transformers has no class for;
--remote-code always: custom code even where a native class exists.

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
  visto export runs/quickstart/checkpoint --out runs/qs-hf          (custom code)
  visto export runs/lora-hf/checkpoint --out runs/lora-hf-export --remote-code never --overwrite
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
    p.add_argument(
        "--remote-code",
        choices=("auto", "always", "never"),
        help="hf format: auto (default) writes the native transformers class where one computes "
        "the model, else a directory with custom code (modeling_visto.py imports visto; loads with "
        "trust_remote_code=True where visto is installed; vLLM does not serve it); never: native "
        "or an error; always: custom code",
    )
    p.add_argument("--int8", action="store_true",
                   help="write an int8 visto checkpoint for the CPU (not the transformers format)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import visto
    from visto.checkpoint import read_config
    from visto.models.transformers_format import is_transformers_dir

    if is_transformers_dir(args.checkpoint):
        raise UserError(f"{args.checkpoint} is already a transformers directory; nothing to export")
    read_config(args.checkpoint)  # a clear error for a run, a missing or a foreign directory
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists; choose another --out or pass --overwrite")
    if args.out.resolve() == args.checkpoint.resolve():
        raise UserError("--out must not be the checkpoint itself")
    if args.remote_code is not None and (args.int8 or args.fmt == "visto"):
        raise UserError("--remote-code picks between the two transformers formats; --int8 and "
                        "--format visto write visto checkpoints: drop it")
    if args.int8:
        if args.fmt == "hf":
            raise UserError("--int8 writes a visto checkpoint, whose int8 weights transformers "
                            "cannot load: drop --format hf (or drop --int8 to export for "
                            "transformers)")
        return export_int8(args)
    if args.fmt == "visto":
        return export_merged(args)
    model = visto.load(args.checkpoint)
    mode = args.remote_code or "auto"
    why = None
    if mode == "auto":
        from visto.models.remote_code import native_export_problems, remote_code_problems

        if not remote_code_problems(model):  # else the native export writes it or says why not
            problems = native_export_problems(model)
            if problems:
                why = "; ".join(problems)
            else:
                try:
                    return _native(model, args.out)
                except UserError as e:  # a refusal found while writing: nothing was written
                    why = str(e)
    if mode == "always" or why is not None:
        from visto.models.remote_code import NOTE, export_remote_code

        out = export_remote_code(model, args.out)
        print(f"wrote {out} ({model.family}, transformers format with custom code: {NOTE})")
        if why is not None:
            print(f"custom code because no transformers class computes this model: {why}")
        print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, "
              "trust_remote_code=True), its inputs with AutoProcessor the same way")
        return 0
    return _native(model, args.out)


def _native(model: Any, directory: Path) -> int:
    from visto.models.transformers_format import export_transformers

    out = export_transformers(model, directory)
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
