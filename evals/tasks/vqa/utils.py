"""VQAv2's lm-eval hooks: `short` (the extracted short answer, official VQA accuracy) and `lmms` (lmms-eval's
vqav2_val: EvalAI normalisation, 10-answer VQA accuracy; docs/protocols.md)."""
from evals.hooks import lmms_prediction, references
from evals.metrics import extract_short_answer, lmms_vqa_accuracy, vqa_accuracy


def process_vqa(doc: dict, results: list[str]) -> dict:
    return {"vqa_accuracy": vqa_accuracy(extract_short_answer(results[0]), references(doc))}


def process_vqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval vqav2_val: EvalAI normalisation (punctuation, digits, articles), 10-answer VQA accuracy."""
    return {"vqa_accuracy": lmms_vqa_accuracy(lmms_prediction(results), references(doc))}
