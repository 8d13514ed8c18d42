"""The Q-Former (Li et al. 2023, "BLIP-2", section 3.1 and Fig. 2): a small BERT whose input
starts with learned query embeddings; the queries read a frozen image encoder through
cross-attention and hand a fixed number of vectors to whatever comes next.

    queries (1, Q, D), learned          text ids (B, T) -> word + position embeddings (B, T, D)
                 \\                                          /
                  [queries ; text] -> LayerNorm               (B, Q + T, D)
                  L post-norm BERT layers:
                    self-attention over queries and text, under one of three masks (below)
                    cross-attention to the image features, queries only, every
                      `cross_attention_frequency`-th layer (layers 0, 2, 4, ... as in the paper)
                    a feed-forward for the queries and another for the text
                  -> query outputs (B, Q, D), text outputs (B, T, D)

The image features may have any length: the output is (B, Q, D) whatever the image size or
patch count, which is the point of a Q-Former (a bottleneck of Q vectors per image).

Masks (Fig. 2 of the paper; True = may attend), built by `qformer_attention_mask`:
    "unimodal"       queries see queries, text sees text: ITC (and text-only encoding)
    "bidirectional"  everything sees everything: ITM
    "causal"         queries see queries only; text sees every query and the text up to itself:
                     ITG (image-grounded generation) and nothing leaks from the future
Padding keys of the text are hidden under every mask.

Names mirror transformers' `Blip2QFormerModel` (`layernorm`, `encoder.layer.N.attention`,
`crossattention`, `intermediate_query`, `output_query`, `intermediate`, `output`), with the query
tokens and the BERT text embeddings kept here too (transformers puts them one level up, as
`query_tokens` and `embeddings`). Attention itself is visto's `Attention` (q/k/v_proj,
out_proj); `hf_key_map` renames those few keys to transformers' query/key/value/output.dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visto.errors import UserError
from visto.nn.attention import Attention
from visto.nn.transformer import activation

MASK_MODES = ("unimodal", "bidirectional", "causal")


@dataclass
class QFormerConfig:
    num_queries: int = 32  # the paper's 32; fewer suit a 64-px world (the LM reads Q tokens)
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    cross_attention_frequency: int = 2  # cross-attention in layers i % freq == 0 (paper: every other)
    vocab_size: int = 1024  # the text side's vocabulary (the processor's tokenizer)
    max_text_len: int = 32  # text positions (position embeddings)
    act: str = "gelu"
    eps: float = 1e-12  # BERT's LayerNorm eps
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout

    def __post_init__(self) -> None:
        problems = []
        if self.num_queries < 1 or self.layers < 1 or self.max_text_len < 2:
            problems.append("num_queries and layers must be >= 1, max_text_len >= 2")
        if self.hidden_size % self.heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if self.cross_attention_frequency < 1:
            problems.append("cross_attention_frequency must be >= 1")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise UserError("qformer config: " + "; ".join(problems))

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


def qformer_attention_mask(mode: str, num_queries: int, text_mask: Tensor | None) -> Tensor:
    """(B, 1, Q + T, Q + T) boolean mask for `mode` (module docstring); `text_mask` (B, T) has
    1 on real tokens (None: no text). True = the row's position may attend to the column's."""
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if text_mask is None:
        return torch.ones(1, 1, num_queries, num_queries, dtype=torch.bool)
    B, T = text_mask.shape
    Q, L, device = num_queries, num_queries + T, text_mask.device
    is_query = torch.arange(L, device=device) < Q  # (L,)
    if mode == "bidirectional":
        allowed = torch.ones(L, L, dtype=torch.bool, device=device)
    elif mode == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]  # same modality only
    else:  # causal: queries never see text; text sees all queries and earlier text
        pos = torch.arange(L, device=device)
        allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))
    keys_real = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), text_mask.bool()], 1)
    return allowed[None, None] & keys_real[:, None, None, :]  # (B, 1, L, L)


# ----------------------------------------------------------------------------- parts


class PostNormAttention(nn.Module):
    """BERT's attention sub-layer: LayerNorm(x + dropout(attention(x)))."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int | None = None) -> None:
        super().__init__()
        self.attention = Attention(
            cfg.hidden_size, cfg.heads, kv_dim=kv_dim, bias=True, out_name="out_proj",
            dropout=cfg.dropout,
        )
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)  # noqa: N815 (BERT's name)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.LayerNorm(x + self.dropout(self.attention(x, context, mask=mask)))


class Intermediate(nn.Module):
    """BERT's feed-forward, first half: dense -> activation (transformers' `intermediate`)."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class Output(nn.Module):
    """BERT's feed-forward, second half: LayerNorm(residual + dropout(dense(h)))."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)  # noqa: N815
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(hidden)))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int, image_dim: int) -> None:
        super().__init__()
        self.attention = PostNormAttention(cfg)
        self.has_cross_attention = cfg.has_cross_attention(index)
        if self.has_cross_attention:
            self.crossattention = PostNormAttention(cfg, kv_dim=image_dim)
        # Queries and text share the attention but not the feed-forward (paper, section 3.1).
        self.intermediate_query, self.output_query = Intermediate(cfg), Output(cfg)
        self.intermediate, self.output = Intermediate(cfg), Output(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, image: Tensor | None, num_queries: int) -> Tensor:
        """x (B, Q + T, D) -> (B, Q + T, D); `image` (B, P, D_img) is read by the queries only."""
        x = self.attention(x, mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.has_cross_attention:
                assert image is not None, "a Q-Former with queries needs image features"
                queries = self.crossattention(queries, context=image)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_dim: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(cfg, i, image_dim) for i in range(cfg.layers)])


class TextEmbeddings(nn.Module):
    """BERT's word + position embeddings (transformers' `Blip2TextEmbeddings`); the LayerNorm
    is the Q-Former's `layernorm`, applied after the queries are prepended."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D)


class TextLMHead(nn.Module):
    """BERT's prediction head for ITG: dense -> act -> LayerNorm -> vocabulary, the last
    matrix tied to the word embeddings (BLIP-2's text generation shares the Q-Former)."""

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)  # noqa: N815
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(x))))  # (B, T, V)


@dataclass
class QFormerOutput:
    queries: Tensor | None  # (B, Q, D); None when no image was given
    text: Tensor | None  # (B, T, D); None when no text was given


class QFormer(nn.Module):
    """See the module docstring. `image_dim` is the width of the image features read."""

    def __init__(self, cfg: QFormerConfig, image_dim: int) -> None:
        super().__init__()
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.embeddings = TextEmbeddings(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = QFormerEncoder(cfg, image_dim)
        self.lm_head = TextLMHead(cfg, self.embeddings.word_embeddings)
        self.apply(_init_bert)
        nn.init.normal_(self.query_tokens, std=0.02)  # BLIP-2's query init (initializer_range)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def forward(
        self,
        image_features: Tensor | None = None,
        input_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        mode: str = "unimodal",
    ) -> QFormerOutput:
        """image_features (B, P, D_img), any P: with them, the queries run (and read the image);
        input_ids (B, T) with text_mask (B, T): the text runs, under `mode`'s mask.
        Either or both; text alone needs no image (unimodal text encoding)."""
        if image_features is None and input_ids is None:
            raise ValueError("give image_features, input_ids, or both")
        parts, Q = [], 0
        if image_features is not None:
            assert image_features.ndim == 3, (
                f"image features must be (B, P, D), got {tuple(image_features.shape)}"
            )
            B = image_features.shape[0]
            Q = self.config.num_queries
            parts.append(self.query_tokens.expand(B, -1, -1))  # (B, Q, D)
        if input_ids is not None:
            T = input_ids.shape[1]
            assert T <= self.config.max_text_len, (
                f"text of {T} tokens exceeds the Q-Former's max_text_len {self.config.max_text_len}"
            )
            if text_mask is None:
                text_mask = torch.ones_like(input_ids)
            parts.append(self.embeddings(input_ids))  # (B, T, D)
        x = self.dropout(self.layernorm(torch.cat(parts, dim=1)))  # (B, Q + T, D)
        mask = None
        if input_ids is not None:
            if Q:
                mask = qformer_attention_mask(mode, Q, text_mask)  # (B, 1, Q + T, Q + T)
            else:
                keys = text_mask.bool()[:, None, None, :]  # (B, 1, 1, T): text alone
                mask = keys & _causal(T, x.device) if mode == "causal" else keys
        for layer in self.encoder.layer:
            x = layer(x, mask, image_features, Q)
        return QFormerOutput(
            queries=x[:, :Q] if Q else None,
            text=x[:, Q:] if input_ids is not None else None,
        )

    # ---------------------------------------------------------------- transformers format

    def hf_key_map(self) -> dict[str, str]:
        """Our key -> transformers' key in `Blip2ForConditionalGeneration` /
        `Blip2ForImageTextRetrieval` (`query_tokens` and `embeddings.*` live at the top there,
        the rest under `qformer.`). The ITG head (`lm_head`) has no counterpart and is left out."""
        renames = {
            # matched inside "attention.*" and "crossattention.*" alike
            "attention.attention.q_proj.": "attention.attention.query.",
            "attention.attention.k_proj.": "attention.attention.key.",
            "attention.attention.v_proj.": "attention.attention.value.",
            "attention.attention.out_proj.": "attention.output.dense.",
            "attention.LayerNorm.": "attention.output.LayerNorm.",
        }
        out = {}
        for key in self.state_dict():
            if key.startswith("lm_head."):
                continue
            if key == "query_tokens" or key.startswith("embeddings."):
                out[key] = key
                continue
            theirs = key
            for ours, hf in renames.items():
                theirs = theirs.replace(ours, hf)
            out[key] = "qformer." + theirs
        return out


def _causal(T: int, device: torch.device) -> Tensor:
    pos = torch.arange(T, device=device)
    return pos[None, :] <= pos[:, None]  # (T, T)


def _init_bert(module: nn.Module) -> None:
    # BERT's initializer_range 0.02; LayerNorms start at (1, 0).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = [
    "MASK_MODES",
    "QFormer",
    "QFormerConfig",
    "QFormerOutput",
    "qformer_attention_mask",
]
