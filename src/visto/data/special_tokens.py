"""visto's special tokens: their spellings and their fixed ids.

Every visto tokenizer's vocabulary starts with these, in this order, so their ids never move
(`visto.data.tokenizer` checks it on load):

    id  token            use
    0   <pad>            padding (never attended to, never a label)
    1   <s>              first token of every sequence
    2   </s>             end of a plain text (text-encoder and caption-only data)
    3   <image>          one visual feature each; the model overwrites these embeddings
    4   <im_start>       opens an image span
    5   <im_end>         closes an image span
    6   <im_newline>     ends a row of patches (Fuyu-style images; Fuyu's |NEWLINE|)
    7   <|system|>       opens a system turn
    8   <|user|>         opens a user turn
    9   <|assistant|>    opens an assistant turn
    10  <|end|>          ends any turn; generation stops on it

The tokenizer and the chat template both spell them, so they live here, below both.
"""

from __future__ import annotations

from visto.data.sample import IMAGE_PLACEHOLDER

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
IMAGE = IMAGE_PLACEHOLDER
IM_START = "<im_start>"
IM_END = "<im_end>"
IM_NEWLINE = "<im_newline>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (
    PAD,
    BOS,
    EOS,
    IMAGE,
    IM_START,
    IM_END,
    IM_NEWLINE,
    *ROLE_TOKENS.values(),
    END_OF_TURN,
)

# Optional, added after the location tokens by `tokenizer.with_focus_token` (so the ids above
# never move): the slots in which a model with a question focus (visto.connectors.focus)
# writes, before each answer, the object its question names and that object's box.
FOCUS = "<focus>"

# Where every family splices visual features into the token sequence (id 3).
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE)
