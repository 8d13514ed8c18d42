"""BLEU and CIDEr-D against pycocoevalcap, the COCO caption toolkit, on the same inputs.

The scorers are compared on pre-tokenized captions (pycocoevalcap's Bleu and Cider need no
Java); our tokenizer is compared with its Java PTBTokenizer separately (slow: a JVM start).
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from visto.eval import metrics as M

# CI (.ci/run: CI=true) installs visto[dev] and Java, so there a missing one is a failure, not
# a skip: these comparisons must not vanish from the suite unseen.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")
if IN_CI:
    import pycocoevalcap  # noqa: F401
else:
    pycocoevalcap = pytest.importorskip("pycocoevalcap", reason="pip install -e .[dev]")

WORDS = "a an the red blue green circle square star two three shapes on in left right top".split()


def random_corpus(seed: int, images: int = 25) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))

    hyps = [sentence() for _ in range(images)]
    refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    # Some hypotheses copy a reference, so high n-gram orders have matches too.
    for k in range(0, images, 3):
        hyps[k] = refs[k][0]
    return hyps, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_and_cider_match_pycocoevalcap(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    hyps, refs = random_corpus(seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ref_cider, ref_per_image = Cider().compute_score(gts, res)

    ours = M.bleu(hyps, refs)
    assert ours == pytest.approx(ref_bleu, rel=1e-9, abs=1e-12)
    score, per_image = M.cider_d(hyps, refs)
    assert score == pytest.approx(float(ref_cider), rel=1e-9, abs=1e-12)
    assert per_image == pytest.approx(list(ref_per_image), rel=1e-9, abs=1e-12)


def test_world_captions_match_pycocoevalcap():
    # The synthetic world's three caption phrasings for a few scenes, one held out as the
    # hypothesis: the shape of input `visto eval` scores.
    refs = [
        ["A red circle and a blue square on a plain background.", "Two shapes: a red circle and a blue square.", "An image with a red circle in the top left and a blue square on the right."],
        ["A large green star on a striped background.", "One shape: a star.", "An image with a large green star in the centre."],
        ['A small pink hexagon on a graded background. The text "CAT" is written on it.', "One shape: a hexagon.", "An image with a small pink hexagon at the bottom."],
    ]  # fmt: skip
    hyps = [
        "Two shapes: a red circle and a green square.",
        "A large green star.",
        "One shape: a pink hexagon.",
    ]
    tok_refs = [[M.tokenize_caption(r) for r in rs] for rs in refs]
    tok_hyps = [M.tokenize_caption(h) for h in hyps]
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = dict(enumerate(tok_refs))
    res = {i: [h] for i, h in enumerate(tok_hyps)}
    assert M.bleu(tok_hyps, tok_refs) == pytest.approx(
        Bleu(4).compute_score(gts, res, verbose=0)[0]
    )
    assert M.cider_d(tok_hyps, tok_refs)[0] == pytest.approx(
        float(Cider().compute_score(gts, res)[0])
    )


@pytest.mark.slow
def test_tokenizer_matches_ptbtokenizer(tmp_path):
    if shutil.which("java") is None:
        message = "pycocoevalcap's tokenizer needs Java (apt-get install -y default-jre-headless)"
        if IN_CI:
            pytest.fail(message + ": CI must run this comparison (.ci/run installs it)")
        pytest.skip(message)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from visto.data.synth import WorldConfig, generate_world, iter_records

    generate_world(WorldConfig(n=12, size=64, seed=5), tmp_path, workers=1)
    sentences = [c for r in iter_records(tmp_path, "train") for c in r["tasks"]["captions"]]
    sentences += [
        "A dog's toy isn't on the t-shirt, it's 3.5 metres (or 1,000 cm) away!",
        "I don't know... maybe -- it's the men's room; o'clock? [yes] {no}",
        "They'll go; we'd been there. Can't stop.",
        "  two   dogs\tplaying  ",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    for i, s in enumerate(sentences):
        assert M.tokenize_caption(s) == java[i][0], s
