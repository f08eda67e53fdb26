"""Answer metrics: VQAv2 accuracy (official EvalAI normalisation) and ChartQA relaxed accuracy.

Both follow the reference definitions (VQA: GT-Vision-Lab/VQA `vqaEval.py`; ChartQA: lmms-eval / Qwen-VL).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

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
