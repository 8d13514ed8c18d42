"""A family refuses a processor that does not fit its towers (models.common.fit_problems),
with one message naming the family and every problem."""

from __future__ import annotations

from dataclasses import replace

import pytest

from visto.errors import UserError
from visto.models import build_model
from visto.models.flamingo import FlamingoConfig
from visto.models.fuyu import FuyuConfig
from visto.models.llava import LlavaConfig

CONFIGS = {"llava": LlavaConfig, "flamingo": FlamingoConfig, "fuyu": FuyuConfig}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_vocabulary_past_the_decoders_is_refused(family):
    config = CONFIGS[family].preset("tiny")
    config = replace(config, processor=replace(config.processor, vocab_size=401))
    with pytest.raises(UserError) as err:
        build_model(family, config)
    message = str(err.value)
    assert message.startswith(f"{family} config: ")
    assert "processor.vocab_size 401 exceeds decoder.vocab_size 400" in message
    assert message.endswith("; make them agree")


@pytest.mark.parametrize("family", ["llava", "flamingo"])
def test_every_problem_is_named_at_once(family):
    config = CONFIGS[family].preset("tiny")
    config = replace(config, processor=replace(config.processor, vocab_size=401, image_size=48))
    with pytest.raises(UserError) as err:
        build_model(family, config)
    message = str(err.value)
    assert "processor.image_size is 48 but the vision tower takes 32 px images" in message
    assert "processor.vocab_size 401 exceeds decoder.vocab_size 400" in message


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_tiny_presets_fit(family):
    build_model(family, CONFIGS[family].preset("tiny"), seed=0)
