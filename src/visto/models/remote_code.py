"""visto models as transformers directories with custom code ("remote code"), for the models
that no transformers class computes: the quickstart's LLaVA (regions connector with question
focus, named words, pointer head, read slots and OCR reader; a conv-stem tower) and any LLaVA
the native export (`transformers_format.export_transformers`) refuses.

    export_remote_code(model, "out-dir")
    # then, wherever visto is installed, offline:
    AutoModelForCausalLM.from_pretrained("out-dir", trust_remote_code=True)

The directory is what transformers' custom-code models (Phi-3-vision, Florence-2, InternVL)
ship: config.json with `model_type` "visto" and an `auto_map` naming configuration_visto.py,
modeling_visto.py and processing_visto.py beside the weights (the files of
`visto.models.hf_remote`, copied), model.safetensors (visto's own parameter names under
`model.`), the tokenizer as transformers and visto read it, and processor_config.json. The
modeling file imports visto and runs visto's own model: it loads in transformers wherever visto
is installed; vLLM does not serve it (it serves the native export). visto reads the directory
back (`visto.load`, `visto chat/serve --model DIR`: `load_remote_code`).

`sequence_logits` is the wrapper's forward: for every position the distribution over the next
token that visto's generation engine samples from, with the pointer head's copies mixed in
inside answers (log-probabilities there, as the engine's `output_logits`). There is no KV
cache: `generate` recomputes the whole sequence at each step (exact, slower than visto's engine).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visto.errors import UserError

MODEL_TYPE = "visto"
FILES = ("configuration_visto.py", "modeling_visto.py", "processing_visto.py")
AUTO_MAP = {
    "AutoConfig": "configuration_visto.VistoConfig",
    "AutoModel": "modeling_visto.VistoForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_visto.VistoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_visto.VistoForConditionalGeneration",
}
# Families whose every configuration the wrapper computes exactly (sequence_logits).
FAMILIES = ("llava",)
NOTE = (
    "modeling_visto.py imports visto, so it loads with trust_remote_code=True wherever visto "
    "is installed; vLLM does not serve it"
)


def remote_code_problems(model: nn.Module) -> list[str]:
    """Why `model` cannot be written as a remote-code directory (empty: it can)."""
    family = getattr(model, "family", type(model).__name__)
    if family not in FAMILIES:
        return [f"the remote-code export covers {', '.join(FAMILIES)} models, not {family!r}"]
    from visto.nn.quantize import is_int8

    if is_int8(model):
        return ["its weights are int8 (`visto export --int8`); export the fp32 checkpoint"]
    if getattr(model, "_processor", None) is None and not (
        model.config.tokenizer_dir or model.config.tokenizer_corpus
    ):
        return ["it has no tokenizer (a checkpoint saved with its processor has one)"]
    return []


def native_export_problems(model: nn.Module) -> list[str]:
    """Why `export_transformers` would refuse `model` (empty: it writes it), as far as
    known before writing: the family, a LLaVA's parts without counterpart, a SigLIP-layout
    tower, and what `llava.export_problems` names."""
    from visto.models.llava import export_problems
    from visto.models.transformers_format import EXPORTERS, parts_without_counterpart

    family = getattr(model, "family", type(model).__name__)
    if family not in EXPORTERS:
        return [f"transformers has no class visto exports {family!r} models to"]
    if family != "llava":
        return []  # the family's export_hf names its own problems
    parts = parts_without_counterpart(model)
    if parts:
        return parts
    if not model.config.vision.cls_token:
        return ["its vision tower has SigLIP's layout (no class token, no pre-LayerNorm, a biased "
                "patch embedding), and visto writes LLaVA's tower as transformers' CLIPVisionModel"]
    return export_problems(model)


def hf_config(model: nn.Module) -> dict[str, Any]:
    """config.json of the remote-code directory: visto's checkpoint config under "visto" (what
    the wrapper builds the model from) and the few numbers transformers' generate reads."""
    import visto
    from visto.config import to_dict

    tokenizer = model.processor.tokenizer
    eos = [i for i in (tokenizer.end_id, getattr(tokenizer, "eos_id", None)) if i is not None]
    cfg = model.config
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["VistoForConditionalGeneration"],
        "auto_map": AUTO_MAP,
        "visto": {
            "family": model.family,
            "config": to_dict(cfg),
            "processor": to_dict(model.processor.config),
            "visto_version": visto.__version__,
        },
        "vocab_size": cfg.decoder.vocab_size,
        "hidden_size": cfg.decoder.hidden_size,
        "image_token_id": _token_id(tokenizer, "<image>"),
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_id,
        # transformers' save_pretrained keeps one name of a tied pair (modeling_visto's
        # _tied_weights_keys); visto's own model holds the tie
        "tie_word_embeddings": bool(cfg.decoder.tie_word_embeddings),
        "use_cache": False,  # generate recomputes the sequence: visto's cache is the engine's
    }


def _token_id(tokenizer: Any, token: str) -> int | None:
    raw = getattr(tokenizer, "raw", None)
    return raw.token_to_id(token) if raw is not None else None


def weights(model: nn.Module) -> dict[str, Tensor]:
    """visto's state dict under `model.` (the wrapper's attribute), fp32, contiguous, each
    tensor its own storage (a tied weight is written under both names)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        out[f"model.{key}"] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).clone().contiguous()
    return out


def export_remote_code(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` (LoRA merged) as a transformers directory with custom code, atomically."""
    from safetensors.torch import save_file

    from visto.models.transformers_format import merged
    from visto.utils.io import atomic_directory, atomic_write_json

    problems = remote_code_problems(model)
    if problems:
        raise UserError("cannot export this model to the transformers format: " + "; ".join(problems))
    model = merged(model)
    config = hf_config(model)
    config["visto"]["resized"] = resized_buffers(model, config["visto"])
    generation = {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"], "do_sample": False, "use_cache": False,
    }  # fmt: skip
    source = Path(__file__).parent / "hf_remote"
    with atomic_directory(directory) as tmp:
        atomic_write_json(tmp / "config.json", {**config, "torch_dtype": "float32"})
        atomic_write_json(tmp / "generation_config.json", generation)
        save_file(weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.processor.tokenizer.to_hf_tokenizer().save_pretrained(str(tmp))
        model.processor.save(tmp)  # processor.json; tokenizer.json (the same JSON as above)
        atomic_write_json(tmp / "processor_config.json", {
            "processor_class": "VistoProcessor",
            "auto_map": {"AutoProcessor": "processing_visto.VistoProcessor"},
        })  # fmt: skip
        for name in FILES:
            shutil.copyfile(source / name, tmp / name)
        (tmp / "README.md").write_text(_card(model))
    return Path(directory)


def _card(model: nn.Module) -> str:
    return (
        f"# visto {model.display_name} (transformers format, custom code)\n\n"
        "Exported by `visto export`. transformers has no class for this model, so the\n"
        "directory carries its code (modeling_visto.py), which imports visto: it loads\n"
        "wherever visto is installed, offline, with trust_remote_code=True. vLLM does not\n"
        "serve it.\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoProcessor\n"
        'model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)\n'
        'processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)\n'
        'inputs = processor(images=[image], text="What colour is the circle?")\n'
        "out = model.generate(**inputs, max_new_tokens=16)\n"
        "print(processor.batch_decode(out[:, inputs['input_ids'].shape[1]:]))\n"
        "```\n\n"
        "`model(input_ids=..., pixel_values=..., attention_mask=...)` returns, at every\n"
        "position, what visto's engine samples from (log-probabilities with the pointer head's\n"
        "copies mixed in inside answers). No KV cache: `generate` recomputes the sequence at\n"
        "each step.\n"
    )


def sequence_logits(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor,
    attention_mask: Tensor | None = None,
    image_sample_index: Tensor | None = None,
) -> Tensor:
    """(B, T) ids of left-padded rows (a prompt and what was generated so far) -> (B, T, V):
    at each position, what visto's generation engine samples the next token from. The
    decoder's logits; with a pointer head and images, inside each answer (from its
    `<|assistant|>` token on) the log-probabilities with that answer's `<focus>` slots mixed
    in, the JSON script's cursor moved over the answer's own tokens (teacher forcing, as
    training scores answers: `models.common.pointer_answer_logits` at every position)."""
    from visto.connectors.pointer import answer_of_position
    from visto.models.common import pointer_script_next

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if pixel_values is None:
        pixel_values = torch.zeros(0, 3, 1, 1)
    weight = model.language_model.model.embed_tokens.weight  # fp32 also in an int8 model
    pixel_values = pixel_values.to(weight.device, weight.dtype)
    if image_sample_index is not None:
        image_sample_index = image_sample_index.to(input_ids.device)
    elif pixel_values.shape[0]:  # one image per row, in order (what the processor makes)
        image_sample_index = torch.arange(pixel_values.shape[0], device=input_ids.device)
    embeds, copies = model.embed_with_copies(input_ids, pixel_values, image_sample_index)
    hidden, _ = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, head=False)
    logits = model.language_model.lm_head(hidden)  # (B, T, V)
    if model.pointer is None or copies is None:
        return logits
    connector = model.multi_modal_projector
    answer = answer_of_position(input_ids, connector.focus.assistant_id)
    b, t = ((answer >= 0) & attention_mask.bool()).nonzero(as_tuple=True)
    script_next = pointer_script_next(connector, input_ids, copies, b, t)
    mixed = connector.pointer(hidden[b, t], logits[b, t], copies[answer[b, t]], input_ids[b, t], script_next)
    return logits.index_put((b, t), mixed.to(logits.dtype))


def build_visto(meta: dict[str, Any]) -> nn.Module:
    """The visto model (fresh weights) that config.json's "visto" entry describes: what the
    wrapper holds before transformers loads model.safetensors into it. Buffers that visto sizes
    when it loads a checkpoint (the question focus's word lookup, as large as the vocabulary
    it was taken from) are made the size they were saved at ("resized"), since transformers
    loads tensors into modules of the right shape only."""
    from visto.models import build_model

    model = build_model(meta["family"], meta["config"])
    for key, shape in meta.get("resized", {}).items():
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        old = module._buffers[name]
        module._buffers[name] = old.new_zeros(shape)
    return model


def resized_buffers(model: nn.Module, meta: dict[str, Any]) -> dict[str, list[int]]:
    """The buffers of `model` whose shape differs from a fresh model's of `meta` (buffers only:
    a parameter of another shape is another architecture)."""
    fresh = build_visto(meta).state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    out = {}
    for key, value in model.state_dict().items():
        if key in fresh and fresh[key].shape != value.shape:
            if key not in buffers:
                raise UserError(f"parameter {key} is {tuple(value.shape)} in this model but "
                                f"{tuple(fresh[key].shape)} in one built from its config")
            out[key] = list(value.shape)
    return out


def rebuilt(loaded: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """The model of `meta` built by visto on the CPU (non-persistent buffers and all) with
    `loaded`'s state (what transformers read from model.safetensors), on `loaded`'s device
    and floating dtype."""
    with torch.device("cpu"):
        model = build_visto(meta)
    model.load_state_dict(loaded.state_dict(), strict=True)
    first = next(loaded.parameters())
    return model.to(first.device, first.dtype).eval()


def load_remote_code(directory: str | Path) -> nn.Module:
    """The visto model of a directory `export_remote_code` wrote (what `visto.load`, `visto
    chat` and `visto serve` do with one), with its processor."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())["visto"]
    model = build_visto(meta)
    state = {k.removeprefix("model."): v for k, v in load_file(directory / "model.safetensors").items()}
    # a tied weight may be stored under one of its names (transformers' save_pretrained)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for group in names.values() if any(g in state for g in group) for n in group}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        result, error = None, str(e)
    if result is not None and (result.unexpected_keys or set(result.missing_keys) - tied):
        error = f"missing {sorted(set(result.missing_keys) - tied)}, unexpected {result.unexpected_keys}"
    if result is None or result.unexpected_keys or set(result.missing_keys) - tied:
        raise UserError(f"{directory / 'model.safetensors'} does not match the model config.json describes: {error}")
    attach_processor(model, directory)
    return model.eval()


def attach_processor(model: nn.Module, directory: str | Path) -> None:
    """Give the loaded visto model its processor (processor.json and tokenizer.json beside
    the weights): the regions connector reads its word ids from the tokenizer."""
    from visto.data.processor import Processor

    model.processor = Processor.load(directory)


__all__ = ["AUTO_MAP", "FAMILIES", "MODEL_TYPE", "NOTE", "attach_processor", "build_visto", "rebuilt",
           "export_remote_code", "hf_config", "load_remote_code", "native_export_problems", "resized_buffers", "remote_code_problems", "sequence_logits", "weights"]  # fmt: skip
