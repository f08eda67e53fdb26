"""lm-eval hooks shared by vlmlab's task YAMLs (loaded by path through `!function utils.<name>`)."""
from evals.metrics import extract_short_answer, relaxed_accuracy, vqa_accuracy


def _references(doc: dict) -> list[str]:
    """Reference answers from the canonical view (`answers`), VQAv2 (`answers` dicts) or ChartQA (`label`)."""
    refs = doc.get("answers")
    if refs is None:
        refs = doc.get("label")
    if isinstance(refs, str):
        return [refs]
    return [r["answer"] if isinstance(r, dict) else str(r) for r in refs]


def process_vqa(doc: dict, results: list[str]) -> dict:
    return {"vqa_accuracy": vqa_accuracy(extract_short_answer(results[0]), _references(doc))}


def process_chartqa(doc: dict, results: list[str]) -> dict:
    return {"relaxed_accuracy": relaxed_accuracy(extract_short_answer(results[0]), _references(doc))}
