"""LLaVA's cache of frozen-tower patch features (models.llava.FeatureCache): hits, misses on
changed images and weights, its memory bound, where it must not be used, and a training loss
and gradients bit-identical with and without it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.models.llava import PATCH_FEATURES, FeatureCache, Llava, LlavaConfig
from visto.pretrained import build_model

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (200, 30, 200), (20, 20, 20)]
NAMES = ["red", "green", "blue", "yellow", "purple", "black"]


def square(k: int, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    image.paste(Image.new("RGB", (size // 2, size // 2), COLOURS[k]), (size // 4 + k % 3, size // 4))
    return image


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = ["What colour is the square?", *NAMES] * 3
    train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def tiny(tokenizer_dir, cache: FeatureCache | None) -> Llava:
    model = build_model("llava", LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0)
    model.feature_cache = cache
    for p in model.vision_tower.parameters():  # frozen, as optim.module_lrs vision_tower: 0 leaves it
        p.requires_grad_(False)
    return model.train()


def pixels(model: Llava, ks: list[int]) -> torch.Tensor:
    samples = [Sample(str(k), [square(k)], [Turn("user", "<image>\nWhat colour is the square?"),
                                           Turn("assistant", NAMES[k])]) for k in ks]  # fmt: skip
    return model.collate(samples)["pixel_values"]


def batch(model: Llava, ks: list[int]) -> dict:
    samples = [Sample(str(k), [square(k)], [Turn("user", "<image>\nWhat colour is the square?"),
                                           Turn("assistant", NAMES[k])]) for k in ks]  # fmt: skip
    return model.collate(samples)


def uncached(model: Llava, x: torch.Tensor) -> torch.Tensor:
    cache, model.feature_cache = model.feature_cache, None
    try:
        return model.patch_features(x)
    finally:
        model.feature_cache = cache


def test_hit_returns_the_towers_own_features(tokenizer_dir):
    cache = FeatureCache()
    model = tiny(tokenizer_dir, cache)
    x = pixels(model, [0, 1, 2, 3])
    first = model.patch_features(x)
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 4)
    again = model.patch_features(x)
    assert (cache.hits, cache.misses) == (4, 4)
    assert torch.equal(first, again) and torch.equal(again, uncached(model, x))
    # the same images in another order and batch: still hits, each row its own image's
    y = x[[3, 1, 0]]
    assert torch.equal(model.patch_features(y), first[[3, 1, 0]]) and cache.hits == 7
    # a batch that repeats an image (several questions about one picture)
    z = x[[2, 2, 0, 2]]
    assert torch.equal(model.patch_features(z), first[[2, 2, 0, 2]])


def test_changed_image_or_weights_miss(tokenizer_dir):
    cache = FeatureCache()
    model = tiny(tokenizer_dir, cache)
    x = pixels(model, [0, 1, 2, 3])
    model.patch_features(x)
    changed = x.clone()
    changed[1, 0, 5, 5] += 0.25  # one pixel of one image
    out = model.patch_features(changed)
    assert (cache.hits, cache.misses) == (3, 5)
    assert torch.equal(out, uncached(model, changed))
    assert not torch.equal(out[1], uncached(model, x)[1])
    # two images missing at once, beside two it has
    more = x.clone()
    more[[0, 2], 1, 3, 3] -= 0.5
    assert torch.equal(model.patch_features(more), uncached(model, more))
    assert (cache.hits, cache.misses) == (5, 7)
    # weights changed in place (as load_state_dict and optimizer steps change them): all miss
    with torch.no_grad():
        model.vision_tower.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    out = model.patch_features(x)
    assert cache.misses == 11 and torch.equal(out, uncached(model, x))
    # another tower with the same weights (stage 2 loads stage 1's frozen tower): hits
    other = tiny(tokenizer_dir, cache)
    other.vision_tower.load_state_dict(model.vision_tower.state_dict())
    assert torch.equal(other.patch_features(x), out) and cache.misses == 11


def test_bounded_least_recently_used_first(tokenizer_dir):
    model = tiny(tokenizer_dir, None)
    x = pixels(model, [0, 1, 2, 3, 4, 5])
    one = uncached(model, x[:2])[0]
    size = one.numel() * one.element_size()
    cache = FeatureCache(max_bytes=int(3.5 * size))
    model.feature_cache = cache
    model.patch_features(x[:2])
    model.patch_features(x[2:4])
    assert len(cache) == 3 and cache.bytes == 3 * size <= cache.max_bytes  # image 0 went first
    model.patch_features(x[[1, 2]])  # both hit: now the most recently used
    model.patch_features(x[4:6])  # evicts image 3, then 1 (least recently used first)
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    hits = cache.hits
    model.patch_features(x[[2, 4, 5]])
    assert cache.hits == hits + 3
    model.patch_features(x[[1, 3]])
    assert cache.hits == hits + 3  # evicted: missed
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=-1)
    small = FeatureCache(max_bytes=size - 1)  # no entry fits: nothing is kept
    model.feature_cache = small
    model.patch_features(x[:2])
    assert len(small) == 0 and small.bytes == 0


def test_not_used_where_the_tower_matters(tokenizer_dir):
    cache = FeatureCache()
    model = tiny(tokenizer_dir, cache)
    x = pixels(model, [0, 1, 2])
    model.patch_features(x[:1])  # one image alone runs as it always did
    model.patch_features(x[[0, 0]])  # one distinct image, twice
    assert len(cache) == 0
    for p in model.vision_tower.parameters():  # a tower that trains needs its graph
        p.requires_grad_(True)
    out = model.patch_features(x)
    assert out.requires_grad and len(cache) == 0
    with torch.no_grad():  # ... but not where no gradient is taken (evaluation)
        model.patch_features(x)
    assert len(cache) == 3
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    model.vision_tower.dropout_probe = torch.nn.Dropout(0.1)  # stochastic in training mode
    assert not cache.usable(model.vision_tower, x)
    model.vision_tower.eval()
    assert cache.usable(model.vision_tower, x)
    assert PATCH_FEATURES is Llava.feature_cache  # every model shares the process's cache


def test_loss_and_gradients_bit_identical_with_and_without(tokenizer_dir):
    """A fixed batch's training loss and gradients: no cache, a cold cache (misses), a warm
    one (hits), and features first cached at inference (engine prefill) then trained on."""
    results = []
    for mode in ("none", "cold", "warm", "from_inference"):
        cache = None if mode == "none" else FeatureCache()
        model = tiny(tokenizer_dir, cache)
        b = batch(model, [0, 1, 2, 3, 4])
        if mode == "warm":
            model(b)
        if mode == "from_inference":
            with torch.inference_mode():
                model.eval()(b)
            model.train()
        out = model(b)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((mode, out["loss"].detach(), grads))
        if cache is not None:
            # training runs the tower's modules, inference its fused blocks: kept apart
            assert cache.hits == (5 if mode == "warm" else 0) and len(cache) == (10 if mode == "from_inference" else 5)
    _, loss0, grads0 = results[0]
    assert grads0 and not any(n.startswith("vision_tower") for n in grads0)
    for mode, loss, grads in results[1:]:
        assert torch.equal(loss, loss0), mode
        assert grads.keys() == grads0.keys() and all(torch.equal(grads[n], grads0[n]) for n in grads0), mode
