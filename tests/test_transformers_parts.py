"""Model parts saved by transformers, wherever visto is pointed at one: a `CLIPModel` or
`SiglipModel` directory as a vision tower (`vision_init`) and as a two-tower model (`visto.load`,
`visto eval`, `visto index`), a `LlamaForCausalLM` directory as `language_init`. Each is checked
against transformers' own outputs on tiny random models the test saves itself."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips
from PIL import Image

import visto
from visto.errors import UserError
from visto.models.llava import LlavaConfig
from visto.pretrained import build_model

TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)  # fmt: skip
WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "photo", "of", "two", "one"]


def word_tokenizer(bos: str, eos: str, pad: str, add_bos: bool):
    """A word-level transformers tokenizer over WORDS (ids 0-3 are the specials, then the words;
    eos is not id 2, which makes transformers' CLIP pool at the largest id instead)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([pad, bos, "<unk>", eos, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos}:0 $A:0 {eos}:0" if add_bos else f"$A:0 {eos}:0"
    specials = [(bos, vocab[bos]), (eos, vocab[eos])]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>"
    )


def text_config(tok) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=len(tok), max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip


def save_two_tower(kind: str, directory) -> tuple[torch.nn.Module, object]:
    """A random tiny transformers CLIPModel or SiglipModel, saved with its tokenizer."""
    torch.manual_seed(0)
    if kind == "clip":
        tok = word_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", add_bos=True)
        cfg = transformers.CLIPConfig(text_config=text_config(tok), vision_config=VISION,
                                      projection_dim=16)  # fmt: skip
        model = transformers.CLIPModel(cfg)
    else:
        tok = word_tokenizer("<s>", "</s>", "<pad>", add_bos=False)
        cfg = transformers.SiglipConfig(text_config=text_config(tok), vision_config=VISION)
        model = transformers.SiglipModel(cfg)
        with torch.no_grad():  # a trained-looking temperature and bias, not the random init
            model.logit_scale.fill_(2.0)
            model.logit_bias.fill_(-3.0)
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, tok


def visto_tokenizer(directory) -> str:
    """A visto tokenizer (400 ids) in `directory`, for the LLaVAs built on the parts."""
    from test_llava import TEXTS
    from visto.data.tokenizer import train_tokenizer

    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(directory / "tokenizer.json")
    return str(directory)


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor or, in transformers 5, an output with pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------- vision_init


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_tower_directory_as_a_llava_vision_tower(kind, tmp_path):
    """vision_init = a CLIPModel / SiglipModel directory: the LLaVA's patch features are
    transformers' hidden state at its feature layer (CLS dropped for CLIP; SigLIP has none),
    and the saved LLaVA rebuilds without the directory."""
    from visto.checkpoint import load, save_checkpoint

    hf, _tok = save_two_tower(kind, tmp_path / "tower")
    config = LlavaConfig.preset("tiny", vision_init=str(tmp_path / "tower"), vision_feature_layer=-2,
                                tokenizer_dir=visto_tokenizer(tmp_path))  # fmt: skip
    llava = build_model("llava", config, seed=0).eval()
    assert llava.config.vision.layers == 3 and llava.config.vision.cls_token == (kind == "clip")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=pixels, output_hidden_states=True)
        ours = llava.vision_tower(pixels, feature_layer=-2, pooled=False).features
        pooled = llava.vision_tower(pixels).pooled
    prefix = 1 if kind == "clip" else 0
    assert ours.shape == (2, 16, 32)
    assert (ours - ref.hidden_states[-2][:, prefix:]).abs().max() < TOL
    assert (pooled - ref.pooler_output).abs().max() < TOL  # CLS token / SigLIP's MAP head
    save_checkpoint(llava, tmp_path / "llava")
    if kind == "siglip":  # transformers' LLaVA export writes a CLIP tower: refused, with why
        from visto.models.transformers_format import export_transformers

        with pytest.raises(UserError, match="SigLIP's layout"):
            export_transformers(llava, tmp_path / "hf")
    (tmp_path / "tower" / "model.safetensors").unlink()
    again = load(tmp_path / "llava")
    with torch.no_grad():
        assert torch.equal(again.vision_tower(pixels, feature_layer=-2, pooled=False).features, ours)


def test_siglip_tower_in_a_clip_recipe_keeps_the_recipes_pooling(tmp_path):
    """A CLIP trained from a SigLIP tower pools as its recipe says: 'mean' drops the MAP head
    (and the checkpoint rebuilds), 'cls' is refused (SigLIP has no class token)."""
    from visto.checkpoint import load, save_checkpoint
    from visto.models.clip import CLIPConfig
    from visto.nn.vision import ViTConfig

    save_two_tower("siglip", tmp_path / "siglip")
    cfg = CLIPConfig.preset("tiny", vision_init=str(tmp_path / "siglip"),
                            vision=ViTConfig.preset("tiny", pool="mean"))  # fmt: skip
    model = build_model("clip", cfg, seed=0)
    assert model.config.vision.pool == "mean"
    assert not any(k.startswith("vision_model.head.") for k in model.state_dict())
    save_checkpoint(model, tmp_path / "clip")
    load(tmp_path / "clip")
    with pytest.raises(UserError, match="class token"):
        build_model("clip", CLIPConfig.preset("tiny", vision_init=str(tmp_path / "siglip")))


# ----------------------------------------------------------------------------- two-tower models


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_tower_directory_embeds_as_transformers(kind, tmp_path):
    """visto.load of a CLIPModel / SiglipModel directory: image and text embeddings are
    transformers' get_image_features / get_text_features (normalised), texts tokenized by the
    directory's own tokenizer (SigLIP: padded to its context, read at the last position)."""
    hf, tok = save_two_tower(kind, tmp_path / "m")
    ours = visto.load(tmp_path / "m")
    assert ours.family == "clip" and ours.config.loss == ("siglip" if kind == "siglip" else "infonce")
    texts = ["a red circle", "two blue square", "one green star of a photo"]
    pixels = torch.randn(3, 3, 32, 32)
    padding = "max_length" if kind == "siglip" else True
    batch = tok(texts, padding=padding, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref_text = features(hf.get_text_features(**batch))
        ref_image = features(hf.get_image_features(pixel_values=pixels))
        ref_logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=pixels).logits_per_image  # fmt: skip
        text = ours.embed_texts(texts)
        image = ours.encode_image(pixels)
    norm = torch.nn.functional.normalize
    assert (text - norm(ref_text, dim=-1)).abs().max() < TOL
    assert (image - norm(ref_image, dim=-1)).abs().max() < TOL
    logits = image @ text.T * ours.current_logit_scale()
    if kind == "siglip":
        logits = logits + ours.logit_bias
    assert (logits - ref_logits).abs().max() < TOL
    # The image path from PIL uses the tower's size and the directory's mean/std.
    assert ours.embed_images([Image.new("RGB", (40, 40), (200, 10, 10))]).shape == (1, text.shape[1])


def test_two_tower_directory_through_eval_and_index(tmp_path):
    """`visto eval --data` (retrieval on a caption parquet) and `visto index build` take a
    transformers SigLIP directory as --model."""
    from foreign_data import write_hf_parquet
    from visto.cli import main

    save_two_tower("siglip", tmp_path / "m")
    data = write_hf_parquet(tmp_path / "captions.parquet")
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data),
                 "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    figures = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert 0 <= figures["retrieval.t2i.r1"] <= 1 and "retrieval.i2t.r1" in figures
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
    assert main(["index", "build", "--model", str(tmp_path / "m"), "--images", str(images),
                 "--db", str(tmp_path / "db")]) == 0  # fmt: skip


def test_a_two_tower_directory_without_a_tokenizer_or_of_another_kind_is_refused(tmp_path):
    hf, _ = save_two_tower("clip", tmp_path / "m")
    hf.save_pretrained(tmp_path / "bare")  # weights, no tokenizer
    with pytest.raises(UserError, match="no tokenizer"):
        visto.load(tmp_path / "bare")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=50))  # fmt: skip
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="'bert'.*clip.*llava.*siglip"):
        visto.load(tmp_path / "bert")
    config = LlavaConfig.preset("tiny", vision_init=str(tmp_path / "bert"))
    with pytest.raises(UserError, match="CLIP, SigLIP or LLaVA"):
        build_model("llava", config)


# ----------------------------------------------------------------------------- language_init


def test_llama_directory_as_a_llava_language_model(tmp_path):
    """language_init = a LlamaForCausalLM directory saved by transformers: the LLaVA's decoder
    gives its logits and greedy tokens, and the vocabulary fits visto's tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    config = LlavaConfig.preset("tiny", language_init=str(tmp_path / "llama"),
                                tokenizer_dir=visto_tokenizer(tmp_path))  # fmt: skip
    llava = build_model("llava", config, seed=0).eval()
    assert llava.config.decoder.num_kv_heads == 2 and llava.config.decoder.hidden_size == 64
    ids = torch.randint(5, 400, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours, _ = llava.language_model(input_ids=ids)
    assert (ours - ref).abs().max() < TOL
    # Greedy continuation, 8 tokens, token for token.
    a = b = ids[:1]
    with torch.no_grad():
        for _ in range(8):
            a = torch.cat([a, hf(input_ids=a).logits[:, -1:].argmax(-1)], 1)
            b = torch.cat([b, llava.language_model(input_ids=b)[0][:, -1:].argmax(-1)], 1)
    assert torch.equal(a, b)
    # The LLaVA built on it runs: its processor's tokenizer fits the Llama's vocabulary.
    from test_llava import colour_samples

    assert torch.isfinite(llava(llava.collate(colour_samples(2, seed=0)))["loss"])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_two_tower_directory_normalises_as_its_saved_image_processor(kind, tmp_path):
    """The mean/std of the image processor saved beside the weights: preprocessor_config.json,
    or a whole processor's processor_config.json (transformers 5 writes a CLIPProcessor that
    way)."""
    hf, tok = save_two_tower(kind, tmp_path / "m")
    image_processor = transformers.CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "preprocessor_config.json").exists()  # transformers 5's layout
    config = visto.load(tmp_path / "m").config.processor
    assert (*config.mean, *config.std) == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
