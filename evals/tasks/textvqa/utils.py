"""TextVQA's lm-eval hooks: `short` (the extracted short answer, VQA accuracy over the 10 answers) and `lmms`
(lmms-eval's textvqa_val: the full EvalAI answer processor; docs/protocols.md)."""
from evals.hooks import lmms_prediction, references
from evals.metrics import extract_short_answer, lmms_vqa_accuracy, vqa_accuracy


def process_textvqa(doc: dict, results: list[str]) -> dict:
    """`short`: the extracted short answer, VQA accuracy (official normalisation) over the 10 answers."""
    return {"textvqa_accuracy": vqa_accuracy(extract_short_answer(results[0]), references(doc))}


def process_textvqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval textvqa_val: the full EvalAI answer processor (lowercase, drop ',' '?'), 10-answer VQA accuracy."""
    return {"textvqa_accuracy": lmms_vqa_accuracy(lmms_prediction(results), references(doc), tokenize=True)}
