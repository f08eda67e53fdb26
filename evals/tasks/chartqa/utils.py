"""ChartQA's lm-eval hooks: `short` (the extracted short answer, relaxed accuracy) and `lmms` (lmms-eval's chartqa:
relaxed correctness of the whole generation, per reporting split; docs/protocols.md)."""
from evals.hooks import lmms_prediction, references
from evals.metrics import extract_short_answer, lmms_relaxed_correctness, relaxed_accuracy


def process_chartqa(doc: dict, results: list[str]) -> dict:
    return {"chartqa_relaxed_accuracy": relaxed_accuracy(extract_short_answer(results[0]), references(doc))}


def process_chartqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval chartqa: relaxed correctness (5 %) of the whole generation; the item also counts in its split
    (lmms-eval's relaxed_human_split / relaxed_augmented_split) when its `subset` is "human" / "augmented"."""
    pred = lmms_prediction(results)
    score = 1.0 if any(lmms_relaxed_correctness(pred, ref) for ref in references(doc)) else 0.0
    out = {"chartqa_relaxed_accuracy": score}
    if doc.get("subset") in ("human", "augmented"):
        out[f"chartqa_relaxed_accuracy_{doc['subset']}"] = score
    return out
