"""Every family trains on shared-prefix packed samples (`Sample.independent_turns`) with the
loss it would get from the exchanges asked one by one: the decoder's `segment_ids` hide each
exchange from the others, and positions restart after the image prefix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.models import build_model
from visto.models.blip2 import Blip2Config
from visto.models.cogvlm import CogVLMConfig
from visto.models.flamingo import FlamingoConfig
from visto.models.fuyu import FuyuConfig
from visto.models.llava import LlavaConfig

QAS = [
    ("What colour is the square?", "red"),
    ("How many squares?", "one"),
    ("Is it big?", "yes no"),
]
TEXTS = [q + " " + a for q, a in QAS] * 5

FAMILIES = {
    "llava": (LlavaConfig, {}),
    "fuyu": (FuyuConfig, {}),
    "cogvlm": (CogVLMConfig, {}),
    "flamingo": (FlamingoConfig, {}),
    "blip2": (Blip2Config, {"losses": ["lm"]}),  # stage 2: the soft prompt into the decoder
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(
        path / "tokenizer.json"
    )
    return path


def conversation(qas, image, **kw) -> Sample:
    turns = []
    for j, (q, a) in enumerate(qas):
        turns += [Turn("user", f"<image>\n{q}" if j == 0 else q), Turn("assistant", a)]
    return Sample(id="s", images=[image], turns=turns, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_equals_the_exchanges_asked_alone(family, tokenizer_dir):
    config_cls, overrides = FAMILIES[family]
    config = config_cls.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
    model = build_model(family, config, seed=0).eval()
    if family == "flamingo":  # open the tanh gates, as training would: the image must matter
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                block.alpha_cross_attn.fill_(1.0)
                block.alpha_dense.fill_(0.5)
    image = Image.new("RGB", (48, 32), (200, 30, 30))
    image.paste((30, 30, 200), (8, 8, 24, 24))
    packed = conversation(QAS, image, independent_turns=True)
    alone = [conversation([qa], image) for qa in QAS]
    with torch.no_grad():
        packed_loss = model(model.collate([packed]))["loss"]
        alone_loss = model(model.collate(alone))["loss"]  # the same answer tokens, one row each
        chained_loss = model(model.collate([dataclasses.replace(packed, independent_turns=False)]))[
            "loss"
        ]
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-5, rtol=1e-5)
    assert (
        chained_loss - packed_loss
    ).abs() > 1e-4  # without segments the exchanges see each other
