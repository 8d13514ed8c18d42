"""models.common.LazyProcessor: the one `processor` property of the generative families, built
from the config on first use, every processor set going through the family's accept_processor."""

from __future__ import annotations

from dataclasses import replace

import pytest

from visto.data.processor import Processor
from visto.data.tokenizer import Tokenizer, train_tokenizer
from visto.errors import UserError
from visto.models import FAMILIES, build_model
from visto.models.common import LazyProcessor

TEXTS = ["What is this?", "a red square", "a blue bar", "How many circles are there?"] * 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


GENERATIVE = ("llava", "cogvlm", "blip2", "flamingo", "fuyu")


@pytest.mark.parametrize("family", GENERATIVE)
def test_every_generative_family_has_the_one_property(family):
    cls = FAMILIES[family][1]
    assert issubclass(cls, LazyProcessor)
    assert cls.processor is LazyProcessor.processor  # no family redefines it
    assert all("processor" not in vars(c) for c in cls.__mro__ if c is not LazyProcessor)


@pytest.mark.parametrize(("family", "name"), [("llava", "LLaVA"), ("cogvlm", "LLaVA"),
                                              ("blip2", "BLIP-2"), ("flamingo", "Flamingo"),
                                              ("fuyu", "Fuyu")])  # fmt: skip
def test_built_on_first_use_from_the_config_and_checked_when_set(family, name, tokenizer_dir):
    config_cls = FAMILIES[family][0]
    without = build_model(family, config_cls.preset("tiny"), seed=0)
    with pytest.raises(UserError, match=f"this {name} model has no tokenizer"):
        _ = without.processor

    model = build_model(family, config_cls.preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0)
    assert model._processor is None  # nothing built until asked
    processor = model.processor
    assert processor is model.processor  # built once, kept
    assert processor.tokenizer.encode("a red square") == Tokenizer.load(tokenizer_dir).encode("a red square")

    # A processor that does not fit goes through accept_processor and is not kept.
    too_big = Processor(replace(processor.config, vocab_size=100_000),
                        train_tokenizer(TEXTS * 40 + [str(i) for i in range(2000)], vocab_size=5000,
                                        loc_bins=32, min_frequency=1))  # fmt: skip
    with pytest.raises(UserError, match="tokens but"):
        model.processor = too_big
    assert model.processor is processor
