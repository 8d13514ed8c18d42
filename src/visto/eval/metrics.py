"""The field's metrics for generative VLMs, each a plain function on plain Python values.

    normalize_vqa_answer, vqa_accuracy, vqa_scores        VQA (Antol et al. 2015; VQAv2 eval script)
    count_accuracy                                        first integer or number word
    tokenize_caption, bleu, cider_d                       COCO captions (pycocoevalcap)
    box_iou, grounding_accuracy, detection_prf            IoU >= 0.5 (PASCAL VOC criterion)
    edit_distance, character_error_rate, ocr_exact_match  OCR
    pope_answer_is_yes, pope_metrics                      absent-object probes (Li et al. 2023)
    json_field_accuracy                                   structured output

Answers are read by the tasks' parsers (`visto.tasks.parsers`: numbers, OCR text, JSON), so a
figure scores exactly what `visto.tasks` reads. Nothing here knows models, samples or files;
`visto.eval.generative` wires them to samples.
Ratios of empty inputs are NaN (no figure), never a made-up 0 or 1.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from visto.tasks.parsers import normalize_ocr, parse_count
from visto.utils.boxes import Box, box_iou

NAN = float("nan")

# =============================================================================== VQA
# The answer processing of the official VQA evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py: processPunctuation, processDigitArticle),
# rewritten rule by rule. Its tables are data; they are kept as they are, oddities included
# (some targets use a typographic apostrophe, and a key with an ASCII "'" can never match,
# because punctuation processing has already removed every ASCII "'").

# "contraction without apostrophe" -> "with apostrophe", as the official table has them.
_CONTRACTIONS_TABLE = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn’t’ve | couldnt’ve couldn’t’ve | didnt didn’t | doesnt doesn’t | dont don’t
hadnt hadn’t | hadnt’ve hadn’t’ve | hadn'tve hadn’t’ve | hasnt hasn’t | havent haven’t
hed he’d | hed’ve he’d’ve | he’dve he’d’ve | hes he’s | howd how’d | howll how’ll | hows how’s
Id’ve I’d’ve | I’dve I’d’ve | Im I’m | Ive I’ve | isnt isn’t | itd it’d | itd’ve it’d’ve
it’dve it’d’ve | itll it’ll | let’s let’s | maam ma’am | mightnt mightn’t
mightnt’ve mightn’t’ve | mightn’tve mightn’t’ve | mightve might’ve | mustnt mustn’t
mustve must’ve | neednt needn’t | notve not’ve | oclock o’clock | oughtnt oughtn’t
ow’s’at ’ow’s’at | ’ows’at ’ow’s’at | ’ow’sat ’ow’s’at | shant shan’t | shed’ve she’d’ve
she’dve she’d’ve | she’s she’s | shouldve should’ve | shouldnt shouldn’t
shouldnt’ve shouldn’t’ve | shouldn’tve shouldn’t’ve | somebody’d somebodyd
somebodyd’ve somebody’d’ve | somebody’dve somebody’d’ve | somebodyll somebody’ll
somebodys somebody’s | someoned someone’d | someoned’ve someone’d’ve
someone’dve someone’d’ve | someonell someone’ll | someones someone’s | somethingd something’d
somethingd’ve something’d’ve | something’dve something’d’ve | somethingll something’ll
thats that’s | thered there’d | thered’ve there’d’ve | there’dve there’d’ve | therere there’re
theres there’s | theyd they’d | theyd’ve they’d’ve | they’dve they’d’ve | theyll they’ll
theyre they’re | theyve they’ve | twas ’twas | wasnt wasn’t | wed’ve we’d’ve | we’dve we’d’ve
weve we've | werent weren’t | whatll what’ll | whatre what’re | whats what’s | whatve what’ve
whens when’s | whered where’d | wheres where's | whereve where’ve | whod who’d
whod’ve who’d’ve | who’dve who’d’ve | wholl who’ll | whos who’s | whove who've | whyll why’ll
whyre why’re | whys why’s | wont won’t | wouldve would’ve | wouldnt wouldn’t
wouldnt’ve wouldn’t’ve | wouldn’tve wouldn’t’ve | yall y’all | yall’ll y’all’ll
y’allll y’all’ll | yall’d’ve y’all’d’ve | y’alld’ve y’all’d’ve | y’all’dve y’all’d’ve
youd you’d | youd’ve you’d’ve | you’dve you’d’ve | youll you’ll | youre you’re | youve you’ve
"""
VQA_CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTIONS_TABLE.replace("\n", "|").split("|") if pair.strip()
)
VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = ("a", "an", "the")
# Not in the list: "-" (t-shirt), "!" and "." (periods have their own rule below).
VQA_PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<",
                   "@", "`", ",", "?")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a typo (a lookahead, not a lookbehind), so it
# removes every period that is not followed by a digit: "3.5" stays, "yes." and "1." lose it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in VQA_PUNCTUATION:
        # A mark touching a space (or any text with "1,000"-style numbers) is deleted;
        # a mark inside a word becomes a space ("red/blue" -> "red blue").
        if p + " " in text or " " + p in text or _DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The VQAv2 evaluation's answer normalization (Antol et al. 2015; Goyal et al. 2017).

    Newlines and tabs become spaces; punctuation marks are deleted or turned into spaces;
    periods not followed by a digit are deleted; the text is lowercased; number words
    zero..ten (and "none") become digits; articles a/an/the are dropped; contractions
    written without an apostrophe get one ("dont" -> "don’t").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Accuracy of one answer against the human answers of one question.

    With several references (VQAv2 has ten) this is the official consensus accuracy:
    min(1, #matching references / 3), averaged over the leave-one-out subsets of the
    references. With one reference it is exact match; both after `normalize_vqa_answer`.
    (The official script normalizes references only by punctuation, because the dataset's
    answers were normalized when collected; ours are not, so both sides get the full rule.)
    """
    assert len(references) > 0, "a question needs at least one reference answer"
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


def vqa_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    question_types: Sequence[str] | None = None,
) -> dict[str, float]:
    """{"overall": mean accuracy, "<type>": mean accuracy per question type}.

    A reference may be one string or a list of strings. Per-type figures average the
    per-question accuracy (the official script averages its last leave-one-out term instead,
    a known slip that only matters with several references).
    """
    assert len(predictions) == len(references), (len(predictions), len(references))
    accs = [
        vqa_accuracy(p, [r] if isinstance(r, str) else r)
        for p, r in zip(predictions, references, strict=True)
    ]
    out = {"overall": mean_or_nan(accs)}
    if question_types is not None:
        assert len(question_types) == len(accs)
        by_type: dict[str, list[float]] = defaultdict(list)
        for qtype, acc in zip(question_types, accs, strict=True):
            by_type[qtype].append(acc)
        out.update({qtype: mean_or_nan(v) for qtype, v in sorted(by_type.items())})
    return out


# =============================================================================== counting


def count_accuracy(predictions: Sequence[str], targets: Sequence[int]) -> float:
    """Share of predictions whose `parse_count` equals the target (no number = wrong)."""
    assert len(predictions) == len(targets)
    return mean_or_nan(
        [float(parse_count(p) == int(t)) for p, t in zip(predictions, targets, strict=True)]
    )


# =============================================================================== captions
# BLEU (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015) exactly as the COCO caption
# toolkit (pycocoevalcap) computes them, on captions tokenized as its PTBTokenizer does.

# Tokens pycocoevalcap deletes after PTB tokenization (tokenizer/ptbtokenizer.py).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"]
)  # fmt: skip
# PTB spells brackets as -LRB- etc.; lowercased, they miss pycocoevalcap's (uppercase) list
# and stay in the caption as tokens, so they stay here too.
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_SPLIT = re.compile(
    r"""(?x)
    \.\.\.                      # ellipsis
    | --                        # dash
    | [A-Za-z]+(?=n't\b)        # "do" of "don't"
    | n't\b                     # "n't"
    | '(?:s|re|ve|ll|d|m)\b     # clitics: 's 're 've 'll 'd 'm
    | \d+(?:[.,]\d+)*           # numbers with decimal points or thousands commas
    | \w+(?:-\w+|'(?!(?:s|re|ve|ll|d|m)\b)\w+)*  # words: t-shirt, o'clock (not dog's)
    | \S                        # any other single character (punctuation)
    """
)


def tokenize_caption(text: str) -> str:
    """Lowercased, PTB-style tokens joined by spaces, punctuation removed.

    A pure-Python stand-in for pycocoevalcap's Java PTBTokenizer (`-lowerCase`, then its
    punctuation list removed). It agrees with it on plain English captions ("don't" ->
    "do n't", "dog's" -> "dog 's", quotes dropped, "(" -> "-lrb-"); a slow test checks that
    against the Java tokenizer on the synthetic world's captions and harder sentences.
    """
    text = text.replace("\n", " ").lower()
    tokens = [_PTB_BRACKETS.get(t, t) for t in _PTB_SPLIT.findall(text)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t != '"')


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's Bleu: [B1, ..., Bn] on pre-tokenized text.

    Clipped n-gram precisions are summed over the corpus; the brevity penalty uses, per
    sentence, the reference length closest to the hypothesis length (ties: the shorter);
    the tiny/small constants that keep zero counts finite are pycocoevalcap's.
    """
    assert len(hypotheses) == len(references) and len(hypotheses) > 0
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        assert len(refs) > 0, "every hypothesis needs at least one reference"
        words = hyp.split()
        max_ref_counts: Counter = Counter()
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, c in _ngrams(ref_words, n).items():
                max_ref_counts[gram] = max(max_ref_counts[gram], c)
        test_len += len(words)
        ref_len += min(ref_lens, key=lambda length: (abs(length - len(words)), length))
        for gram, c in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(c, max_ref_counts.get(gram, 0))
        for k in range(n):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider: (corpus mean, per-image scores).

    Each caption is a tf-idf vector per n-gram order 1..n, with document frequencies counted
    over the images' reference sets (so the corpus matters: one image alone scores 0). Per
    order, the hypothesis-reference similarity is the cosine with the hypothesis weights
    clipped at the reference's, times a Gaussian penalty exp(-d^2 / 2 sigma^2) on the length
    difference d. The score averages orders and references, times 10. As in pycocoevalcap,
    a caption's "length" is its number of bigrams.
    """
    assert len(hypotheses) == len(references) and len(hypotheses) > 0
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    hyp_counts = [_ngrams(h.split(), n) for h in hypotheses]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_num_images = math.log(len(references))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts, strict=True):
        assert len(refs) > 0, "every hypothesis needs at least one reference"
        h_vec, h_norm, h_len = tfidf(hyp)
        total = 0.0
        for ref in refs:
            r_vec, r_norm, r_len = tfidf(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(
                    min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in h_vec[k].items()
                )
                if h_norm[k] != 0 and r_norm[k] != 0:
                    dot /= h_norm[k] * r_norm[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores), scores


# =============================================================================== boxes


def grounding_accuracy(
    predictions: Sequence[Box | None], targets: Sequence[Box], threshold: float = 0.5
) -> float:
    """Share of referring expressions whose predicted box has IoU >= threshold with the
    target (Acc@0.5 of RefCOCO, Mao et al. 2016); a missing box (None) is wrong."""
    assert len(predictions) == len(targets)
    return mean_or_nan(
        [
            float(p is not None and box_iou(p, t) >= threshold)
            for p, t in zip(predictions, targets, strict=True)
        ]
    )


def match_boxes(
    predicted: Sequence[Box],
    target: Sequence[Box],
    threshold: float = 0.5,
    predicted_labels: Sequence[str] | None = None,
    target_labels: Sequence[str] | None = None,
) -> list[tuple[int, int]]:
    """One-to-one (predicted index, target index) pairs with IoU >= threshold (and equal
    labels when labels are given), as many as possible, then highest total IoU.

    Hungarian matching (scipy's linear_sum_assignment) rather than greedy: greedy by IoU
    can leave a box unmatched that an optimal assignment would match, which would count
    against recall through no fault of the model.
    """
    if not predicted or not target:
        return []
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    weight = np.zeros((len(predicted), len(target)))
    for i, p in enumerate(predicted):
        for j, t in enumerate(target):
            iou = box_iou(p, t)
            same = predicted_labels is None or predicted_labels[i] == target_labels[j]
            if iou >= threshold and same:
                # 1 per match first (maximum cardinality), IoU only breaks ties.
                weight[i, j] = 1.0 + 1e-4 * iou
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if weight[i, j] > 0]


def detection_prf(
    predicted: Sequence[Sequence[Box]],
    target: Sequence[Sequence[Box]],
    threshold: float = 0.5,
    predicted_labels: Sequence[Sequence[str]] | None = None,
    target_labels: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Precision, recall and F1 of predicted boxes over a set of images, at IoU >= threshold.

    Per image, boxes are matched one to one by `match_boxes` (Hungarian; with labels, a match
    also needs the same label); true positives are summed over images:
    precision = TP / #predicted, recall = TP / #target, F1 their harmonic mean.
    """
    assert len(predicted) == len(target)
    tp = n_pred = n_target = 0
    for k, (p, t) in enumerate(zip(predicted, target, strict=True)):
        pl = predicted_labels[k] if predicted_labels is not None else None
        tl = target_labels[k] if target_labels is not None else None
        tp += len(match_boxes(p, t, threshold, pl, tl))
        n_pred += len(p)
        n_target += len(t)
    precision = tp / n_pred if n_pred else NAN
    recall = tp / n_target if n_target else NAN
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


# =============================================================================== OCR


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest character insertions, deletions and substitutions
    that turn `a` into `b` (Wagner-Fischer dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus CER: total edit distance / total reference characters, after `normalize_ocr`
    (how jiwer and the OCR literature pool it; can exceed 1 for long wrong outputs)."""
    assert len(predictions) == len(references)
    dist = sum(
        edit_distance(normalize_ocr(p), normalize_ocr(r))
        for p, r in zip(predictions, references, strict=True)
    )
    chars = sum(len(normalize_ocr(r)) for r in references)
    return dist / chars if chars else NAN


def ocr_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize_ocr`."""
    assert len(predictions) == len(references)
    return mean_or_nan(
        [
            float(normalize_ocr(p) == normalize_ocr(r))
            for p, r in zip(predictions, references, strict=True)
        ]
    )


# =============================================================================== POPE


def pope_answer_is_yes(answer: str) -> bool:
    """POPE's reading of a free answer (Li et al. 2023, "Evaluating Object Hallucination in
    Large Vision-Language Models", evaluate.py): keep the first sentence, drop commas; the
    answer is "no" when it contains the word "no", "No" or "not", otherwise "yes"."""
    first = answer.split(".")[0].replace(",", "")
    words = first.split(" ")
    return not ("no" in words or "No" in words or "not" in words)


def pope_metrics(answers: Sequence[str], present: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (with "yes" the positive class) and the yes-ratio
    (share of "yes" answers; 0.5 on POPE's balanced probes for an unbiased model)."""
    assert len(answers) == len(present)
    if not answers:
        return {k: NAN for k in ("acc", "precision", "recall", "f1", "yes_ratio")}
    said_yes = [pope_answer_is_yes(a) for a in answers]
    tp = sum(y and p for y, p in zip(said_yes, present, strict=True))
    fp = sum(y and not p for y, p in zip(said_yes, present, strict=True))
    fn = sum(not y and p for y, p in zip(said_yes, present, strict=True))
    tn = len(answers) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else NAN
    recall = tp / (tp + fn) if tp + fn else NAN
    return {
        "acc": (tp + tn) / len(answers),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "yes_ratio": sum(said_yes) / len(answers),
    }


# =============================================================================== JSON


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _count_leaves(value: Any) -> int:
    if isinstance(value, Mapping):
        return sum(_count_leaves(v) for v in value.values()) or 1
    if isinstance(value, list) and value and not _is_box(value):
        return sum(_count_leaves(v) for v in value)
    return 1


def _object_affinity(p: Any, t: Mapping) -> float:
    """How alike two listed objects are: +1 per equal shape/colour, + box IoU."""
    if not isinstance(p, Mapping):
        return 0.0
    score = sum(float(k in t and p.get(k) == t[k]) for k in ("shape", "colour", "color", "label"))
    if _is_box(p.get("box")) and _is_box(t.get("box")):
        score += box_iou(p["box"], t["box"])
    return score


def json_field_matches(predicted: Any, target: Any, iou_threshold: float = 0.5) -> tuple[int, int]:
    """(correct, total) leaf fields of `predicted` against `target`; the rule, recursively:

    - an object (dict): each key of the target is compared; a key only the prediction has
      counts as one more wrong field, unless its value is 0, "", [] or null;
    - a box (a list of 4 numbers under any key): correct when IoU >= `iou_threshold`;
    - a list of objects: predicted and target objects are paired one to one by Hungarian
      matching on affinity (+1 for each equal shape/colour, + box IoU; a pair needs
      affinity >= 0.5), then compared field by field; an unpaired target object's fields
      are all wrong, and so is every field of an unpaired predicted object (hallucinated);
    - a list of plain values: the size of the multiset intersection is correct, out of the
      longer list's length (order is ignored);
    - anything else: equal (int 3 and float 3.0 are equal; "3" and 3 are not).
    """
    if isinstance(target, Mapping):
        if not isinstance(predicted, Mapping):
            return 0, _count_leaves(target)
        correct = total = 0
        for key, t_val in target.items():
            if key in predicted:
                c, n = json_field_matches(predicted[key], t_val, iou_threshold)
            else:
                c, n = 0, _count_leaves(t_val)
            correct, total = correct + c, total + n
        extra = [k for k, v in predicted.items() if k not in target and v not in (0, "", [], None)]
        return correct, total + len(extra)
    if _is_box(target):
        ok = _is_box(predicted) and box_iou(predicted, target) >= iou_threshold
        return int(ok), 1
    if isinstance(target, list):
        if not isinstance(predicted, list):
            return 0, _count_leaves(target)
        if not target and not predicted:
            return 1, 1
        if any(isinstance(t, Mapping) for t in target):
            return _match_object_lists(predicted, target, iou_threshold)
        hashable = [json.dumps(v, sort_keys=True) for v in predicted]
        common = Counter(hashable) & Counter(json.dumps(v, sort_keys=True) for v in target)
        return sum(common.values()), max(len(target), len(predicted)) or 1
    same = (
        type(predicted) is type(target)
        or (isinstance(predicted, (int, float)) and isinstance(target, (int, float))
            and not isinstance(predicted, bool) and not isinstance(target, bool))
    )  # fmt: skip
    return int(same and predicted == target), 1


def _match_object_lists(predicted: list, target: list, iou_threshold: float) -> tuple[int, int]:
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    pairs: list[tuple[int, int]] = []
    if predicted:
        affinity = np.array([[_object_affinity(p, t) for t in target] for p in predicted])
        rows, cols = linear_sum_assignment(affinity, maximize=True)
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if affinity[i, j] >= 0.5]
    correct = total = 0
    for i, j in pairs:
        c, n = json_field_matches(predicted[i], target[j], iou_threshold)
        correct, total = correct + c, total + n
    paired_p = {i for i, _ in pairs}
    paired_t = {j for _, j in pairs}
    total += sum(_count_leaves(t) for j, t in enumerate(target) if j not in paired_t)
    total += sum(_count_leaves(p) for i, p in enumerate(predicted) if i not in paired_p)
    return correct, total


def json_field_accuracy(predicted: Any, target: Any, iou_threshold: float = 0.5) -> float:
    """correct / total of `json_field_matches` (1.0 = every field right, nothing invented)."""
    correct, total = json_field_matches(predicted, target, iou_threshold)
    return correct / total if total else NAN


# =============================================================================== helpers


def mean_or_nan(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return NAN
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
