"""The decoder language model: a Llama-style causal transformer, trainable from scratch.

    cfg = DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    lm = DecoderLM(cfg)
    logits, _ = lm(input_ids)                                     # training: (B, T, V)
    logits, cache = lm(input_ids, kv_cache=lm.new_cache())        # incremental decoding
    lm = DecoderLM.from_pretrained("path/to/SmolLM2-135M")        # transformers format in
    lm.save_pretrained("out/")                                    # ... and out again

Parameter names are exactly those of transformers' `LlamaForCausalLM` (`model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, `model.norm`, `lm_head`, ...), so the transformers format is
read and written through the explicit key map in `hf_key_map` (nanoGPT's `from_pretrained`
habit: every tensor named and its shape asserted). Qwen2 checkpoints differ only by q/k/v
biases (`qkv_bias`), SmolLM is plain Llama.

For the generation engine (`visto.infer.engine`) the model also speaks the engine's two-method
protocol: `prefill(batch)` and `decode_step(next_ids, state)`. A VLM that splices visual tokens
into the input embeddings calls `prefill_embeds(inputs_embeds, attention_mask)` and delegates
`decode_step` here.

A conditioned decoder (Flamingo reads images between layers, CogVLM routes image positions to
expert weights) passes what its layers read as an argument, a `Conditioning`:

    logits, _ = lm(inputs_embeds=x, attention_mask=m, conditioning=Conditioning(
        before_layer={0: gated_block_0, 2: gated_block_1},       # x -> x before layers 0, 2
        experts=visual_expert.layers, expert_mask=is_image))      # per-layer expert weights

The layer loop in `forward` is the whole mechanism (no hooks, no state set around the call);
the engine's fast path (`visto.infer.runner`) runs the same loop on the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visto.errors import UserError
from visto.nn.attention import (
    Attention,
    KVCache,
    RotaryEmbedding,
    packed_layout,
    position_ids_from_padding,
)
from visto.nn.experts import Expert
from visto.nn.transformer import DecoderBlock, RMSNorm, SwiGLU

# --------------------------------------------------------------------------------------------
# Config


@dataclass
class DecoderConfig:
    vocab_size: int = 1024
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4  # < num_heads: grouped-query attention (Ainslie et al. 2023)
    intermediate_size: int = 512  # SwiGLU hidden width
    head_dim: int | None = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # Llama's attention_bias: biases on q, k, v and o
    qkv_bias: bool = False  # Qwen2: biases on q, k, v only
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # "normal" (Llama's N(0, 0.02)) or "mimetic": each query head starts equal to its key
    # head, so q.k starts as a similarity and a token attends to tokens like itself (Trockman
    # & Kolter 2023). Measured on bench/binding_probe.py: the binding plateau ends at step
    # ~300 instead of ~500. Only a fresh decoder is initialised; loaded weights are kept.
    attention_init: str = "normal"

    def __post_init__(self) -> None:
        if self.attention_init not in ("normal", "mimetic"):
            raise UserError(f"attention_init must be 'normal' or 'mimetic', got {self.attention_init!r}")
        assert self.num_heads % self.num_kv_heads == 0, (
            f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
        )
        if self.head_dim is None:
            assert self.hidden_size % self.num_heads == 0, (
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DecoderConfig:
        """`tiny` (unit tests, ~0.1M parameters) or `small` (the synthetic world, ~2M)."""
        if name not in PRESETS:
            raise UserError(f"unknown decoder preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    # The transformers config.json, both ways. Only what changes the numbers is mapped; a
    # checkpoint using a feature we do not implement is refused rather than silently misread.
    def to_hf(self) -> dict[str, Any]:
        qwen = self.qkv_bias
        if qwen and self.attention_bias:
            raise ValueError("qkv_bias (Qwen2) and attention_bias (Llama) are exclusive")
        cfg: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if not qwen:
            cfg.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        return cfg

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> DecoderConfig:
        model_type = hf.get("model_type")
        if model_type not in ("llama", "qwen2"):
            raise UserError(
                f"{where}: model_type {model_type!r} is not a decoder visto reads; "
                "supported: llama (Llama, SmolLM, TinyLlama) and qwen2"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(
                f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UserError(
                f"{where}: rope scaling {rope_type!r} is not supported (plain rotary only)"
            )
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise UserError(f"{where}: sliding-window attention is not supported")
        if hf.get("mlp_bias") and model_type == "qwen2":
            raise UserError(f"{where}: mlp_bias is not a Qwen2 setting")
        eos = hf.get("eos_token_id")
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
            head_dim = None  # the default, kept implicit so configs compare equal
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            attention_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
        )


# One row a size, as a table (nanoGPT's config_args): what tells them apart reads down a column.
PRESETS = {
    "tiny": DecoderConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=128, max_position_embeddings=512),
    "small": DecoderConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8,
                           num_kv_heads=4, intermediate_size=512, max_position_embeddings=1024),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# What a conditioned decoder's layers read besides the tokens


@dataclass
class Conditioning:
    """Arguments of the layer loop beyond the tokens (see the module docstring).

    before_layer: {i: f}: f(x) -> x runs on layer i's input x (B, T, C) before the layer
        (Flamingo: the gated cross-attention block that reads the images).
    experts: one module per layer holding expert projections under the layer's own names
        (`self_attn.q_proj`, `mlp.down_proj`, ...), and expert_mask (B, T) True at the
        positions they compute instead of the layer's weights (CogVLM's visual expert).
    """

    before_layer: Mapping[int, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    experts: Sequence[nn.Module] | None = None
    expert_mask: Tensor | None = None

    def expert(self, i: int) -> Expert | None:
        """Layer i's expert, or None (no experts, or no position routed to them)."""
        if self.experts is None or self.expert_mask is None:
            return None
        return Expert(self.experts[i], self.expert_mask)


@dataclass
class DecoderInputs:
    """A prompt as the decoder takes it: what a VLM's `prefill_inputs(batch)` hands the
    engine's fast path (a plain `(embeds, attention_mask)` pair means no conditioning)."""

    embeds: Tensor  # (B, T, C)
    attention_mask: Tensor  # (B, T) 1 = real token, 0 = left padding
    conditioning: Conditioning | None = None  # for the prompt's positions
    # What later decoding steps condition on, per row: it has `select(rows)` and a
    # `merge(contexts)` staticmethod (rows join and leave), and the model's
    # `decode_conditioning(context)` makes each step's Conditioning from it.
    context: Any = None


# --------------------------------------------------------------------------------------------
# Generation state for the engine


@dataclass
class DecoderState:
    """What decoding needs between steps: the KV cache and the padding mask it was built with."""

    kv: KVCache
    attention_mask: Tensor  # (B, T_cached) 1 = real token, 0 = left padding

    def select(self, rows: Tensor) -> DecoderState:
        """Keep only batch rows `rows` (the engine drops finished requests this way)."""
        return DecoderState(self.kv.select(rows), self.attention_mask[rows])


# --------------------------------------------------------------------------------------------
# The model


class DecoderBody(nn.Module):
    """transformers' `LlamaModel`: embeddings, blocks, final norm (the `model.` prefix)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        hd = cfg.resolved_head_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_layers):
            block = DecoderBlock(
                cfg.hidden_size,
                cfg.num_heads,
                cfg.intermediate_size,
                n_kv_heads=cfg.num_kv_heads,
                head_dim=hd,
                eps=cfg.rms_norm_eps,
                bias=cfg.attention_bias,
            )
            if cfg.qkv_bias or cfg.mlp_bias != cfg.attention_bias:
                # DecoderBlock has one bias switch; Qwen2 (q/k/v only) and Llama's separate
                # mlp_bias need the attention and the MLP rebuilt with their own settings.
                block.self_attn = Attention(
                    cfg.hidden_size,
                    cfg.num_heads,
                    n_kv_heads=cfg.num_kv_heads,
                    head_dim=hd,
                    bias=cfg.qkv_bias or cfg.attention_bias,
                    out_bias=cfg.attention_bias,
                )
                block.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.layers.append(block)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(hd, theta=cfg.rope_theta)  # buffers only, not saved


@torch.no_grad()
def mimetic_init(layers: nn.ModuleList) -> None:
    """Copy each key head into the query heads that share it (grouped-query attention)."""
    for layer in layers:
        attn = layer.self_attn
        hd, group = attn.head_dim, attn.n_heads // attn.n_kv_heads
        for h in range(attn.n_heads):
            g = h // group
            attn.q_proj.weight[h * hd : (h + 1) * hd] = attn.k_proj.weight[g * hd : (g + 1) * hd]
            if attn.q_proj.bias is not None and attn.k_proj.bias is not None:
                attn.q_proj.bias[h * hd : (h + 1) * hd] = attn.k_proj.bias[g * hd : (g + 1) * hd]


class DecoderLM(nn.Module):
    """A Llama-layout causal LM with transformers' `LlamaForCausalLM` parameter names."""

    # A training batch (no cache) with padding or packed exchanges runs its attention as
    # blocks (`PackedLayout`: no masked block computed) and, without conditioning, every
    # other layer on its real tokens only; False: the dense (T, T) mask over every position,
    # the reference the fast path is tested against (same numbers to float rounding).
    fast_packing: bool = True

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        if config.attention_init == "mimetic":
            mimetic_init(self.model.layers)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Llama's initializer_range 0.02 for every matrix; norms start at 1 (their own init).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.num_layers)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T, C)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        num_logits_to_keep: int = 0,
        segment_ids: Tensor | None = None,
        conditioning: Conditioning | None = None,
        head: bool = True,
    ) -> tuple[Tensor, KVCache | None]:
        """Next-token logits (B, T, V) for input_ids (B, T) or inputs_embeds (B, T, C).

        attention_mask: (B, T_past + T), 1 = real token, 0 = padding (as in transformers);
            None means no padding.
        position_ids: (B, T); by default counted from the first real token of each row.
        kv_cache: keys/values of earlier positions, extended in place and returned.
        num_logits_to_keep: if > 0, only the last that many positions get logits (prefill
            needs one; the vocabulary projection is the largest matmul of a small model).
        segment_ids: (B, T), shared-prefix packing (`Sample.independent_turns`): a token sees
            the earlier tokens of segment 0 and of its own segment only. Training only.
        conditioning: what the layers read besides the tokens (`Conditioning`): functions
            run before given layers, expert weights for masked positions.
        head: False returns the last hidden states after the final norm (B, T, C) instead
            of logits, for a caller with a head of its own beside `lm_head` (a pointer).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        assert x.ndim == 3 and x.shape[-1] == self.config.hidden_size, (
            f"inputs must be (B, T, {self.config.hidden_size}), got {tuple(x.shape)}"
        )
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if segment_ids is not None:
            assert past == 0 and segment_ids.shape == (B, T), (
                f"segment_ids must be (B, T) = {(B, T)} without a cache, got {tuple(segment_ids.shape)}"
            )
        if attention_mask is not None:
            assert attention_mask.shape == (B, past + T), (
                f"attention_mask must be (B, past + T) = {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        cond = conditioning or Conditioning()
        layout = None
        if self.fast_packing and kv_cache is None and (
            segment_ids is not None or (attention_mask is not None and not bool(attention_mask.all()))
        ):
            # Conditioning reads (B, T) positions (Flamingo's blocks, CogVLM's expert mask):
            # then the padding stays and only the attention is blocked.
            plain = not cond.before_layer and cond.expert(0) is None
            layout = packed_layout(attention_mask, segment_ids, (B, T), unpad=plain)
        if layout is not None:
            if position_ids is None:
                position_ids = (
                    position_ids_from_padding(attention_mask)
                    if attention_mask is not None
                    else torch.arange(T, device=x.device).expand(B, T)
                )
            assert position_ids.shape == (B, T), (
                f"position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}"
            )
            if layout.tokens is not None:  # every layer on the real tokens only
                h = layout.unpad(x)  # (1, N, C)
                rope = self.model.rotary(layout.unpad(position_ids), dtype=x.dtype)
            else:
                h, rope = x, self.model.rotary(position_ids, dtype=x.dtype)
            for i, layer in enumerate(self.model.layers):
                if i in cond.before_layer:
                    h = cond.before_layer[i](h)
                h = layer(h, rope=rope, expert=cond.expert(i), packed=layout)
            x = h if layout.tokens is None else layout.pad(h, (B, T))
            return self._output(x, num_logits_to_keep, head, kv_cache)
        mask = None
        if attention_mask is not None:
            if position_ids is None:
                position_ids = position_ids_from_padding(attention_mask, past)
            if not bool(attention_mask.all()):
                # (B, 1, 1, T_k): padding keys hidden from every query; Attention adds causality.
                mask = attention_mask.bool()[:, None, None, :]
        if segment_ids is not None:
            keys, queries = segment_ids[:, None, None, :], segment_ids[:, None, :, None]
            same = (keys == 0) | (keys == queries)  # (B, 1, T, T); Attention adds causality
            mask = same if mask is None else mask & same
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        assert position_ids.shape == (B, T), (
            f"position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}"
        )
        rope = self.model.rotary(position_ids, dtype=x.dtype)
        for i, layer in enumerate(self.model.layers):
            if i in cond.before_layer:
                x = cond.before_layer[i](x)
            cache = kv_cache.layers[i] if kv_cache is not None else None
            x = layer(x, rope=rope, mask=mask, cache=cache, expert=cond.expert(i))
        return self._output(x, num_logits_to_keep, head, kv_cache)

    def _output(
        self, x: Tensor, num_logits_to_keep: int, head: bool, kv_cache: KVCache | None
    ) -> tuple[Tensor, KVCache | None]:
        """The last layer's output (B, T, C) -> the final norm, and the logits if `head`."""
        if num_logits_to_keep > 0:
            x = x[:, -num_logits_to_keep:]
        hidden = self.model.norm(x)
        if not head:
            return hidden, kv_cache
        return self.lm_head(hidden), kv_cache  # (B, T, V)

    # ---------------------------------------------------------------- engine protocol

    @torch.inference_mode()
    def prefill_embeds(
        self, inputs_embeds: Tensor, attention_mask: Tensor,
        conditioning: Conditioning | None = None, head: bool = True,
    ) -> tuple[Tensor, DecoderState]:  # fmt: skip
        """Run a left-padded prompt (B, T, C); return the last position's logits (B, V)
        (`head=False`: its hidden state after the final norm, (B, C))."""
        kv = self.new_cache()
        logits, _ = self(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            kv_cache=kv,
            num_logits_to_keep=1,
            conditioning=conditioning,
            head=head,
        )
        return logits[:, -1], DecoderState(kv, attention_mask)

    def prefill(self, batch: Any) -> tuple[Tensor, DecoderState]:
        """`batch` has left-padded `input_ids` and `attention_mask`, both (B, T)."""
        with torch.inference_mode():
            embeds = self.embed(batch.input_ids)
        return self.prefill_embeds(embeds, batch.attention_mask)

    @torch.inference_mode()
    def decode_step(
        self, next_ids: Tensor, state: DecoderState, conditioning: Conditioning | None = None,
        head: bool = True,
    ) -> tuple[Tensor, DecoderState]:  # fmt: skip
        """Feed one token per row (B,); return the next logits (B, V) and the extended state
        (`head=False`: the hidden state after the final norm (B, C) instead of logits)."""
        assert next_ids.ndim == 1 and next_ids.shape[0] == state.attention_mask.shape[0], (
            f"next_ids must be (B,) with B = {state.attention_mask.shape[0]}, "
            f"got {tuple(next_ids.shape)}"
        )
        mask = state.attention_mask
        position_ids = mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens so far = next position
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, T_cached + 1)
        logits, kv = self(
            next_ids[:, None], attention_mask=mask, position_ids=position_ids, kv_cache=state.kv,
            conditioning=conditioning, head=head,
        )
        assert kv is not None
        return logits[:, -1], DecoderState(kv, mask)

    # ---------------------------------------------------------------- transformers format

    def hf_key_map(self) -> dict[str, str]:
        """Our state-dict key -> the transformers key. Identity by construction; written out so
        that the format is documented in one place and a renamed module fails loudly here."""
        keys = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}"
            keys += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                keys.append(f"{p}.self_attn.{proj}.weight")
                has_bias = self.config.attention_bias or (self.config.qkv_bias and proj != "o_proj")
                if has_bias:
                    keys.append(f"{p}.self_attn.{proj}.bias")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys.append(f"{p}.mlp.{proj}.weight")
                if self.config.mlp_bias:
                    keys.append(f"{p}.mlp.{proj}.bias")
        if not self.config.tie_word_embeddings:
            keys.append("lm_head.weight")
        return {k: k for k in keys}

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DecoderLM:
        """A transformers-format decoder (Llama / Qwen2 / SmolLM) from a directory or a hub id."""
        from visto.nn.weights import load_by_key_map, read_config_json

        directory = resolve_pretrained(path_or_hub_id)
        config_path = directory / "config.json"
        hf_config = read_config_json(directory)
        model = cls(DecoderConfig.from_hf(hf_config, where=str(config_path)))
        tied = model.config.tie_word_embeddings
        load_by_key_map(
            model,
            directory,
            model.hf_key_map(),
            # rotary tables are recomputed from rope_theta; some tied checkpoints store the copy
            ignore=lambda key: (
                key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight")
            ),
        )
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors in the transformers format (atomically)."""
        from safetensors.torch import save_file

        from visto.utils.io import atomic_directory, atomic_write_json

        state = self.state_dict()
        tensors = {
            hf: state[ours].detach().contiguous().cpu() for ours, hf in self.hf_key_map().items()
        }
        with atomic_directory(directory) as tmp:
            atomic_write_json(tmp / "config.json", self.config.to_hf())
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return Path(directory)


def resolve_pretrained(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id, fetched (or found in the cache) by
    `huggingface_hub.snapshot_download`, the same resolution transformers uses."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise UserError(
            f"{text} is not a model directory (one with config.json and model.safetensors) "
            "nor a hub id like 'HuggingFaceTB/SmolLM2-135M'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as e:  # offline, unknown repo, gated repo: all the same to the user
        raise UserError(
            f"could not fetch {text!r} from the hub ({type(e).__name__}: {e}); on an offline "
            "machine download it elsewhere and pass the local directory"
        ) from None
