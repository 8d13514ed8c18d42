"""Text-prompted segmentation and open-vocabulary detection (visto.models.clipseg): the world's
prompts and their masks, the metrics, and end to end on a tiny world: a tiny CLIP, the heads
trained with `visto train --recipe clipseg-synth`, `visto eval`, the segment and detect tools,
and `visto chat --tools segment,detect` running them."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visto.cli import main
from visto.config import to_dict
from visto.data.synth import WorldConfig, generate_world, iter_records, iter_samples
from visto.data.synth.prompts import prompt_mask, record_prompts, text_mask
from visto.eval.dense import average_precision, greedy_matches, mask_iou
from visto.models.clip import CLIPConfig
from visto.nn.vision import ViTConfig

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipseg") / "world"
    generate_world(WorldConfig(n=60, seed=3, size=64, single_object_fraction=0.2, text_probability=0.8,
                               splits={"train": 0.6, "val": 0.05, "test": 0.2, "heldout": 0.15}),
                   root)  # fmt: skip
    return root


def test_prompts_name_exactly_their_pixels(world) -> None:
    kinds = set()
    for record in iter_records(world, "test"):
        truth = record["truth"]
        with Image.open(world / record["mask"]) as m:
            instance = np.asarray(m)
        image = np.asarray(Image.open(world / record["image"]).convert("RGB")).astype(int)
        for p in record_prompts(truth, record["id"]):
            kinds.add(p.kind)
            mask = prompt_mask(instance, truth, p)
            if p.kind == "single":
                (i,) = p.objects
                assert np.array_equal(mask, instance == i + 1)
                o = truth["objects"][i]
                assert p.text == f"the {o['colour']} {o['shape']}"
                assert [(q["colour"], q["shape"]) for q in truth["objects"]].count(
                    (o["colour"], o["shape"])
                ) == 1
            elif p.kind == "shape":
                assert all(truth["objects"][i]["shape"] in p.text for i in p.objects)
                assert mask.sum() == sum((instance == i + 1).sum() for i in p.objects)
            elif p.kind == "absent":
                assert not mask.any()
                pair = tuple(p.text.split()[1:])
                assert pair not in [(o["colour"], o["shape"]) for o in truth["objects"]]
            elif p.kind == "text":
                assert mask.any() and not (mask & (instance > 0)).any()
                # the glyphs are drawn where the renderer drew them: darker than the background
                outside = ~mask & (instance == 0)
                assert image[mask].mean() < image[outside].mean() - 60
                for t in truth["texts"]:
                    x1, y1, x2, y2 = t["box"]
                    assert mask[y1:y2, x1:x2].any()
                assert not text_mask({**truth, "texts": []}).any()
    assert kinds == {"single", "shape", "colour", "text", "absent"}


def test_the_reader_serves_segment_samples_only_when_asked(world) -> None:
    samples = list(iter_samples(world, "test", tasks=["segment"]))
    assert len(samples) == sum(1 for _ in iter_records(world, "test"))
    item = samples[0].truth["item"]
    assert item["prompts"] and (world / "masks").samefile(item["mask"].rsplit("/", 1)[0])
    assert all(s.truth["task"] != "segment" for s in iter_samples(world, "test"))


def test_metrics_against_hand_counts() -> None:
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, :] = True
    assert mask_iou(a, b) == 0.5 and np.isnan(mask_iou(a & False, b & False))
    # 2 objects; ranked: hit, miss, hit -> precision 1 at recall .5, 2/3 at recall 1
    assert average_precision([(0.9, True), (0.8, False), (0.7, True)], 2) == pytest.approx(
        0.5 + 0.5 * 2 / 3
    )
    assert average_precision([(0.9, False), (0.5, True)], 1) == pytest.approx(0.5)
    assert average_precision([], 3) == 0.0


def test_detections_find_objects_greedily_by_score() -> None:
    """VOC/COCO matching (the evaluation's and bench/detect_errors.py's): each detection, best
    first, takes the object it overlaps most at IoU >= 0.5 among those not yet taken."""
    a, b, far = [0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]  # IoU(a, b) = 9/11
    kept = [(0.9, a), (0.8, a), (0.7, a), (0.6, [0, 0, 10, 4]), (0.5, far)]
    # the first takes a (IoU 1 beats 9/11), the second b (a is taken), the third nothing (a
    # duplicate), the fourth overlaps a at 0.4 only, the fifth no object
    assert greedy_matches(kept, [a, b]) == [0, 1, None, None, None]
    assert greedy_matches(kept, []) == [None] * 5 and greedy_matches([], [a]) == []


def test_focal_loss_against_hand_values() -> None:
    from visto.models.clipseg import sigmoid_focal_loss

    logits, targets = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    # positive at p = .5: .25 * ln 2 * .5^2; negatives: .75 * -ln(1 - p) * p^2; one positive
    want = 0.25 * math.log(2) * 0.25 + sum(
        0.75 * -math.log(1 - float(q)) * float(q) ** 2 for q in p[1:]
    )
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(want, rel=1e-5)
    # an easy negative costs far less than under BCE, a hard one keeps most of its weight
    easy, hard = torch.tensor([-4.0]), torch.tensor([2.0])
    ratio = lambda x: sigmoid_focal_loss(x, torch.zeros(1)) / torch.nn.functional.softplus(x)  # noqa: E731
    assert ratio(easy).item() < 1e-3 < 0.5 < ratio(hard).item()


def test_detection_queries_are_standardized_by_the_training_vocabulary() -> None:
    from visto.models.clipseg import CLIPSeg, CLIPSegConfig

    torch.manual_seed(0)
    clip = CLIPConfig.preset("tiny", vision=ViTConfig.preset("tiny", image_size=64, patch_size=16,
                                                              stem="conv", pool="mean"))  # fmt: skip
    model = CLIPSeg(CLIPSegConfig(clip=clip, width=32, decoder_layers=2)).train()
    E, W = clip.embed_dim, model.clip.vision_model.output_dim
    hidden = [torch.randn(2, 17, W)]
    vocab = 3.0 + 0.1 * torch.randn(12, E)  # a vocabulary off the origin, small spread
    model.detect_outputs(hidden, vocab)  # a training step's forward: the statistics move
    assert torch.allclose(model.query_mean, 0.1 * vocab.mean(0), atol=1e-5)
    for _ in range(200):
        model.detect_outputs(hidden, vocab)
    assert torch.allclose(model.query_mean, vocab.mean(0), atol=1e-3)
    # at inference (no grad) any number of queries, one included, uses those statistics
    model.eval()
    with torch.no_grad():
        one, _ = model.detect_outputs(hidden, vocab[:1])
        all_, _ = model.detect_outputs(hidden, vocab)
        mean, var = model.query_mean.clone(), model.query_var.clone()
        model.detect_outputs(hidden, torch.randn(5, E))
    assert torch.allclose(one[..., 0], all_[..., 0], atol=1e-5)
    assert torch.equal(mean, model.query_mean) and torch.equal(var, model.query_var)
    assert one.shape == (2, 16, 1)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    from visto.train.loop import train
    from visto.train.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("clipseg-runs")
    clip = CLIPConfig.preset("tiny", vision=ViTConfig.preset("tiny", image_size=64, patch_size=16,
                                                              stem="conv", pool="mean"))  # fmt: skip
    train(recipe_from_dict({
        "name": "tiny-clip", "model": {"family": "clip", "config": to_dict(clip)},
        "processor": {"config": {"image_size": 64, "resize_mode": "resize", "vocab_size": 400}},
        "data": {"source": str(world), "tasks": ["caption"]}, "batch_size": 8, "max_steps": 3,
        "eval_every": None, "eval_batches": 1, "num_threads": 1}), root / "clip", show_progress=False)  # fmt: skip
    run = root / "seg"
    code = main(["train", "--recipe", "clipseg-synth", "--out", str(run), "--no-progress",
                 "--set", f"model.config.clip_init={root / 'clip' / 'checkpoint'}",
                 "--set", "model.config.decoder_layers=2", "--set", "model.config.width=32",
                 "--set", f"data.source={world}", "--set", "max_steps=6", "--set", "batch_size=4",
                 "--set", "eval_batches=1"])  # fmt: skip
    assert code == 0
    return run / "checkpoint"


@pytest.mark.slow
def test_the_heads_train_and_only_they_do(trained) -> None:
    import visto

    model = visto.load(trained)
    clip = visto.load(trained.parent.parent / "clip" / "checkpoint")
    assert model.family == "clipseg" and model.processor is not None
    # the CLIP inside is the one it started from, untouched by training
    for (name, p), (_, q) in zip(
        model.clip.state_dict().items(), clip.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    # the tower read layer by layer is the ViT's own forward
    px = torch.randn(2, 3, 64, 64)
    hidden, skips = model._tower(px)
    assert torch.allclose(
        hidden[-1][:, 1:], clip.vision_model(px, pooled=False).features, atol=1e-5
    )
    assert [s.shape[-1] for s in skips] == [8, 16, 32]
    rows = [
        json.loads(line) for line in (trained.parent / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["step"] == 6 and {"seg_loss", "det_loss", "iou"} <= set(train_rows[-1])


@pytest.mark.slow
def test_visto_eval_scores_segmentation_and_detection(trained, world, capsys) -> None:
    out = trained.parent / "ev"
    assert main(["eval", "--model", str(trained), "--data", str(world), "--out", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    for prefix in ("", "heldout."):
        for name in ("segment.miou.single", "segment.miou.shape", "segment.miou.colour",
                     "segment.miou", "segment.absent.empty", "detect.ap50"):  # fmt: skip
            assert 0.0 <= metrics[prefix + name] <= 1.0, prefix + name
    assert "segment.miou.single" in capsys.readouterr().out


@pytest.mark.slow
def test_the_tools_return_a_mask_and_boxes(trained, world) -> None:
    from visto.tools import load_tools
    from visto.tools.clipseg import draw_mask

    tools = load_tools(f"segment={trained},detect={trained}")
    image = Image.open(next(iter(sorted((world / "images").iterdir())))).convert("RGB")
    image = image.resize((96, 80))  # any size: the mask comes back at the image's
    result = tools.run("segment", {"prompt": "the red star"}, image)
    assert result.ok and set(result.output) >= {"prompt", "found", "pixels", "fraction"}
    mask = Image.open(io.BytesIO(result.files["mask.png"]))
    assert mask.size == (96, 80) and mask.mode == "L"
    assert int((np.asarray(mask) > 0).sum()) == result.output["pixels"]
    overlay = Image.open(io.BytesIO(result.files["overlay.png"]))
    assert overlay.size == (96, 80)
    assert "mask.png" not in result.text  # the model reads the JSON, not the PNG
    found = tools.run("detect", {"query": "red star"}, image)
    assert found.ok and isinstance(found.output["objects"], list) and "boxes.png" in found.files
    for o in found.output["objects"]:
        assert 0 <= min(o["box"]) and max(o["box"]) <= 999 and 0.3 <= o["score"] <= 1
    assert not tools.run("segment", {"text": "x"}, image).ok  # the schema's arguments only
    drawn = np.asarray(draw_mask(Image.new("RGB", (4, 4), "white"), np.eye(4, dtype=bool)))
    assert (drawn[0, 0] != 255).any() and (drawn[0, 1] == 255).all()


@pytest.mark.slow
def test_visto_chat_calls_segment_and_hands_back_the_mask(trained, world, tmp_path, capsys) -> None:
    from test_serve_support import make_llava_checkpoint

    llava = make_llava_checkpoint(tmp_path / "llava" / "checkpoint", context=2048)
    image = next(iter(sorted((world / "images").iterdir())))
    code = main(["chat", "--model", str(llava), str(image), "Cut out the red star.",
                 "--tools", f"ocr,segment={trained},detect={trained}", "--tool-choice", "segment",
                 "--max-tokens", "160", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    runs = json.loads(captured.out)["tool_runs"]
    assert runs[0]["name"] == "segment" and runs[0]["ok"]
    assert runs[0]["files"]["mask.png"].startswith("data:image/png;base64,")


BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(script: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_detect_errors_accounts_for_every_detection(trained, world, tmp_path) -> None:
    out = tmp_path / "errors.json"
    _bench("detect_errors.py", ["--model", str(trained), "--data", str(world), "--json", str(out)])
    figures = json.loads(out.read_text())
    ev = trained.parent / "ev-errors"
    assert main(["eval", "--model", str(trained), "--data", str(world), "--out", str(ev)]) == 0
    metrics = json.loads((ev / "eval.json").read_text())
    for split, prefix in (("test", ""), ("heldout", "heldout.")):
        f = figures[split]
        # the same protocol as visto eval's AP50, and each fix can only help
        assert f["ap50"] == pytest.approx(metrics[prefix + "detect.ap50"], abs=1e-4)
        for cause in ("absent", "dupe", "loc", "other", "bkg"):
            assert f["ap50"] - 1e-9 <= f[f"fixed.{cause}"] <= f["fixed.all_fp"] + 1e-9
        # every kept box is a hit or has one cause; hits never exceed the objects
        assert 0 < f["objects"] and f["counts"]["tp"] <= f["objects"]
        assert f["counts"]["tp"] / f["objects"] <= f["recall_cap"] + 1e-9


@pytest.mark.slow
def test_ocr_world_reads_the_worlds_text(world, tmp_path) -> None:
    out = tmp_path / "ocr.json"
    _bench("ocr_world.py", ["--data", str(world), "--variants", "1x-raw,3x", "--n", "6",
                            "--json", str(out)])  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["images"] == 6
    texts = [r["truth"]["texts"] for r in iter_records(world, "test") if r["truth"]["texts"]][:6]
    for v in figures["variants"].values():
        assert len(v["misses"]) == round((1 - v["exact"]) * 6)
        assert v["exact_world"] <= v["exact"] and 0 <= v["cer"]
        for miss in v["misses"]:  # what is written is the world's texts
            assert miss["truth"].split() in [[t["text"] for t in ts] for ts in texts]


@pytest.mark.slow
def test_detect_heads_trains_each_variant_on_the_same_features(trained, world, tmp_path) -> None:
    out = tmp_path / "heads.json"
    clip = trained.parent.parent / "clip" / "checkpoint"
    _bench("detect_heads.py", ["--clip", str(clip), "--data", str(world), "--steps", "3",
                               "--train-images", "8", "--variants", "linear-bce,std-mlp-focal",
                               "--json", str(out)])  # fmt: skip
    figures = json.loads(out.read_text())
    assert list(figures["variants"]) == ["linear-bce", "std-mlp-focal"] and figures["steps"] == 3
    for v in figures["variants"].values():
        assert 0.0 <= v["test"] <= 1.0 and 0.0 <= v["heldout"] <= 1.0
    probes = figures["probes"]
    assert -1.0 <= probes["text.cos_same_shape"] <= 1.0
    for name in ("text.heldout_colour_probe", "text.heldout_shape_probe", "image.colour_probe",
                 "image.shape_probe"):  # fmt: skip
        assert 0.0 <= probes[name] <= 1.0, name
