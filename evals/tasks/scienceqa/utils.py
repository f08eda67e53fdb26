"""ScienceQA-IMG's lm-eval hooks: multiple choice, the option's letter (`short` also takes the option's text) or,
under `lmms`, lmms-eval's scienceqa_img rule (docs/protocols.md)."""
from evals.hooks import lmms_prediction, references
from evals.metrics import extract_short_answer, multiple_choice_accuracy


def process_scienceqa(doc: dict, results: list[str]) -> dict:
    """`short`: the extracted short answer is right when it is the option letter (any case, or "X. ...") or the
    correct option's text (``answers`` = [letter, option text])."""
    refs = references(doc)
    return {"scienceqa_accuracy": multiple_choice_accuracy(extract_short_answer(results[0]), doc["answer"],
                                                           refs[1] if len(refs) > 1 else None)}


def process_scienceqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval scienceqa_img: the option letter, or "X. ..." (LLaVA's rule); the option's text alone scores 0."""
    return {"scienceqa_accuracy": multiple_choice_accuracy(lmms_prediction(results), doc["answer"])}
