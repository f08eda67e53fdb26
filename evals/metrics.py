"""Answer metrics: VQAv2 accuracy (official EvalAI normalisation) and ChartQA relaxed accuracy.

Both follow the reference definitions (VQA: GT-Vision-Lab/VQA `vqaEval.py`; ChartQA: lmms-eval / Qwen-VL).
"""
from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence

import numpy as np

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer processor: punctuation, periods, number words, articles, contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy: mean over the 10 leave-one-out subsets of min(1, #matches / 3).

    With a single reference answer this reduces to exact match after normalisation.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in human_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed accuracy for one label: 5% tolerance when both parse as numbers, else exact match."""
    pred, tgt = prediction.strip(), target.strip()
    pred_f, tgt_f = _to_float(pred), _to_float(tgt)
    if pred_f is not None and tgt_f:
        return abs(pred_f - tgt_f) / abs(tgt_f) <= max_relative_change
    return pred.lower() == tgt.lower()


def relaxed_accuracy(prediction: str, labels: Sequence[str]) -> float:
    """1.0 if the prediction is relaxed-correct against any label."""
    if not labels:
        raise ValueError("relaxed_accuracy needs at least one label")
    return float(any(relaxed_correctness(prediction, label) for label in labels))


_FINAL_ANSWER = re.compile(r"(?:final answer|the answer is)\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def extract_short_answer(text: str) -> str:
    """The short answer inside a generation: `<answer>x</answer>`, '... Final Answer: x', 'The answer is x.'.

    Plain short answers pass through (first line, trailing period removed).
    """
    text = text.strip()
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        text = tagged[-1].strip()
    else:
        found = _FINAL_ANSWER.findall(text)
        if found:
            text = found[-1].strip()
    text = text.splitlines()[0].strip() if text else ""
    return text[:-1].strip() if text.endswith(".") else text


def question_prior(train_questions: Sequence[str], train_answers: Sequence[str]) -> dict[str, str]:
    """The most frequent training answer for every distinct question text (the question-only baseline)."""
    by_question: dict[str, Counter] = {}
    for q, a in zip(train_questions, train_answers, strict=True):
        by_question.setdefault(q, Counter())[a] += 1
    return {q: c.most_common(1)[0][0] for q, c in by_question.items()}


def bootstrap_metric(scores: Sequence[float], groups: Sequence[str] | None = None, samples: int = 1000,
                     seed: int = 0):
    """The metric of ``samples`` resamples of the items (with replacement, seeded): the mean score, or with
    ``groups`` of two or more values the mean of the groups' means (ChartQA's human/augmented). A numpy array."""

    values = np.asarray(scores, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    if groups is None or len(set(groups)) < 2:
        return values[picks].mean(axis=1)
    labels = np.asarray(groups)
    means = []
    for group in sorted(set(groups)):
        member = (labels == group).astype(float)
        counts = member[picks].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append((values * member)[picks].sum(axis=1) / counts)  # nan where a resample lacks the group
    return np.nanmean(means, axis=0)


def interval(resampled, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap resamples."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


# --- lmms-eval protocol scorers ---------------------------------------------------------------------------------
# Exactly what lmms-eval computes (EvolvingLMMs-Lab/lmms-eval @ 75571cfe, = PyPI 0.7.3 for these files), written
# with vlmlab's own code; tests/test_protocols.py checks them item by item against lmms-eval's own functions'
# outputs (tests/fixtures/lmms_scores.json). See docs/protocols.md.

_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # lmms-eval's (mmf's) variant of the official (\d)(,)(\d)


def evalai_normalize(answer: str, *, tokenize: bool = False) -> str:
    """lmms-eval's EvalAIAnswerProcessor: ``tokenize=False`` is the VQAv2 path (process_punctuation then
    process_digit_article), ``tokenize=True`` the full ``__call__`` TextVQA uses (first lowercase, drop ',' and '?',
    split off "'s"). Differs from `normalize_vqa_answer` only in edge cases: repeated commas between digits, and at
    most 32 periods stripped (lmms-eval passes ``re.UNICODE``, = 32, as ``re.sub``'s count)."""
    text = answer
    if tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _EVALAI_COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=32)
    return _process_digits_articles(out)


def lmms_vqa_accuracy(prediction: str, answers: Sequence[str], *, tokenize: bool = False) -> float:
    """VQA accuracy as lmms-eval's vqav2 (``tokenize=False``) / textvqa (``tokenize=True``) score it: both sides
    through `evalai_normalize`, then the mean over the leave-one-out subsets of min(1, matches / 3), averaged with
    ``statistics.mean`` (exactly rounded, as lmms-eval). The prediction is used as given (strip it first, as lmms-eval's
    task does). One reference answer: exact match after normalisation (lmms-eval would score every item 0 there, as
    the subset left after removing the only answer is empty; its datasets always have 10)."""

    if not answers:
        raise ValueError("lmms_vqa_accuracy needs at least one reference answer")
    pred = evalai_normalize(prediction, tokenize=tokenize)
    gts = [evalai_normalize(a, tokenize=tokenize) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    return float(statistics.mean(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3.0)
                                 for i in range(len(gts))))


def lmms_relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness exactly as lmms-eval (from Qwen-VL): no stripping of the target, a trailing run
    of '%' divides by 100; numeric when both parse and the target is non-zero, else case-insensitive equality."""
    def to_float(text: str) -> float | None:
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    pred_f, tgt_f = to_float(prediction), to_float(target)
    if pred_f is not None and tgt_f:
        return abs(pred_f - tgt_f) / abs(tgt_f) <= max_relative_change
    return prediction.lower() == target.lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one item, as lmms-eval's ``anls`` metric (from Qwen-VL):
    both sides normalised (strip, lowercase, whitespace runs -> one space) for the distance, which is divided by the
    longer of the two *un-normalised* strings' lengths (``len(s.upper())``, as lmms-eval); score = 1 - the smallest
    normalised distance over the answers, set to 0 when below ``threshold`` (so a distance of exactly 0.5 keeps 0.5,
    unlike the ST-VQA definition's NL >= 0.5 -> 0). The task mean of these is the reported ANLS."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(levenshtein(gt, pred)) / float(length))
    score = 1 - min(values)
    return 0.0 if score < threshold else score


def multiple_choice_accuracy(prediction: str, letter: str, choice: str | None = None) -> float:
    """Multiple choice: 1.0 when the prediction is the option letter (any case), or starts "X." with X the upper-case
    correct letter (lmms-eval's / LLaVA's ScienceQA rule; "B. ..." with a wrong letter scores 0). With ``choice``
    (the correct option's text) a prediction equal to it (case-insensitive, trailing period dropped) also counts;
    lmms-eval's protocol passes none."""
    pred, target = prediction.strip(), letter.strip().lower()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    if choice is not None:
        def norm(text: str) -> str:
            text = " ".join(text.lower().split())
            return text[:-1].rstrip() if text.endswith(".") else text
        return float(norm(pred) == norm(choice))
    return 0.0


def choice_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Multiple-choice accuracy of one item whose ``answers`` are [the option letter, the option's text]: the letter
    (or "X. ...") scores, and so does the option's text (ScienceQA's `short` protocol, its question-only prior and
    GRPO reward; the `lmms` protocol accepts only the letter, as lmms-eval)."""
    return multiple_choice_accuracy(prediction, answers[0], answers[1] if len(answers) > 1 else None)
