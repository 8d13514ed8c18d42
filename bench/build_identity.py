"""Seeded builds from configs that name pretrained parts, as hashes: run it at two commits to
check that a change to how models are built keeps every initial weight bit for bit.

    python bench/build_identity.py --json before.json       # at the old commit
    python bench/build_identity.py --json after.json        # at the new one
    diff before.json after.json                             # nothing: the same weights

Each case saves tiny donors (a CLIP, a LLaVA and a CogVLM with object tokens and an OCR
reader, a BLIP-2 stage 1, a Llama decoder) in a temporary directory, builds a model from a
config naming them (vision_init, language_init, clip_init, stage1_checkpoint), and hashes its
state dict (names, shapes, bytes), its saved config and its processor's tokenizer. Plain
builds of every family (no parts) are hashed too. Everything is seeded: the hashes depend on
the code and the torch build alone. One case trains instead of building: a seeded dense
pretraining of a tiny ViT (visto.train.dense), its weights and learning rates after 12 steps.

A change to a config's layout changes every config hash on purpose. `--parts` hashes the
weights, the saved config and the tokenizer apart (so the diff says which changed), and
`--configs DIR` writes each case's saved config as DIR/<case>.json; with `--parts`,
`--old-configs DIR` (the configs an older commit wrote) adds {case}.old_config: the hash of
that old config read by today's code (visto.config.from_dict) and saved again, which equals
{case}.config when old saved configs load as today's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from visto.checkpoint import save_checkpoint
from visto.config import from_dict, to_dict
from visto.connectors.projector import ProjectorConfig
from visto.data.processor import Processor, ProcessorConfig
from visto.data.tokenizer import train_tokenizer
from visto.models.blip2 import Blip2Config
from visto.models.clip import CLIPConfig
from visto.models.clipseg import CLIPSegConfig
from visto.models.cogvlm import CogVLMConfig
from visto.models.flamingo import FlamingoConfig
from visto.models.fuyu import FuyuConfig
from visto.models.llava import LlavaConfig

try:  # the builder that reads the parts a config names (before: visto.models.build_model)
    from visto.pretrained import build_model
except ImportError:
    from visto.models import build_model

TEXTS = ["a red square", "a blue circle", "what colour is the star?", "two", "green"] * 5


PARTS = False  # --parts: {case}.weights / .config / .tokenizer hashed apart
CONFIGS: Path | None = None  # --configs DIR: each case's saved config as DIR/<case>.json
OLD_CONFIGS: Path | None = None  # --old-configs DIR: an older commit's --configs DIR


def saved_config(model: torch.nn.Module, root: Path) -> str:
    """The config as saved, the temporary directory's name left out."""
    return saved_config_of(model.config, root)


def saved_config_of(config: Any, root: Path) -> str:
    return json.dumps(to_dict(config), sort_keys=True).replace(str(root), "ROOT")


def digest(model: torch.nn.Module, root: Path, name: str = "") -> str | dict[str, str]:
    """sha256 of the state dict, the saved config and the tokenizer (with --parts: one each)."""
    weights = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        weights.update(key.encode())
        weights.update(str(tuple(value.shape)).encode())
        weights.update(value.detach().contiguous().cpu().numpy().tobytes())
    config = saved_config(model, root)
    if CONFIGS is not None and name:
        (CONFIGS / f"{name}.json").write_text(config + "\n")
    processor = getattr(model, "_processor", None)
    tokens = b"" if processor is None else json.dumps(processor.tokenizer.encode("a red square two")).encode()
    if PARTS:
        parts = {"weights": weights.hexdigest(), "config": hashlib.sha256(config.encode()).hexdigest(),
                 "tokenizer": hashlib.sha256(tokens).hexdigest()}  # fmt: skip
        if OLD_CONFIGS is not None and name:
            old = from_dict(type(model.config), json.loads((OLD_CONFIGS / f"{name}.json").read_text()))
            parts["old_config"] = hashlib.sha256(saved_config_of(old, root).encode()).hexdigest()
        return parts
    h = weights  # the three fed into one hash, in this order
    h.update(config.encode())
    h.update(tokens)
    return h.hexdigest()


def regions_config(cls: type, tok: str, **kw: Any) -> Any:
    config = cls.preset("tiny", tokenizer_dir=tok, projector=ProjectorConfig(kind="regions", slots=5, text_slots=1), **kw)
    config.processor.image_tokens = config.image_tokens
    return config


def cases(root: Path) -> dict[str, str]:
    tokenizer = train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1)
    (root / "tok").mkdir()
    tokenizer.save(root / "tok" / "tokenizer.json")
    tok = str(root / "tok")
    processor = Processor(ProcessorConfig(image_size=32, resize_mode="resize", loc_bins=32, vocab_size=400), tokenizer)

    clip = build_model("clip", CLIPConfig.preset("tiny"), seed=1)
    clip.processor = processor
    save_checkpoint(clip, root / "clip")
    build_model("llava", LlavaConfig.preset("tiny", tokenizer_dir=tok), seed=2).language_model.save_pretrained(root / "lm")
    save_checkpoint(build_model("llava", regions_config(LlavaConfig, tok), seed=3), root / "regions")
    save_checkpoint(build_model("cogvlm", regions_config(CogVLMConfig, tok), seed=4), root / "cog")
    save_checkpoint(build_model("blip2", Blip2Config.preset("tiny", tokenizer_dir=tok), seed=5), root / "s1")

    built = {
        "clip.vision_init": ("clip", CLIPConfig.preset("tiny", vision_init=str(root / "clip"))),
        "clip.vision_init.pool_cls": ("clip", CLIPConfig.preset("tiny", vision_init=str(root / "regions"))),
        "llava.vision_init+language_init": ("llava", LlavaConfig.preset(
            "tiny", tokenizer_dir=tok, vision_init=str(root / "clip"), language_init=str(root / "lm"))),
        "llava.regions.vision_init": ("llava", regions_config(LlavaConfig, tok, vision_init=str(root / "regions"))),
        "llava.regions.vision_init+language_init": ("llava", regions_config(
            LlavaConfig, tok, vision_init=str(root / "cog"), language_init=str(root / "lm"))),
        "cogvlm.regions.vision_init": ("cogvlm", regions_config(CogVLMConfig, tok, vision_init=str(root / "regions"))),
        "blip2.vision_init": ("blip2", Blip2Config.preset("tiny", tokenizer_dir=tok, vision_init=str(root / "clip"))),
        "blip2.stage1_checkpoint": ("blip2", Blip2Config(stage1_checkpoint=str(root / "s1"), losses=["lm"])),
        "blip2.stage1_checkpoint+language_init": ("blip2", Blip2Config(
            stage1_checkpoint=str(root / "s1"), losses=["lm"], language_init=str(root / "lm"))),
        "flamingo.vision_init+language_init": ("flamingo", FlamingoConfig.preset(
            "tiny", tokenizer_dir=tok, vision_init=str(root / "clip"), language_init=str(root / "lm"))),
        "fuyu.language_init": ("fuyu", FuyuConfig.preset("tiny", tokenizer_dir=tok, language_init=str(root / "lm"))),
        "clipseg.clip_init": ("clipseg", CLIPSegConfig(clip=CLIPConfig.preset("tiny"), clip_init=str(root / "clip"), decoder_layers=1)),
    }
    for family, cls in (("clip", CLIPConfig), ("llava", LlavaConfig), ("blip2", Blip2Config),
                        ("flamingo", FlamingoConfig), ("fuyu", FuyuConfig), ("cogvlm", CogVLMConfig)):
        built[f"{family}.plain"] = (family, cls.preset("tiny"))
    built["llava.regions.plain"] = ("llava", regions_config(LlavaConfig, tok))
    built["clipseg.plain"] = ("clipseg", CLIPSegConfig(clip=CLIPConfig.preset("tiny"), decoder_layers=1))
    out = {}
    for name, (family, config) in built.items():
        out[name] = digest(build_model(family, config, seed=11), root, name)
        torch.manual_seed(12)  # unseeded builds draw from the global RNG, as visto train's
        out[name + ".unseeded"] = digest(build_model(family, config), root, name + ".unseeded")
    out["train.dense.pretrain_dense"] = dense_digest()
    return out


def dense_digest() -> str:
    """A seeded dense pretraining (visto.train.dense) of a tiny ViT on random per-patch targets,
    stopped by steps (warmup and cosine over them): its weights and the lr of every step."""
    from visto.nn.vision import ViTConfig
    from visto.train.dense import DenseTargets, pretrain_dense

    g = torch.Generator().manual_seed(0)
    n, cells = 8, 4  # 16-px images, 8-px patches: a 2 x 2 grid
    targets = DenseTargets(
        pixels=torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
        shape=torch.randint(0, 8, (n, cells), generator=g), colour=torch.randint(0, 9, (n, cells), generator=g),
        size=torch.randint(0, 4, (n, cells), generator=g), centre=(torch.rand(n, cells, generator=g) > 0.6).float(),
        centre_shape=torch.randint(0, 8, (n, cells), generator=g), box=torch.rand(n, cells, 4, generator=g),
        chars=torch.randint(0, 37, (n, cells, 2), generator=g),
    )
    config = ViTConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_hidden=64)
    rows: list[dict[str, Any]] = []
    result = pretrain_dense(config, targets, None, minutes=60, max_steps=12, batch_size=4,
                            warmup_steps=3, seed=3, log=rows.append, log_every=1)
    h = hashlib.sha256(json.dumps([r["lr"] for r in rows]).encode())
    for part in (result.vit, result.heads):
        for name, value in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write {case: sha256} here")
    parser.add_argument("--parts", action="store_true",
                        help="hash weights, saved config and tokenizer apart: {case.part: sha256}")
    parser.add_argument("--configs", type=Path, help="write each case's saved config as DIR/<case>.json")
    parser.add_argument("--old-configs", type=Path,
                        help="with --parts: an older commit's --configs DIR, read by today's code")
    args = parser.parse_args()
    global PARTS, CONFIGS, OLD_CONFIGS
    PARTS, CONFIGS, OLD_CONFIGS = args.parts, args.configs, args.old_configs
    if CONFIGS is not None:
        CONFIGS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        hashes = cases(Path(tmp))
    if PARTS:  # {case: {part: sha}} -> {case.part: sha}; the training case has one hash
        flat: dict[str, str] = {}
        for case, value in hashes.items():
            flat.update({f"{case}.{p}": x for p, x in value.items()} if isinstance(value, dict) else {case: value})
        hashes = flat
    for name, value in hashes.items():
        print(f"{value[:16]}  {name}")
    if args.json:
        args.json.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
