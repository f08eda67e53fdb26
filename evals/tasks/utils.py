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
    return {"chartqa_relaxed_accuracy": relaxed_accuracy(extract_short_answer(results[0]), _references(doc))}


# --- lmms protocol (lmms-eval's published task protocols; docs/protocols.md) -------------------------------------
# lmms-eval strips every generation (ConfigurableTask.process_results) before scoring it; lm-eval does not, so each
# hook strips first. No short-answer extraction: lmms-eval scores the raw (stripped) generation.

def _lmms_prediction(results: list[str]) -> str:
    return results[0].strip() if results[0] is not None else ""


def process_vqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval vqav2_val: EvalAI normalisation (punctuation, digits, articles), 10-answer VQA accuracy."""
    from evals.metrics import lmms_vqa_accuracy
    return {"vqa_accuracy": lmms_vqa_accuracy(_lmms_prediction(results), _references(doc))}


def process_textvqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval textvqa_val: the full EvalAI answer processor (lowercase, drop ',' '?'), 10-answer VQA accuracy."""
    from evals.metrics import lmms_vqa_accuracy
    return {"textvqa_accuracy": lmms_vqa_accuracy(_lmms_prediction(results), _references(doc), tokenize=True)}


def process_chartqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval chartqa: relaxed correctness (5 %) of the whole generation; the item also counts in its split
    (lmms-eval's relaxed_human_split / relaxed_augmented_split) when its `subset` is "human" / "augmented"."""
    from evals.metrics import lmms_relaxed_correctness
    pred = _lmms_prediction(results)
    score = 1.0 if any(lmms_relaxed_correctness(pred, ref) for ref in _references(doc)) else 0.0
    out = {"chartqa_relaxed_accuracy": score}
    if doc.get("subset") in ("human", "augmented"):
        out[f"chartqa_relaxed_accuracy_{doc['subset']}"] = score
    return out


def process_docvqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval docvqa_val: per-item ANLS (threshold 0.5) against all answers; the task metric is their mean."""
    from evals.metrics import anls
    return {"docvqa_anls": anls(_lmms_prediction(results), _references(doc))}


def process_scienceqa_lmms(doc: dict, results: list[str]) -> dict:
    """lmms-eval scienceqa_img: the option letter, or "X. ..." (LLaVA's rule); the option's text alone scores 0."""
    from evals.metrics import multiple_choice_accuracy
    return {"scienceqa_accuracy": multiple_choice_accuracy(_lmms_prediction(results), doc["answer"])}


# --- short protocol, tasks added with the registry (textvqa, docvqa) ---------------------------------------------

def process_textvqa(doc: dict, results: list[str]) -> dict:
    """`short`: the extracted short answer, VQA accuracy (official normalisation) over the 10 answers."""
    return {"textvqa_accuracy": vqa_accuracy(extract_short_answer(results[0]), _references(doc))}


def process_docvqa(doc: dict, results: list[str]) -> dict:
    """`short`: the extracted short answer, ANLS (threshold 0.5) against all the answers."""
    from evals.metrics import anls
    return {"docvqa_anls": anls(extract_short_answer(results[0]), _references(doc))}


# --- short protocol: scienceqa ------------------------------------------------------------------------------------

def process_scienceqa(doc: dict, results: list[str]) -> dict:
    """`short`: the extracted short answer is right when it is the option letter (any case, or "X. ...") or the
    correct option's text (``answers`` = [letter, option text])."""
    from evals.metrics import multiple_choice_accuracy
    refs = _references(doc)
    return {"scienceqa_accuracy": multiple_choice_accuracy(extract_short_answer(results[0]), doc["answer"],
                                                           refs[1] if len(refs) > 1 else None)}
