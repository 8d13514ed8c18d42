"""LLaVA's visual tokens at inference (issue 19, time to first token): a linear or mlp projector
runs from transposed weight copies (`_ProjectorPlan`), and a batch holding one image several
times runs the tower and the projector once. Both must give the modules' numbers, fall back to
the modules where they cannot (hooks, int8/LoRA-style layers, training, autograd), and follow
weights changed after the copies were made."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from test_llava import tiny, tokenizer_dir  # noqa: F401 (fixture)
from visto.connectors.projector import ProjectorConfig, build_projector
from visto.data.sample import Sample, Turn
from visto.infer import Engine, SamplingParams
from visto.models.llava import _projector_plan
from visto.nn.vision import InferenceWatch, ViT, ViTConfig


def _model(tokenizer_dir, **projector) -> nn.Module:  # noqa: F811
    torch.manual_seed(0)
    model = tiny(tokenizer_dir, projector=ProjectorConfig(**projector)).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model


def _modules_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projector's modules on the tower's features, image by image."""
    with torch.no_grad():
        rows = [model.multi_modal_projector(model.patch_features(pixels[i : i + 1]))
                for i in range(pixels.shape[0])]  # fmt: skip
    return torch.cat(rows)


PROJECTORS = [
    dict(kind="mlp"),
    dict(kind="mlp", act="gelu_tanh", norm=True),
    dict(kind="mlp", act="silu", bias=False),
    dict(kind="linear"),
    dict(kind="linear", norm=True),
]


@pytest.mark.parametrize("projector", PROJECTORS)
def test_plan_gives_the_projector_modules_numbers(tokenizer_dir, projector):  # noqa: F811
    model = _model(tokenizer_dir, **projector)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.patch_features(pixels)
        plan = _projector_plan(model, features)
        assert plan is not None
        torch.testing.assert_close(plan(features), model.multi_modal_projector(features),
                                   atol=1e-6, rtol=1e-6)  # fmt: skip
        # batched against image by image: other GEMM shapes, so fp32 rounding of values up to
        # ~10 (1e-6 is below 10 x fp32's epsilon; CI saw 2.6e-6 depending on the worker's state)
        torch.testing.assert_close(model.image_features(pixels), _modules_features(model, pixels),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_pixel_shuffle_and_training_run_the_modules(tokenizer_dir):  # noqa: F811
    model = _model(tokenizer_dir, kind="mlp")
    mlp = model.multi_modal_projector
    model.multi_modal_projector = build_projector(
        ProjectorConfig(kind="pixel_shuffle", scale_factor=2), model.config.vision.width,
        model.config.decoder.hidden_size,
    )  # fmt: skip
    features = model.patch_features(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        assert _projector_plan(model, features) is None
    model.multi_modal_projector = mlp
    model.train()
    with torch.no_grad():
        assert _projector_plan(model, features) is None
    model.eval()
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model.image_features(pixels)  # autograd on: modules, gradients reach the pixels
    out.sum().backward()
    assert pixels.grad is not None and model.multi_modal_projector.linear_1.weight.grad is not None


def test_plan_follows_weights_hooks_and_swapped_layers(tokenizer_dir):  # noqa: F811
    model = _model(tokenizer_dir, kind="mlp")
    projector = model.multi_modal_projector
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.image_features(pixels)
        projector.linear_2.weight.mul_(2.0)  # in place, after the copies were made
        after = model.image_features(pixels)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, _modules_features(model, pixels), atol=1e-5, rtol=1e-5)  # see above
        calls = []
        handle = projector.linear_1.register_forward_hook(lambda *_: calls.append(1))
        model.image_features(pixels)
        assert calls, "a hook added after the plan was made must see the module run"
        handle.remove()

        class Wrapped(nn.Linear):  # stands for a LoRA or int8 layer: not plain nn.Linear
            def forward(self, x):
                return super().forward(x) + 1.0

        wrapped = Wrapped(projector.linear_1.in_features, projector.linear_1.out_features)
        wrapped.load_state_dict(projector.linear_1.state_dict())
        projector.linear_1 = wrapped
        features = model.patch_features(pixels)
        assert _projector_plan(model, features) is None
        torch.testing.assert_close(model.image_features(pixels), projector(features))


def test_one_image_in_several_rows_runs_once(tokenizer_dir):  # noqa: F811
    model = _model(tokenizer_dir, kind="mlp")
    a, b = torch.randn(2, 3, 32, 32).unbind(0)
    pixels = torch.stack([a, b, a, a])
    seen = []
    handle = model.vision_tower.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[0]))  # fmt: skip
    with torch.no_grad():
        out = model.image_features(pixels)
    handle.remove()
    assert seen == [2]  # the distinct images, once
    torch.testing.assert_close(out, _modules_features(model, pixels), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0], out[2], atol=0, rtol=0)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("images", [(0,), (0, 0, 0), (0, 1, 0)])
def test_engine_tokens_equal_the_modules_path(tokenizer_dir, images):  # noqa: F811
    model = _model(tokenizer_dir, kind="mlp")
    questions = ["what is in the image?", "red", "is the blue square left of the circle"]
    samples = [Sample(f"q{i}", [_image(seed)], [Turn("user", "<image>\n" + questions[i])])
               for i, seed in enumerate(images)]  # fmt: skip
    batch = model.prompt_batch(samples)
    engine = Engine(model, model.processor.tokenizer, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=10)
    fast = [c.token_ids for c in engine.generate_batch(batch, params)]
    # A hook on the projector sends it (and nothing else) back through its modules.
    handle = model.multi_modal_projector.register_forward_hook(lambda *_: None)
    try:
        slow = [c.token_ids for c in engine.generate_batch(batch, params)]
    finally:
        handle.remove()
    assert fast == slow
    alone = [engine.generate_batch(model.prompt_batch([s]), params)[0].token_ids for s in samples]
    assert fast == alone


def test_inference_watch_sees_swaps_in_place_changes_and_casts():
    vit = ViT(ViTConfig.preset("tiny")).eval()
    watch = InferenceWatch(vit.encoder)
    assert watch.current()
    with torch.no_grad():
        vit.encoder.layers[1].mlp.fc1.weight.add_(0.0)  # in place: a new version
    assert not watch.current()
    watch = InferenceWatch(vit.encoder)
    vit.encoder.layers[0].mlp.fc2 = nn.Linear(vit.config.mlp_hidden, vit.config.width)
    assert not watch.current()
    watch = InferenceWatch(vit.encoder)
    vit.double()
    assert not watch.current()
    watch = InferenceWatch(vit.encoder)
    vit.encoder.layers[0].layer_norm1.weight = nn.Parameter(torch.ones(vit.config.width))
    assert not watch.current()
