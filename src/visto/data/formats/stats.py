"""Counting and reporting the records a reader had to skip.

A dataset of a million records with a handful of broken ones should train, not crash in
epoch three; but a skip must never be silent. Every reader therefore turns a malformed
record into a `BadRecord`, and the read loop hands it to `ReadStats.skip`, which counts it
by reason, logs a warning naming the file, the record key and what was wrong (the first
`MAX_LOGGED` of them), and `ReadStats.log_summary` reports the totals at the end.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("visto.data.formats")

MAX_LOGGED = 20  # warnings logged one by one; the rest are only counted (and summarized)
EXAMPLES_PER_REASON = 3  # skipped records kept per reason, for `visto data inspect`

# Reasons a record is skipped: the keys of `ReadStats.reasons`.
BAD_JSON = "bad json"
BAD_FIELDS = "bad fields"
MISSING_IMAGE = "missing image"
BAD_IMAGE = "bad image"
PLACEHOLDER_MISMATCH = "placeholder mismatch"
NO_CAPTIONS = "no captions"
TRUNCATED = "truncated file"


class BadRecord(Exception):
    """One malformed record: the read loop skips it and counts it under `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class ReadStats:
    """What one `read_samples` pass read and skipped, and why.

    Pass one in to inspect it afterwards:

        stats = ReadStats()
        for sample in read_samples("data.json", stats=stats): ...
        print(stats.summary())      # "read 998, skipped 2 (missing image: 1, bad json: 1)"
    """

    read: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    # "file: key: message" for the first MAX_LOGGED skips, in order.
    messages: list[str] = field(default_factory=list)
    # reason -> "key: message" of its first EXAMPLES_PER_REASON skips: a rare reason is
    # shown even when a common one fills `messages`.
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, file: object, key: object, error: BadRecord) -> None:
        self.skipped += 1
        self.reasons[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{key}: {error.message}")
        line = f"{file}: record {key}: {error.message} (skipped)"
        if len(self.messages) < MAX_LOGGED:
            self.messages.append(line)
            log.warning(line)
            if len(self.messages) == MAX_LOGGED:
                log.warning("further skipped records are counted but not logged one by one")

    def summary(self) -> str:
        text = f"read {self.read}, skipped {self.skipped}"
        if self.reasons:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) + ")"
        return text

    def log_summary(self, source: object) -> None:
        """One line at the end of a pass: a warning if anything was skipped, else info."""
        level = logging.WARNING if self.skipped else logging.INFO
        log.log(level, "%s: %s", source, self.summary())
