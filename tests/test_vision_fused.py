"""The vision tower's inference path (issue 19): at inference on the CPU its blocks run as
`FusedEncoderBlock` (one q/k/v matmul, pre-transposed weights) and give the module's numbers;
weights changed in place are picked up; int8 and LoRA layers keep their own forward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from visto.nn.lora import LoraConfig, apply_lora
from visto.nn.quantize import quantize_int8
from visto.nn.transformer import EncoderBlock, FusedEncoderBlock
from visto.nn.vision import ViT, ViTConfig, _TowerBlock


def features(vit: ViT, pixels: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.set_grad_enabled(grad):
        out = vit(pixels, feature_layer=-2)
    return out.features.detach(), out.pooled.detach()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"stem": "conv"}, {"cls_token": False, "pool": "mean", "pre_norm": False},
     {"pool": "map", "act": "quick_gelu"}],
)  # fmt: skip
def test_inference_blocks_give_the_modules_numbers(overrides):
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("tiny", **overrides)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    eager = features(vit, pixels, grad=True)  # autograd on: the modules
    with torch.inference_mode():
        fused = vit(pixels, feature_layer=-2)
    assert isinstance(vit._blocks(pixels.new_zeros(1))[0], FusedEncoderBlock) is False  # grad on
    with torch.no_grad():
        assert all(isinstance(b, FusedEncoderBlock) for b in vit._blocks(pixels))
    torch.testing.assert_close(fused.features, eager[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.pooled, eager[1], atol=1e-5, rtol=0)
    assert not any("fused" in k for k in vit.state_dict())


def test_a_block_alone_equals_encoder_block():
    torch.manual_seed(1)
    block = EncoderBlock(64, 4, 256, act="gelu_tanh").eval()
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(FusedEncoderBlock(block)(x), block(x), atol=1e-5, rtol=0)


def test_weights_changed_in_place_are_used():
    torch.manual_seed(2)
    vit = ViT(ViTConfig.preset("tiny")).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = vit(pixels).features
        vit.encoder.layers[0].self_attn.k_proj.weight.mul_(3.0)  # an optimizer step, a load
        after = vit(pixels).features
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, vit(pixels).features.detach(), atol=1e-5, rtol=0)


def test_int8_and_lora_towers_keep_their_own_layers():
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    holder = nn.Module()
    holder.vision_tower = ViT(ViTConfig.preset("tiny")).eval()
    quantize_int8(holder)  # quantizes the tower's Linear layers
    with torch.no_grad():
        assert not isinstance(holder.vision_tower._blocks(pixels)[0], FusedEncoderBlock)
        holder.vision_tower(pixels)

    vit = ViT(ViTConfig.preset("tiny")).eval()
    with torch.no_grad():
        plain = vit(pixels).features
    holder = nn.Module()
    holder.vision_tower = vit
    apply_lora(holder, LoraConfig(rank=4, targets=["q_proj", "v_proj"], modules=["vision_tower"]))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "lora_B" in name:
                p.normal_()  # the adapters now change the output
        assert not isinstance(vit._blocks(pixels)[0], FusedEncoderBlock)
        assert not torch.allclose(vit(pixels).features, plain)


class _CountOps(TorchDispatchMode):
    """The aten ops a call runs, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_towers_block_gives_the_fused_blocks_bits(act, batch):
    torch.manual_seed(4)
    block = EncoderBlock(64, 4, 256, act=act).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(batch, 17, 64)
    with torch.inference_mode():
        expected = FusedEncoderBlock(block)(x)
        got = _TowerBlock(block)(x)
        torch.testing.assert_close(got, block(x), atol=1e-5, rtol=0)
    assert torch.equal(got, expected)  # the same operations: the same bits


@pytest.mark.parametrize("batch", [1, 2])
def test_the_towers_inference_adds_residuals_and_activates_in_place(batch):
    """Each block adds its two residuals into its projections' outputs and runs GELU on the
    first MLP matmul's output (FusedEncoderBlock made a new tensor for each of the three)."""
    torch.manual_seed(5)
    vit = ViT(ViTConfig.preset("tiny")).eval()
    pixels = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        plan_blocks = vit._blocks(pixels)
        assert all(type(b) is _TowerBlock for b in plan_blocks)
        with _CountOps() as count:
            out = vit(pixels, feature_layer=-1, pooled=False).features
        eager = vit.pre_layrnorm(vit.embeddings(pixels))
        for layer in vit.encoder.layers:
            eager = layer(eager)
    layers = vit.config.layers
    assert count.ops["aten.gelu_.default"] == layers and count.ops["aten.gelu.default"] == 0
    assert count.ops["aten.add_.Tensor"] >= 2 * layers and count.ops["aten.add.Tensor"] == 0
    torch.testing.assert_close(out, eager[:, 1:], atol=1e-5, rtol=0)
