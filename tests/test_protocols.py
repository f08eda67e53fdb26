"""The `lmms` protocol reproduces lmms-eval's published task protocols.

tests/fixtures/lmms_scores.json holds, for ~30 hand-picked (doc, prediction) pairs per task, what lmms-eval's own
code returns (its ConfigurableTask.process_results and doc_to_text at the commit recorded in the fixture; lmms-eval
itself cannot be installed next to vlmlab's pinned stack). vlmlab's process_*_lmms hooks must give exactly the same
scores, and its task YAMLs, loaded by lm-eval, the same prompts and generation settings. See docs/protocols.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import TASK_DIR, task_hooks, task_yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "lmms_scores.json").read_text())
TASKS = ("vqa", "chartqa", "textvqa", "docvqa", "scienceqa")
# lmms-eval's metric names -> vlmlab's
METRICS = {
    "vqa": {"exact_match": "vqa_accuracy"},
    "textvqa": {"exact_match": "textvqa_accuracy"},
    "chartqa": {"relaxed_overall": "chartqa_relaxed_accuracy",
                "relaxed_human_split": "chartqa_relaxed_accuracy_human",
                "relaxed_augmented_split": "chartqa_relaxed_accuracy_augmented"},
    "docvqa": {"anls": "docvqa_anls"},
    "scienceqa": {"exact_match": "scienceqa_accuracy"},
}



def _yaml(task: str) -> dict:
    return task_yaml(task, "lmms")


def _cases():
    for task in TASKS:
        for i, item in enumerate(FIXTURE["tasks"][task]["items"]):
            yield pytest.param(task, item, id=f"{task}-{i}")


@pytest.mark.parametrize(("task", "item"), list(_cases()))
def test_scores_match_lmms_eval(task, item):
    """Per item, the same metrics with exactly the same values (including ChartQA's human/augmented split)."""
    expected = {METRICS[task][k]: v for k, v in item["lmms_result"].items() if k in METRICS[task]}
    hook = getattr(task_hooks(task), f"process_{task}_lmms")
    got = hook(dict(item["doc"]), [item["prediction"]])
    assert got == expected, (item["prediction"], item["doc"]["answers"])


def _reasoning_cases():
    for task in TASKS:
        for i, item in enumerate(FIXTURE["reasoning_items"]["tasks"][task]):
            yield pytest.param(task, item, id=f"{task}-{i}")


@pytest.mark.parametrize(("task", "item"), list(_reasoning_cases()))
def test_reasoning_blocks_are_cut_as_lmms_evals_cli_does(task, item):
    """lmms-eval's evaluator cuts <think>/<analysis> blocks out of a generation before the task scores it (its CLI's
    default --reasoning_tags): closed blocks, a pre-filled opening tag, an unclosed or upper-case tag left as is."""
    expected = {METRICS[task][k]: v for k, v in item["lmms_result"].items() if k in METRICS[task]}
    hook = getattr(task_hooks(task), f"process_{task}_lmms")
    assert hook(dict(item["doc"]), [item["prediction"]]) == expected, item["prediction"]


def test_reasoning_tags_follow_the_config():
    """eval.reasoning_tags: lmms-eval's pairs by default; [] scores the whole generation (lmms-eval's
    --reasoning_tags none); another list cuts those pairs only. A bad pair is refused by the schema."""
    import warnings

    from evals import hooks
    from runtime.config import load_config
    from runtime.errors import ConfigError

    with warnings.catch_warnings():  # a default the field's own type does not hold: pydantic warns on every dump
        warnings.simplefilter("error")
        cfg = load_config("tiny")
        cfg.model_dump(), cfg.model_dump(mode="json")
    assert [tuple(p) for p in cfg.eval.reasoning_tags] == list(hooks.REASONING_TAGS)
    assert load_config("tiny", ["eval.reasoning_tags=[]"]).eval.reasoning_tags == []
    for bad in ("[[a]]", "[['', b]]", "x"):
        with pytest.raises(ConfigError, match="eval.reasoning_tags"):
            load_config("tiny", [f"eval.reasoning_tags={bad}"])
    hook = task_hooks("scienceqa").process_scienceqa_lmms
    doc = {"question": "q", "answers": ["B"], "answer": "B", "subset": "all", "question_type": "all"}
    try:
        assert hook(dict(doc), ["<think>A?</think>B"]) == {"scienceqa_accuracy": 1.0}
        hooks.use_reasoning_tags([])
        assert hook(dict(doc), ["<think>A?</think>B"]) == {"scienceqa_accuracy": 0.0}
        hooks.use_reasoning_tags([("[r]", "[/r]")])
        assert hook(dict(doc), ["[r]A?[/r] B"]) == {"scienceqa_accuracy": 1.0}
        assert hook(dict(doc), ["<think>A?</think>B"]) == {"scienceqa_accuracy": 0.0}
    finally:
        hooks.use_reasoning_tags(hooks.REASONING_TAGS)


def test_fixture_is_the_followed_lmms_eval_commit():
    commit = FIXTURE["lmms_eval"]["commit"]
    assert len(commit) == 40
    for task in TASKS:
        assert commit in (TASK_DIR / task / "lmms.yaml").read_text(), task
        assert len(FIXTURE["tasks"][task]["items"]) >= 30
        results = FIXTURE["reasoning_items"]["tasks"][task]
        best = {max(v for k, v in r["lmms_result"].items() if k in METRICS[task]) for r in results}
        assert len(results) >= 15 and {0, 1} <= best  # tagged generations that score, and that do not
    assert commit in (ROOT / "docs" / "protocols.md").read_text()


def test_single_reference_vqa_is_exact_match():
    """Documented deviation: lmms-eval's leave-one-out VQA accuracy scores 0 with one reference answer (its datasets
    always have 10); vlmlab scores exact match after the same normalisation there."""
    case = FIXTURE["single_answer_vqa"]
    assert case["lmms_result"]["exact_match"] == 0
    doc = {"question": "What color?", "answers": ["red"], "answer": "red", "question_type": "all", "subset": "all"}
    vqa = task_hooks("vqa")
    assert vqa.process_vqa_lmms(doc, ["Red."]) == {"vqa_accuracy": 1.0}
    assert vqa.process_vqa_lmms(doc, ["blue"]) == {"vqa_accuracy": 0.0}


@pytest.mark.parametrize("task", TASKS)
def test_generation_settings_follow_lmms_eval(task):
    spec, lmms = _yaml(task), FIXTURE["tasks"][task]
    gen, lmms_gen = spec["generation_kwargs"], lmms["generation_kwargs"]
    assert spec["task"] == f"vlmlab_{task}_lmms"
    assert gen["do_sample"] is False and gen.get("temperature", 0) == 0
    assert lmms_gen.get("do_sample", False) is False and lmms_gen.get("temperature", 0) == 0
    if "max_new_tokens" in lmms_gen:
        assert gen["max_gen_toks"] == lmms_gen["max_new_tokens"]
    else:  # textvqa: lmms-eval leaves the cap to the model class; lm-eval's default here (docs/protocols.md)
        assert task == "textvqa" and gen["max_gen_toks"] == 256
    # lmms-eval's resolved stop list, plus the SmolVLM/Idefics3 EOS where lmms-eval's models stop too
    assert gen["until"] == [*lmms_gen["until"], "<end_of_utterance>"]
    post = lmms["prompt_kwargs"]["post_prompt"]
    assert spec["doc_to_text"].startswith("<image>") and spec["doc_to_text"].endswith(post)
    assert [m["metric"] for m in spec["metric_list"]][0] == next(iter(METRICS[task].values()))
    assert {m["metric"] for m in spec["metric_list"]} <= set(METRICS[task].values())


@pytest.fixture(scope="module")
def loaded_tasks(tmp_path_factory):
    """Every lmms YAML through lm-eval's TaskManager, as the eval stage runs them: a per-run YAML that includes the
    protocol file and points data_files at a canonical parquet (here: the fixture's docs, with a tiny image)."""
    from datasets import Dataset, Image
    from lm_eval.tasks import TaskManager
    from PIL import Image as PILImage

    base = tmp_path_factory.mktemp("lmms_tasks")
    picture = PILImage.new("RGB", (8, 8), (200, 30, 30))
    for task in TASKS:
        rows = [{**item["doc"], "image": picture} for item in FIXTURE["tasks"][task]["items"]]
        parquet = base / f"{task}.parquet"
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(parquet))
        spec = {"include": str(TASK_DIR / task / "lmms.yaml"), "task": f"vlmlab_{task}_lmms",
                "dataset_kwargs": {"data_files": {"test": str(parquet)}}}
        (base / f"vlmlab_{task}_lmms.yaml").write_text(yaml.safe_dump(spec))
    manager = TaskManager(include_path=str(base), include_defaults=False)
    return manager.load([f"vlmlab_{task}_lmms" for task in TASKS])["tasks"]


def test_yamls_index_in_task_manager():
    from lm_eval.tasks import TaskManager

    indexed = TaskManager(include_path=str(TASK_DIR), include_defaults=False).all_tasks
    assert {f"vlmlab_{task}_lmms" for task in TASKS} <= set(indexed)


@pytest.mark.parametrize("task", TASKS)
def test_prompt_is_lmms_evals(loaded_tasks, task):
    """doc_to_text on the canonical doc = "<image>" + lmms-eval's prompt for the same item in its own layout."""
    lm_task = loaded_tasks[f"vlmlab_{task}_lmms"]
    docs = list(lm_task.test_docs())
    items = FIXTURE["tasks"][task]["items"]
    assert len(docs) == len(items)
    for doc, item in zip(docs, items, strict=True):
        assert lm_task.doc_to_text(doc) == "<image>" + item["lmms_prompt"]
    first = lm_task.process_results(docs[0], [items[0]["prediction"]])
    assert first == {METRICS[task][k]: v for k, v in items[0]["lmms_result"].items() if k in METRICS[task]}
