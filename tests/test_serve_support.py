"""Shared by the test_serve* files: tiny real checkpoints and a uvicorn server in a thread.

No tests here. The models are real (a tiny LLaVA and a tiny CLIP with trained tokenizers,
saved and loaded through visto's checkpoint format); only their weights are random.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

WORDS = ["red", "blue", "green", "square", "circle", "triangle", "left", "right", "of", "the"]


def corpus() -> list[str]:
    return [
        f"the {WORDS[i % 3]} {WORDS[3 + i % 3]} is {WORDS[6 + i % 2]} of the "
        f'{WORDS[(i * 7) % 10]} {{"count": {i % 5}, "ok": true}}'
        for i in range(300)
    ]


def make_llava_checkpoint(path: Path, seed: int = 0, context: int | None = None) -> Path:
    """`context`: the decoder's positions (rotary), when the tiny preset's are too few."""
    import dataclasses

    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.data.tokenizer import train_tokenizer
    from visto.models import build_model
    from visto.models.llava import LlavaConfig

    config = LlavaConfig.preset("tiny")
    if context is not None:
        decoder = dataclasses.replace(config.decoder, max_position_embeddings=context)
        config = dataclasses.replace(config, decoder=decoder)
    tokenizer = train_tokenizer(
        corpus(), vocab_size=config.processor.vocab_size, loc_bins=config.processor.loc_bins
    )
    model = build_model("llava", config, seed=seed)
    model.processor = Processor(config.processor, tokenizer)
    with torch.no_grad():  # larger weights than the init: peaked, image-dependent logits
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_checkpoint(model, path)


def make_repeating_llava_checkpoint(
    path: Path, favourite: list[str], max_length: int | None = None
) -> Path:
    """A tiny LLaVA whose next token is always the first of `favourite` the grammar allows (the
    texts' first tokens, in that order), whatever it read: a model that runs a string on.
    `max_length`: the processor's (training's truncation), as the quickstart sets one.

    Its blocks add nothing (o_proj and down_proj are zero), so the last hidden state is the
    last token's embedding; every embedding is a small multiple of one direction v (the tied
    head scores that direction) plus noise, except the favourites, which score v most.
    """
    from visto.checkpoint import load, save_checkpoint

    model = load(make_llava_checkpoint(path.parent / f"{path.name}-random"))
    decoder = model.language_model
    embed = decoder.model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
        v = torch.randn(embed.shape[1], generator=g)
        v = 4 * v / v.norm()
        embed.copy_(0.1 * v + 0.02 * torch.randn(embed.shape, generator=g))
        for rank, text in enumerate(favourite):
            embed[model.processor.tokenizer.encode(text)[0]] = v * (1 - 0.1 * rank)
    if max_length is not None:
        from visto.data.processor import Processor

        config = dataclasses.replace(model.processor.config, max_length=max_length)
        model.processor = Processor(config, model.processor.tokenizer)
    return save_checkpoint(model, path)


def make_clip_checkpoint(path: Path) -> Path:
    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor, ProcessorConfig
    from visto.data.tokenizer import train_tokenizer
    from visto.models import build_model
    from visto.models.clip import CLIPConfig

    config = ProcessorConfig(image_size=32, resize_mode="resize", loc_bins=4, vocab_size=300)
    processor = Processor(config, train_tokenizer(corpus(), 300, loc_bins=4, min_frequency=1))
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    model.processor = processor
    return save_checkpoint(model, path)


def make_index(db: Path, clip_ckpt: Path, images_dir: Path, n: int = 6) -> list[Path]:
    from visto.index import VectorStore, load_embedder
    from visto.index.build import build_index
    from visto.index.sources import folder_items

    images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        colour = [(220, 30, 30), (30, 200, 30), (30, 30, 220)][i % 3]
        im = Image.new("RGB", (40, 30), (250, 250, 250))
        im.paste(colour, (4 + 3 * i, 4, 20 + 3 * i, 22))
        p = images_dir / f"img{i}.png"
        im.save(p)
        paths.append(p)
    embedder = load_embedder(str(clip_ckpt))
    store = VectorStore(db, model=embedder.name, dim=embedder.dim, model_source=str(clip_ckpt))
    build_index(store, folder_items(images_dir), embedder, batch_size=4)
    return paths


def png_bytes(colour=(200, 40, 40), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, timeout: float = 20.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def make_scripted_llava_checkpoint(path: Path, answer: str) -> Path:
    """A tiny LLaVA that answers `answer` to anything, greedily, then ends its turn: a bigram
    machine. Its blocks add nothing (o_proj and down_proj are zero), so the last hidden state
    is the last token's embedding (random, nearly orthogonal directions); the untied head
    scores the next token of the script against the embedding of the token before it."""
    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.data.tokenizer import train_tokenizer
    from visto.models import build_model
    from visto.models.llava import LlavaConfig

    config = LlavaConfig.preset("tiny")
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, tie_word_embeddings=False)
    )
    tokenizer = train_tokenizer(
        corpus(), vocab_size=config.processor.vocab_size, loc_bins=config.processor.loc_bins
    )
    script = [tokenizer.role_ids["assistant"], *tokenizer.encode(answer), tokenizer.end_id]
    assert len(set(script)) == len(script), "each token of the script once (a bigram machine)"
    model = build_model("llava", config, seed=0)
    model.processor = Processor(config.processor, tokenizer)
    decoder = model.language_model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
        embed = decoder.model.embed_tokens.weight
        embed.copy_(torch.nn.functional.normalize(torch.randn(embed.shape, generator=g), dim=1))
        head = decoder.lm_head.weight
        head.zero_()
        for before, after in zip(script[:-1], script[1:], strict=True):
            head[after] += 10 * embed[before]
    return save_checkpoint(model, path)


def make_clipseg_checkpoint(path: Path, image: Image.Image, fraction: float = 0.3) -> Path:
    """A tiny clipseg (segment and detect tools) with random heads, except that its masks ignore
    the prompt and cover about `fraction` of `image`: its FiLM passes the features through
    unchanged, and the mask logits are shifted by their quantile on `image` (a shift commutes
    with the bilinear resize to the image's size, so the cut is exact there)."""
    import numpy as np

    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor, ProcessorConfig
    from visto.data.tokenizer import train_tokenizer
    from visto.models import build_model
    from visto.models.clip import CLIPConfig
    from visto.models.clipseg import CLIPSegConfig
    from visto.nn.vision import ViTConfig

    vision = ViTConfig.preset("tiny", image_size=64, patch_size=16, stem="conv", pool="mean")
    config = CLIPSegConfig(clip=CLIPConfig.preset("tiny", vision=vision), width=32,
                           decoder_layers=2)  # fmt: skip
    model = build_model("clipseg", config, seed=0).eval()
    processor_config = ProcessorConfig(image_size=64, resize_mode="resize", loc_bins=4,
                                       vocab_size=300)  # fmt: skip
    model.processor = Processor(processor_config,
                                train_tokenizer(corpus(), 300, loc_bins=4, min_frequency=1))  # fmt: skip
    with torch.no_grad():
        for film, value in ((model.film_mul, 1.0), (model.film_add, 0.0)):
            film.weight.zero_()
            film.bias.fill_(value)
        prob = model.segment([image], ["anything"])[0].astype(np.float64)
        logits = np.log(prob) - np.log1p(-prob)
        model.upsampler.out.bias -= float(np.quantile(logits, 1 - fraction))
    return save_checkpoint(model, path)
