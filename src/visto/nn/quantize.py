"""int8 inference on the CPU: dynamic quantization of a model's Linear layers.

    model = quantize_int8(visto.load(path))      # in place; `visto chat/serve --int8`
    tensors = int8_tensors(model)                # plain tensors for model.safetensors
    load_int8_tensors(quantize_int8(fresh_model), tensors)   # what visto.load does for them

Each Linear layer of the vision tower, the connector and the decoder's blocks keeps its
weights as int8 with one scale per output channel; its input is quantized per call from its
own range (dynamic quantization: no calibration data), and the int8 matmul accumulates in
int32 (`torch.ao.quantization.quantize_dynamic`, fbgemm/x86 kernels). Weights take a quarter
of the memory, and on a CPU a small model's decode step, which is bound by reading weights,
runs faster. The output head goes int8 too (per vocabulary row: at batch 1 the fp32 head was
a tenth of a decode step, bench/README.md "int8 inference"); where it is tied to the token
embeddings, the embeddings stay fp32 (a lookup reads a row, not the matrix) and the head's
int8 copy is made from them (+0.25 bytes per fp32 weight in memory), so an int8 checkpoint
does not store it: loading makes it again, the same numbers. Not quantized: the token
embeddings, norms, convolutions and position embeddings (few parameters).

Per-channel scales make the engine's fused projections exact: quantizing q, k and v apart and
concatenating their int8 rows and scales gives the same numbers as one fused layer
(`fuse_int8_linears`, used by the engine's fast path in runner.py).

An int8 checkpoint (`visto export --int8`) stores each int8 layer as plain tensors, so that it
fits safetensors (no pickled packed weights): `NAME.weight` (int8, out x in), `NAME.weight_scale`
(fp32, one per output row; the zero points of symmetric int8 are 0) and `NAME.bias`.

The same parts also hold float matrices that are not Linear layers: the question focus's maps
and word lookup, the OCR reader's, a conv stem (`stored_int8_names`). They run as fp32, but are
rounded to int8 per row in place when the model is quantized and stored that way
(`NAME__int8`, `NAME__scale`): weight-only int8, as GGUF stores a model, so the int8 export is
~3x smaller than the fp32 checkpoint (without it the quickstart's was 2.4x: its focus and
reader are 1.9 MB of matrices), and a model quantized in memory computes exactly what its
export loads back. The token embeddings and the output head tied to them stay fp32.

It lives in nn/ (not infer/) because the checkpoint layer reads and writes it.

`torch.ao.quantization` is deprecated in favour of torchao (its warnings are silenced here;
bench/README.md says why we use it on torch 2.13). It runs on the CPU only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from visto.errors import UserError

# Parts of a model whose Linear layers are quantized, by attribute path; a model has some.
QUANTIZED_PARTS = (
    "vision_tower",  # LLaVA
    "vision_model",  # BLIP-2, Flamingo
    "multi_modal_projector",  # LLaVA's connector
    "language_model.model.layers",  # a VLM's decoder blocks (not its tied output head)
    "model.layers",  # a DecoderLM on its own
)
# The decoder's output head, where there is one: quantized as a Linear layer of its own.
HEAD_PATHS = ("language_model.lm_head", "lm_head")


def _int8_linear_type() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return DynamicQuantizedLinear


def is_int8_linear(module: nn.Module) -> bool:
    return type(module) is _int8_linear_type()


def is_int8(model: nn.Module) -> bool:
    """Whether `quantize_int8` has been applied (any int8 Linear inside)."""
    return any(is_int8_linear(m) for m in model.modules())


@contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # torch.ao.quantization warns at every call that torchao replaces it, and quantized tensor
    # creation that it is going away; both still work on torch 2.13 (see the module docstring).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        yield


def _part(model: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize the Linear layers of `model`'s vision tower, connector and decoder blocks to
    int8 (dynamic, per output channel), in place; returns `model`. Idempotent."""
    if is_int8(model):
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(
            f"--int8 runs on the CPU (int8 kernels of torch.ao.quantization); the model is on "
            f"{device}: pass --device cpu, or drop --int8 (on a GPU, bf16 is the fast path)"
        )
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "base_layer")]
    if wrapped:
        raise UserError(
            f"--int8 quantizes plain Linear layers, and this model has adapters (LoRA) on "
            f"{wrapped[0]} and others: merge them into the weights first"
        )
    parts = [path for path in QUANTIZED_PARTS if _part(model, path) is not None]
    if not parts:
        raise UserError(
            f"--int8 found no vision tower or decoder in this {type(model).__name__} "
            f"(looked for {', '.join(QUANTIZED_PARTS)})"
        )
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    heads = [path for path in HEAD_PATHS if type(_part(model, path)) is nn.Linear]
    with _quiet_deprecation():
        quantize_dynamic(
            model,
            {path: per_channel_dynamic_qconfig for path in parts + heads[:1]},
            dtype=torch.qint8,
            mapping={nn.Linear: _int8_linear_type()},  # Linear only: not the position embeddings
            inplace=True,
        )
    state = model.state_dict()
    with torch.no_grad():
        for name in stored_int8_names(model):
            values, scale = _rows_to_int8(state[name])
            state[name].copy_(_rows_from_int8(values, scale, state[name].shape))
    return model


# A float matrix in a quantized part with at least this many entries and rows this long is
# stored as int8 rows (smaller ones: norms, biases, position tables, are not worth a scale).
STORED_INT8_MIN_ELEMENTS = 16384
STORED_INT8_MIN_ROW = 64


def stored_int8_names(model: nn.Module) -> list[str]:
    """State-dict names of the float matrices (parameters and saved buffers, 2-D or more) in
    the quantized parts that are not inside an int8 Linear layer: stored as int8 rows."""
    int8 = {name: m for name, m in model.named_modules() if is_int8_linear(m)}
    parts = tuple(path + "." for path in QUANTIZED_PARTS)
    return [key for key, value in model.state_dict().items()
            if isinstance(value, Tensor) and value.is_floating_point() and value.ndim >= 2
            and value.numel() >= STORED_INT8_MIN_ELEMENTS and _row_length(value.shape) >= STORED_INT8_MIN_ROW
            and key.startswith(parts) and not _owned_by(key, int8)]  # fmt: skip


def _row_length(shape: torch.Size) -> int:
    """A matrix's rows run along its last dimension; a convolution's (out, in, kh, kw) are
    its output channels (per-channel, as the int8 Linear layers' rows are)."""
    return math.prod(shape[1:]) if len(shape) == 4 else shape[-1]


def _rows_to_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: values (x's shape, int8) and scales (one per row, fp32), so
    that values * scale is x to half a step of its row's range."""
    rows = x.detach().float().reshape(-1, _row_length(x.shape))
    scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127
    values = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return values.reshape(x.shape), scale


def _rows_from_int8(values: Tensor, scale: Tensor, shape: torch.Size) -> Tensor:
    rows = values.reshape(-1, _row_length(shape)).float() * scale[:, None].float()
    return rows.reshape(shape)


def fuse_int8_linears(linears: Sequence[nn.Module]) -> Callable[[Tensor], Tensor]:
    """One int8 matmul computing the int8 layers' outputs concatenated (same input), as the
    layers would one by one: their int8 rows, per-row scales and biases are stacked."""
    with _quiet_deprecation(), torch.no_grad():
        weights = [m.weight() for m in linears]
        assert all(w.qscheme() == torch.per_channel_affine for w in weights), (
            "fusing needs per-channel int8 weights (quantize_int8 makes them)"
        )
        stacked = torch._make_per_channel_quantized_tensor(
            torch.cat([w.int_repr() for w in weights]),
            torch.cat([w.q_per_channel_scales() for w in weights]),
            torch.cat([w.q_per_channel_zero_points() for w in weights]),
            0,
        )
        biases = [m.bias() for m in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([
                b if b is not None else torch.zeros(m.out_features)
                for b, m in zip(biases, linears, strict=True)
            ])  # fmt: skip
        packed = torch.ops.quantized.linear_prepack(stacked, bias)

    def linear(x: Tensor) -> Tensor:
        # reduce_range as the module's own forward: 7-bit activations, no int16 overflow in
        # fbgemm's accumulation on CPUs without VNNI.
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True)

    linear.packed = packed  # the engine's TorchScript decode layers call the op with it
    return linear


def int8_summary(model: nn.Module) -> str:
    """One line for a command to print: how many layers run in int8, and where."""
    names = [n for n, m in model.named_modules() if is_int8_linear(m)]
    parts = [p for p in QUANTIZED_PARTS if any(n.startswith(p + ".") for n in names)]
    parts += [p for p in HEAD_PATHS if p in names]
    return f"int8: {len(names)} Linear layers quantized ({', '.join(parts)}); the rest fp32"


def _tied_head_sources(model: nn.Module) -> dict[str, str]:
    """int8 output heads tied to their decoder's token embeddings -> the embeddings' state-dict
    name: such a head is not stored, but made again from the embeddings at load."""
    out = {}
    for path in HEAD_PATHS:
        head, lm = _part(model, path), _part(model, path.rpartition(".")[0]) if "." in path else model
        config = getattr(lm, "config", None)
        if head is not None and is_int8_linear(head) and getattr(config, "tie_word_embeddings", False):
            prefix = path[: -len("lm_head")]
            out[path] = f"{prefix}model.embed_tokens.weight"
    return out


def _int8_weight(weight: Tensor) -> Tensor:
    """A float (out, in) weight as the per-channel int8 tensor that `quantize_int8` makes of a
    Linear layer's (the same observer, so the same numbers)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    observer = per_channel_dynamic_qconfig.weight()
    observer(weight.detach().float())
    scales, zero_points = observer.calculate_qparams()
    return torch.quantize_per_channel(weight.detach().float(), scales.double(), zero_points, 0, torch.qint8)


def int8_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state as plain tensors: fp32 entries as they are, each int8 layer as
    NAME.weight (int8), NAME.weight_scale (fp32) and NAME.bias; one name per shared tensor
    (tied weights), as safetensors wants."""
    int8 = {name: m for name, m in model.named_modules() if is_int8_linear(m)}
    tied_heads = _tied_head_sources(model)  # made again from the embeddings at load
    rows = set(stored_int8_names(model))
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor) or _owned_by(key, int8):
            continue  # an int8 layer's own entries (packed weights, scale, zero point)
        if value.data_ptr() in seen:
            continue  # a tied alias: loading its twin sets it too
        seen.add(value.data_ptr())
        if key in rows:  # already int8 values (quantize_int8 rounded it): exact
            out[f"{key}{INT8_SUFFIX}"], out[f"{key}{SCALE_SUFFIX}"] = _rows_to_int8(value)
            continue
        out[key] = value.detach().contiguous()
    with _quiet_deprecation():
        for name, layer in int8.items():
            if name in tied_heads:
                continue
            weight = layer.weight()
            assert weight.qscheme() == torch.per_channel_affine
            assert not weight.q_per_channel_zero_points().any(), "int8 weights are symmetric"
            out[f"{name}.weight"] = weight.int_repr().contiguous()
            out[f"{name}.weight_scale"] = weight.q_per_channel_scales().float().contiguous()
            if layer.bias() is not None:
                out[f"{name}.bias"] = layer.bias().detach().contiguous()
    return out


def load_int8_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load `int8_tensors` output into a model already made int8 by `quantize_int8` (its
    structure; the values are overwritten). Raises ValueError naming what does not match."""
    int8 = {name: m for name, m in model.named_modules() if is_int8_linear(m)}
    tied_heads = _tied_head_sources(model)
    rest = dict(tensors)
    for key in [k for k in rest if k.endswith(INT8_SUFFIX)]:
        name = key[: -len(INT8_SUFFIX)]
        values, scale = rest.pop(key), rest.pop(f"{name}{SCALE_SUFFIX}", None)
        if scale is None or values.dtype != torch.int8 or scale.numel() * _row_length(values.shape) != values.numel():
            raise ValueError(f"{name} is stored as int8 rows without a matching {name}{SCALE_SUFFIX}")
        rest[name] = _rows_from_int8(values, scale, values.shape)
    with _quiet_deprecation(), torch.no_grad():
        for name, layer in int8.items():
            if name in tied_heads and f"{name}.weight" not in rest:
                continue  # made from the loaded embeddings below
            if name in HEAD_PATHS and rest.get(f"{name}.weight", torch.empty(0, dtype=torch.int8)).is_floating_point():
                # an export made before heads went int8 stored an untied head in fp32
                layer.set_weight_bias(_int8_weight(rest.pop(f"{name}.weight")), rest.pop(f"{name}.bias", None))
                continue
            try:
                values = rest.pop(f"{name}.weight")
                scales = rest.pop(f"{name}.weight_scale")
            except KeyError:
                raise ValueError(f"no int8 weights for {name}") from None
            bias = rest.pop(f"{name}.bias", None)
            if values.dtype != torch.int8 or values.shape != (layer.out_features, layer.in_features):
                raise ValueError(
                    f"{name}.weight is {values.dtype} {tuple(values.shape)}; expected int8 "
                    f"{(layer.out_features, layer.in_features)}"
                )
            weight = torch._make_per_channel_quantized_tensor(
                values, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0
            )
            layer.set_weight_bias(weight, bias)
    state = model.state_dict()
    # A tied alias was saved under its twin's name only; an int8 layer's own entries (packed
    # weights, scale) were set above and are loaded as they now are.
    missing = [k for k in state if k not in rest and not _owned_by(k, int8)
               and not _tied(model, k, rest)]  # fmt: skip
    unexpected = [k for k in rest if k not in state]
    if missing or unexpected:
        raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    state.update(rest)  # in place: state_dict()'s own mapping carries the module versions
    model.load_state_dict(state, strict=True)
    with _quiet_deprecation(), torch.no_grad():
        for name, embeddings in tied_heads.items():
            if f"{name}.weight" not in tensors:
                int8[name].set_weight_bias(_int8_weight(model.state_dict()[embeddings]), None)


# How int8_tensors names a float matrix stored as int8 rows: NAME__int8 and NAME__scale.
INT8_SUFFIX, SCALE_SUFFIX = "__int8", "__scale"


def _owned_by(key: str, int8: dict[str, nn.Module]) -> bool:
    return any(key.startswith(name + ".") for name in int8)


def _tied(model: nn.Module, key: str, loaded: dict[str, Tensor]) -> bool:
    """Whether `key` is the same tensor as an entry that was loaded (tied weights)."""
    state = model.state_dict(keep_vars=True)
    ptr = state[key].data_ptr()
    return any(state[k].data_ptr() == ptr for k in loaded if k in state and k != key)
