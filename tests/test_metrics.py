"""Generative-VLM metrics against hand-computed values and the official scripts' behaviour."""

from __future__ import annotations

import math

import pytest

from visto.eval import metrics as M

# ------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the table stops at ten
        ("A dog", "dog"),  # articles are dropped
        ("the red  Circle\n", "red circle"),
        ("an apple", "apple"),
        ("3.5", "3.5"),  # decimal point kept
        ("1,000", "1000"),  # digit,digit anywhere: every listed mark is deleted
        ("red/blue", "red blue"),  # a mark inside a word becomes a space
        ("red / blue", "red blue"),  # a mark touching a space is deleted
        ("yes, it is", "yes it is"),
        ("dont", "don’t"),  # contractions get the official table's apostrophe
        ("don't", "don t"),  # the ASCII apostrophe is punctuation and becomes a space
        ("t-shirt", "t-shirt"),  # hyphens are not in the list
        ("wow!", "wow!"),  # nor is "!"
        ("(left)", "left"),
        ("\tnone of them", "0 of them"),
    ],
)
def test_vqa_normalization_follows_the_official_script(raw, expected):
    assert M.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_single_reference_is_normalized_exact_match():
    assert M.vqa_accuracy("Two.", ["2"]) == 1.0
    assert M.vqa_accuracy("There are two", ["2"]) == 0.0
    assert M.vqa_accuracy("the blue", ["blue"]) == 1.0


def test_vqa_accuracy_ten_references_is_the_consensus_formula():
    # 2 of 10 humans said "red": each leave-one-out subset has 2 matches (8 subsets) or 1
    # (the 2 subsets that leave a "red" out): (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
    refs = ["red"] * 2 + ["blue"] * 8
    assert M.vqa_accuracy("red", refs) == pytest.approx(0.6)
    # 4 or more matches: min(1, 3/3) in every subset.
    assert M.vqa_accuracy("blue", refs) == pytest.approx(1.0)
    # 3 matches: 7 subsets with 3 (1.0), 3 subsets with 2 (2/3) -> 0.9.
    assert M.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("green", refs) == 0.0


def test_vqa_scores_by_type():
    preds = ["yes", "2", "red", "no"]
    refs = ["yes", "3", "red", ["yes"]]
    types = ["exist", "count", "colour", "exist"]
    out = M.vqa_scores(preds, refs, types)
    assert out == {"overall": 0.5, "colour": 1.0, "count": 0.0, "exist": 0.5}


# ------------------------------------------------------------------------------ counting


def test_count_accuracy():
    assert M.count_accuracy(["3", "two", "many", "4"], [3, 2, 1, 5]) == 0.5
    assert math.isnan(M.count_accuracy([], []))


# ------------------------------------------------------------------------------ captions


def test_bleu_by_hand():
    # hyp "a b c d" vs ref "a b c e": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 (-> tiny).
    b = M.bleu(["a b c d"], [["a b c e"]])
    assert b[0] == pytest.approx(0.75)
    assert b[1] == pytest.approx((0.75 * 2 / 3) ** 0.5)
    assert b[2] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert b[3] < 1e-3
    # Identical captions score 1; a short hypothesis pays the brevity penalty exp(1 - r/c).
    assert M.bleu(["a b c d e"], [["a b c d e"]])[3] == pytest.approx(1.0)
    short = M.bleu(["a b c d"], [["a b c d e f"]])[3]
    assert short == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)


def test_bleu_closest_reference_length():
    # Lengths 2 and 5 for a 4-word hypothesis: the closest is 5 -> brevity penalty exp(1-5/4).
    b = M.bleu(["a b c d"], [["a b", "a b c d x"]])[0]
    assert b == pytest.approx(math.exp(1 - 5 / 4))


def test_cider_single_image_is_zero_and_corpus_matters():
    # With one image every n-gram has idf log(1) - log(1) = 0: the score is 0 by definition.
    score, per = M.cider_d(["a red circle"], [["a red circle"]])
    assert score == 0.0 and per == [0.0]


def test_cider_by_hand_two_images():
    # Two images, one reference each, hypotheses equal to their references and disjoint
    # vocabularies: every n-gram has df 1, idf log 2; cosine 1 for each order; no length
    # difference: 10 * mean over orders (1, 1, 1, 1) = 10. But orders the caption is too
    # short for (4-grams of a 3-word caption) give 0: (1 + 1 + 1 + 0) / 4 * 10 = 7.5.
    score, per = M.cider_d(["a b c", "d e f g"], [["a b c"], ["d e f g"]])
    assert per == pytest.approx([7.5, 10.0])
    assert score == pytest.approx(8.75)


def test_tokenize_caption_ptb_style():
    assert (
        M.tokenize_caption('Two shapes: a red circle. The text "CAT" is written on it.')
        == "two shapes a red circle the text cat is written on it"
    )
    assert M.tokenize_caption("It isn't the dog's (toy)") == "it is n't the dog 's -lrb- toy -rrb-"


# ------------------------------------------------------------------------------ boxes


def test_box_iou_by_hand():
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert M.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert M.box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert M.box_iou([0, 0, 0, 10], [0, 0, 10, 10]) == 0.0  # degenerate


def test_grounding_accuracy():
    targets = [[0, 0, 100, 100]] * 3
    preds = [[0, 0, 100, 100], [50, 0, 150, 100], None]  # IoU 1, 1/3, missing
    assert M.grounding_accuracy(preds, targets) == pytest.approx(1 / 3)
    assert M.grounding_accuracy([[0, 0, 100, 60]], [[0, 0, 100, 100]]) == 1.0  # IoU 0.6


def test_hungarian_matching_beats_greedy():
    # Greedy by IoU takes p0-t0 (0.85) first and leaves p1 only t1 (IoU 0.33 < 0.5): one
    # match. The optimal assignment pairs p0-t1 (0.79) and p1-t0 (0.54): two matches.
    t0, t1 = [0, 0, 100, 100], [20, 0, 120, 100]
    p0 = [8, 0, 108, 100]  # IoU with t0: 92/108 = 0.852; with t1: 88/112 = 0.786
    p1 = [-30, 0, 70, 100]  # IoU with t0: 70/130 = 0.538; with t1: 50/150 = 0.333
    assert M.box_iou(p0, t0) > M.box_iou(p0, t1) > 0.5 > M.box_iou(p1, t1)
    pairs = M.match_boxes([p0, p1], [t0, t1])
    assert sorted(pairs) == [(0, 1), (1, 0)]


def test_detection_prf_with_labels():
    target = [[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 50, 50]]]
    target_labels = [["circle", "square"], ["star"]]
    predicted = [[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], []]
    predicted_labels = [["circle", "star", "square"], []]
    out = M.detection_prf(predicted, target, 0.5, predicted_labels, target_labels)
    # One true positive (the circle; the square-box is labelled star), 3 predicted, 3 target.
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(1 / 3)
    no_labels = M.detection_prf(predicted, target)
    assert no_labels["precision"] == pytest.approx(2 / 3) and no_labels["recall"] == pytest.approx(
        2 / 3
    )


# ------------------------------------------------------------------------------ OCR


def test_edit_distance_and_cer():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance("", "abc") == 3
    assert M.edit_distance("abc", "abc") == 0
    # (1 + 0) edits over (3 + 5) reference characters.
    assert M.character_error_rate(["CAT", "HELLO"], ["CAR", "HELLO"]) == pytest.approx(1 / 8)
    assert M.character_error_rate(["CAT  DOG"], ["CAT DOG"]) == 0.0  # whitespace collapsed
    assert M.ocr_exact_match(["CAT DOG", "cat"], [" CAT DOG ", "CAT"]) == 0.5


# ------------------------------------------------------------------------------ POPE


def test_pope_answer_reading():
    assert M.pope_answer_is_yes("Yes, there is.")
    assert not M.pope_answer_is_yes("No")
    assert not M.pope_answer_is_yes("There is not a dog.")
    assert M.pope_answer_is_yes("Yes. No other objects.")  # only the first sentence counts
    assert not M.pope_answer_is_yes("no, none")


def test_pope_metrics_by_hand():
    answers = ["yes", "yes", "no", "yes", "no", "no"]
    present = [True, True, True, False, False, False]
    out = M.pope_metrics(answers, present)
    # TP 2, FN 1, FP 1, TN 2.
    assert out["acc"] == pytest.approx(4 / 6)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(0.5)
    always_yes = M.pope_metrics(["yes"] * 4, [True, True, False, False])
    assert always_yes["yes_ratio"] == 1.0 and always_yes["precision"] == 0.5
    assert always_yes["f1"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ JSON


TARGET = {
    "objects": [
        {"shape": "circle", "colour": "red", "size": "small", "box": [0, 0, 100, 100]},
        {"shape": "square", "colour": "blue", "size": "large", "box": [500, 500, 900, 900]},
    ],
    "counts": {"circle": 1, "square": 1},
    "text": ["CAT"],
}


def test_json_field_accuracy_perfect_and_partial():
    assert M.json_field_accuracy(TARGET, TARGET) == 1.0
    # 8 object fields + 2 counts + 1 text = 11 fields. Objects listed in the other order
    # (matching is by shape/colour/box, not position); the square's box is off (IoU 0)
    # and the circle's size wrong: 9 of 11.
    pred = {
        "objects": [
            {"shape": "square", "colour": "blue", "size": "large", "box": [0, 900, 10, 999]},
            {"shape": "circle", "colour": "red", "size": "large", "box": [5, 0, 100, 100]},
        ],
        "counts": {"circle": 1, "square": 1},
        "text": ["CAT"],
    }
    assert M.json_field_matches(pred, TARGET) == (9, 11)


def test_json_field_accuracy_missing_and_hallucinated_objects():
    pred = {
        "objects": [
            TARGET["objects"][0],
            {"shape": "star", "colour": "green", "size": "small", "box": [300, 0, 400, 90]},
        ],
        "counts": {"circle": 1, "square": 1, "star": 1},
        "text": [],
    }
    # circle 4/4; square unpaired (4 wrong); star unpaired (4 wrong); counts 2/2 + 1 extra;
    # text 0 of max(1, 0) = 1. Correct 6, total 4 + 4 + 4 + 3 + 1 = 16.
    assert M.json_field_matches(pred, TARGET) == (6, 16)
    assert M.json_field_matches({"text": []}, {"text": []}) == (1, 1)
    assert M.json_field_matches([1, 2], {"a": 1}) == (0, 1)
    assert M.json_field_matches({"n": 3.0}, {"n": 3}) == (1, 1)
    assert M.json_field_matches({"n": "3"}, {"n": 3}) == (0, 1)
