"""DocVQA's lm-eval hooks: ANLS (threshold 0.5) against all the answers, of the extracted short answer (`short`) or
of the stripped generation (`lmms`, lmms-eval's docvqa_val; docs/protocols.md)."""
from evals.hooks import lmms_prediction, references
from evals.metrics import anls, extract_short_answer


def process_docvqa(doc: dict, results: list[str]) -> dict:
    """`short`: the extracted short answer, ANLS (threshold 0.5) against all the answers."""
    return {"docvqa_anls": anls(extract_short_answer(results[0]), references(doc))}


def process_docvqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval docvqa_val: per-item ANLS (threshold 0.5) against all answers; the task metric is their mean."""
    return {"docvqa_anls": anls(lmms_prediction(results), references(doc))}
