"""Constrained JSON closes within the token budget (visto.infer.constrain's closing path).

A stand-in model whose logits never change is biased to run a string on (it prefers 'a', then
'[' and '"', and ranks ']' and '}' last): under the grammar alone it fills a string until the
budget cuts it. With the closing path every budget from the fewest tokens the schema needs
upward ends with the stop token, and the text parses and follows the schema (maxLength and
maxItems included), greedy and sampled."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from test_serve_support import corpus
from visto.data.tokenizer import train_tokenizer
from visto.infer.constrain import Grammars
from visto.infer.sampling import SamplingParams, sample_token

SCHEMAS = {
    # the case: LangChain's with_structured_output of a list of names
    "open_array": {"type": "object", "properties": {
        "objects": {"type": "array", "items": {"type": "string"}}},
        "required": ["objects"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "scene": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["name", "n"], "additionalProperties": False}},
            "ok": {"type": "boolean"}}, "required": ["items", "ok"], "additionalProperties": False},
        "note": {"type": "string"}}, "required": ["scene", "note"], "additionalProperties": False},
    "bounded": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "label": {"type": "string", "minLength": 2, "maxLength": 9}},
        "required": ["tags", "label"], "additionalProperties": False},
}  # fmt: skip


GREEDY_LAST = {
    "open_array": '{"objects":["' + "a" * 36 + '"]}',
    "nested": '{"scene":{"items":[{"name":"' + "a" * 22 + '","n":0}],"ok":true},"note":""}',
    "bounded": '{"tags":["aaaa","aaaa"],"label":"aaaaaaaaa"}',  # maxItems and maxLength hold
}


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """The JSON Schema subset above, checked by hand."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", [])) <= set(value)
                and (schema.get("additionalProperties", True) or set(value) <= set(props))
                and all(conforms(v, props[k]) for k, v in value.items() if k in props))  # fmt: skip
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(conforms(v, schema["items"]) for v in value))  # fmt: skip
    if kind == "string":
        return isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get(
            "maxLength", len(value))  # fmt: skip
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return schema == {}


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(corpus(), vocab_size=400, loc_bins=16)
    grammars = Grammars(tok, tok.vocab_size, [tok.end_id])
    logits = torch.randn(tok.vocab_size, generator=torch.Generator().manual_seed(0))
    for rank, text in enumerate(["a", "[", '"', "1"]):  # run a string (or a number) on
        logits[tok.encode(text)[0]] = 30.0 - rank
    for text in ["]", "}"]:
        logits[tok.encode(text)[0]] = -30.0
    return tok, grammars, logits


def decode(grammars, compiled, logits, budget: int, temperature: float, seed: int) -> list[int]:
    params = SamplingParams(max_new_tokens=budget, temperature=temperature,
                            logits_processor=grammars.constraint(compiled))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    generated: list[int] = []
    none = torch.zeros(0, dtype=torch.long)
    while len(generated) < budget:
        generated.append(sample_token(logits, params, g, none, generated))
        if generated[-1] in grammars._closing.stop_ids:
            break
    return generated


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_budget_from_the_fewest_tokens_up_closes_valid_json(setup, name) -> None:
    tok, grammars, logits = setup
    schema = SCHEMAS[name]
    compiled = grammars.compile_json(schema)
    fewest = grammars.fewest_tokens(compiled)
    assert fewest is not None and fewest > 3
    greedy = []
    for budget in range(fewest, fewest + 40):
        for temperature, seed in [(0.0, 0), (1.0, budget), (3.0, budget)]:
            ids = decode(grammars, compiled, logits, budget, temperature, seed)
            assert ids[-1] == tok.end_id and len(ids) <= budget, (budget, tok.decode(ids))
            text = tok.decode(ids[:-1])
            assert conforms(json.loads(text), schema), text
            if temperature == 0:
                greedy.append(text)
    # The model runs strings on while the budget lasts (up to maxLength where there is one):
    # the closing path cut it short.
    assert GREEDY_LAST[name] == greedy[-1]


def test_without_the_closing_path_the_same_model_runs_out_of_budget(setup) -> None:
    """The guard is needed: the grammar alone leaves the answer open when the budget ends."""
    tok, grammars, logits = setup
    compiled = grammars.compile_json(SCHEMAS["open_array"])
    constraint = grammars.constraint(compiled)
    generated: list[int] = []
    for _ in range(30):
        generated.append(int(constraint(generated, logits).argmax()))
    assert tok.decode(generated).startswith('{"objects":["aaa')
    with pytest.raises(json.JSONDecodeError):
        json.loads(tok.decode(generated))


def test_a_budget_below_the_fewest_tokens_is_reported_up_front(setup) -> None:
    """fewest_tokens is a path that closes: followed alone it ends the answer valid."""
    tok, grammars, logits = setup
    compiled = grammars.compile_json(SCHEMAS["nested"])
    fewest = grammars.fewest_tokens(compiled)
    ids = decode(grammars, compiled, logits, fewest, 0.0, 0)
    assert len(ids) == fewest and ids[-1] == tok.end_id
    assert json.loads(tok.decode(ids[:-1])) == {"scene": {"items": [], "ok": True}, "note": ""}
    # any JSON object: '{}' and the stop
    assert grammars.fewest_tokens(grammars.compile_json(None)) <= 3
