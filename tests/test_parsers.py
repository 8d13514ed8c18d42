"""The answer readers that tasks and metrics share, on hand-picked answers."""

from __future__ import annotations

import pytest

from visto.tasks.parsers import parse_count, parse_json_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", 3),
        ("There are 3 circles.", 3),
        ("three", 3),
        ("I see two, maybe 3", 2),
        ("no circles", 0),
        ("zero", 0),
        ("the 3rd is 5", 5),  # "3rd" is not a count
        ("twelve", 12),
        ("many", None),
        ("", None),
    ],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_parse_json_answer():
    assert parse_json_answer('{"a": 1}') == (True, {"a": 1})
    assert parse_json_answer('```json\n{"a": 1}\n```') == (True, {"a": 1})
    assert parse_json_answer('{"a": 1') == (False, None)
    assert parse_json_answer("") == (False, None)
