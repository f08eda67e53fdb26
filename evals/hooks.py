"""What the tasks' lm-eval hooks (``evals/tasks/<task>/utils.py``, loaded by path through `!function utils.<name>`)
share: the reference answers of a doc, and the prediction as lmms-eval scores it."""
from __future__ import annotations

from evals.registry import REASONING_TAGS


def references(doc: dict) -> list[str]:
    """Reference answers from the canonical view (`answers`), VQAv2 (`answers` dicts) or ChartQA (`label`)."""
    refs = doc.get("answers")
    if refs is None:
        refs = doc.get("label")
    if isinstance(refs, str):
        return [refs]
    return [r["answer"] if isinstance(r, dict) else str(r) for r in refs]


# The pairs the `lmms` hooks cut (eval.reasoning_tags). lm-eval calls a task's hooks with the doc and the generation
# only, so the scoring process sets them here (stages/eval.py score_shard) before lm-eval loads the tasks.
_active_tags: tuple[tuple[str, str], ...] = REASONING_TAGS


def use_reasoning_tags(tag_pairs) -> None:
    global _active_tags
    _active_tags = tuple((str(start), str(end)) for start, end in tag_pairs)


def strip_reasoning_tags(text: str, tag_pairs=None) -> str:
    """lmms-eval's ``strip_reasoning_tags``, rule for rule: every complete start...end block is cut (case-sensitive,
    pair by pair, in order); a closing tag left without its opening one (a chat template that pre-fills the opening
    tag) keeps only what follows the last closing tag; an opening tag never closed stays; then strip."""
    for start_tag, end_tag in _active_tags if tag_pairs is None else tag_pairs:
        while start_tag in text and end_tag in text:
            start = text.find(start_tag)
            end = text.find(end_tag, start)
            if end == -1:
                break
            text = text[:start] + text[end + len(end_tag):]
        if end_tag in text and start_tag not in text:
            text = text.rsplit(end_tag, 1)[-1]
    return text.strip()


def lmms_prediction(results: list[str]) -> str:
    """The generation as lmms-eval scores it: reasoning blocks cut (strip_reasoning_tags, as its CLI does by default),
    then stripped (ConfigurableTask.process_results; lm-eval does not strip, so each `lmms` hook does). No
    short-answer extraction: lmms-eval scores the whole remaining generation."""
    return strip_reasoning_tags(results[0]) if results[0] is not None else ""
