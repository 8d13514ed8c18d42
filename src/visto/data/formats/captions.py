"""Caption records: an image and its caption(s), no conversation.

Image-caption datasets (COCO, WebDataset shards from img2dataset or `webdataset.TarWriter`,
HF parquet with `image` + `text` columns, JSON lists of `{"image", "caption"}`) carry no
turns. Each such record reads as a sample of the caption task:

    [user "<image>\\nDescribe the image briefly.", assistant "<first caption>"]
    truth = {"captions": [every caption]}          what caption metrics compare against

A record that has a conversation field (`turns`, `conversations`, `messages`) keeps its
turns, unless `caption_key` names a field explicitly: then that field is the caption.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from visto.data.sample import Turn

from ._common import caption_turns, check_truth, turns_from_record
from .stats import BAD_FIELDS, BadRecord

CONVERSATION_KEYS = ("turns", "conversations", "messages")
# The names caption datasets use, tried in order when no caption_key is given.
DEFAULT_CAPTION_KEYS = ("caption", "text", "captions")
SETTING_HINT = "set data.caption_key (or --caption-key) to the name your data uses"


def caption_key_in(names: Iterable[str], caption_key: str | None) -> str | None:
    """The caption field among `names`: `caption_key` if given, else the first default found."""
    names = list(names)
    if caption_key is not None:
        return caption_key if caption_key in names else None
    return next((k for k in DEFAULT_CAPTION_KEYS if k in names), None)


def captions_from(value: Any, what: str) -> list[str]:
    """A caption cell (a string, or a list of strings) as a non-empty list of stripped strings."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise BadRecord(BAD_FIELDS, f"{what} must be a string or a list of strings, got {value!r}")
    captions = [v.strip() for v in values if v.strip()]
    if not captions:
        raise BadRecord(BAD_FIELDS, f"{what} is empty")
    return captions


def caption_sample_parts(
    captions: list[str], truth: dict[str, Any] | None = None
) -> tuple[list[Turn], dict[str, Any]]:
    """(turns, truth) of a caption sample; `truth` keeps whatever else the record knew."""
    truth = dict(truth or {})
    truth["captions"] = captions
    return caption_turns(captions[0]), truth


def turns_and_truth(
    record: dict[str, Any], caption_key: str | None
) -> tuple[list[Turn], dict[str, Any] | None]:
    """A JSON record's (turns, truth): its conversation, or else its caption."""
    truth = check_truth(record.get("truth"))
    if caption_key is None and any(k in record for k in CONVERSATION_KEYS):
        return turns_from_record(record), truth
    key = caption_key_in(record, caption_key)
    if key is None:
        raise BadRecord(BAD_FIELDS, missing_fields_message(sorted(record), caption_key))
    return caption_sample_parts(captions_from(record[key], f'"{key}"'), truth)


def missing_fields_message(found: list[str], caption_key: str | None) -> str:
    if caption_key is not None:
        return f"no {caption_key!r} field (the caption_key setting); it has {found}"
    return (
        f"no conversation ({', '.join(CONVERSATION_KEYS)}) or caption "
        f"({', '.join(DEFAULT_CAPTION_KEYS)}) field; it has {found}: {SETTING_HINT}"
    )
