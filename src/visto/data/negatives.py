"""Hard negative captions by word swaps (NegCLIP: Yuksekgonul et al. 2023, "When and why
vision-language models behave like bags-of-words, and what to do about it", section 4).

A caption becomes a caption that is false for its image by swapping one whole word for
another of the same list of interchangeable words ("a red circle" -> "a red star", or
-> "a blue circle"). Trained as an extra text the image must rank below its own caption, it
gives the words that random in-batch negatives rarely test (in the synthetic world colour
alone tells almost every pair apart, so shape got almost no gradient) a gradient of their own.

The replacement is never a word the caption already has: a swap must make the caption false,
and "a red circle and a blue star" -> "a red star and a blue star" could still describe the
image's star. A word counts as present when a caption word equals it or begins with it, so
"circle" is present in "two circles" (the world's plurals).
"""

from __future__ import annotations

import random
import re

from visto.errors import UserError

_WORD = re.compile(r"\w+")


def check_swap_groups(groups: object, where: str = "hard_negative_swaps") -> list[list[str]]:
    """The swap lists as given, lower-cased, or a UserError that says what is wrong."""
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(g, (list, tuple)) for g in groups
    ):
        raise UserError(
            f"{where} must be a list of lists of interchangeable words, e.g. "
            f'[["circle", "square"], ["red", "blue"]], got {groups!r}'
        )
    seen: dict[str, int] = {}
    out = []
    for i, group in enumerate(groups):
        words = []
        for word in group:
            if not isinstance(word, str) or not _WORD.fullmatch(word):
                raise UserError(
                    f"{where}[{i}]: {word!r} is not one word (letters, digits, underscores)"
                )
            word = word.lower()
            if word in seen:
                raise UserError(
                    f"{where}: {word!r} is in list {seen[word]} and list {i}; a word can swap "
                    "within one list only"
                )
            seen[word] = i
            words.append(word)
        if len(words) < 2:
            raise UserError(f"{where}[{i}] needs at least two words to swap between, got {group!r}")
        out.append(words)
    return out


def swap_word(caption: str, groups: list[list[str]], rng: random.Random) -> str | None:
    """`caption` with one whole word (case-insensitive) replaced by another word of its list
    that the caption does not have; None when no word of the caption can be swapped.

    The position is drawn uniformly among the swappable words, then the replacement among
    its allowed words. A capitalised word stays capitalised."""
    group_of = {w: g for g in groups for w in g}
    present = [m.group().lower() for m in _WORD.finditer(caption)]
    options = []
    for m in _WORD.finditer(caption):
        group = group_of.get(m.group().lower())
        if group is None:
            continue
        allowed = [w for w in group if not any(p.startswith(w) for p in present)]
        if allowed:
            options.append((m, allowed))
    if not options:
        return None
    m, allowed = options[rng.randrange(len(options))]
    new = allowed[rng.randrange(len(allowed))]
    if m.group()[0].isupper():
        new = new.upper() if m.group().isupper() and len(m.group()) > 1 else new.capitalize()
    return caption[: m.start()] + new + caption[m.end() :]
