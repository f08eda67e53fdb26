"""What the tasks' lm-eval hooks (``evals/tasks/<task>/utils.py``, loaded by path through `!function utils.<name>`)
share: the reference answers of a doc, and the prediction as lmms-eval scores it."""
from __future__ import annotations


def references(doc: dict) -> list[str]:
    """Reference answers from the canonical view (`answers`), VQAv2 (`answers` dicts) or ChartQA (`label`)."""
    refs = doc.get("answers")
    if refs is None:
        refs = doc.get("label")
    if isinstance(refs, str):
        return [refs]
    return [r["answer"] if isinstance(r, dict) else str(r) for r in refs]


def lmms_prediction(results: list[str]) -> str:
    """lmms-eval strips every generation (ConfigurableTask.process_results) before scoring it; lm-eval does not, so
    each `lmms` hook strips first. No short-answer extraction: lmms-eval scores the raw (stripped) generation."""
    return results[0].strip() if results[0] is not None else ""
