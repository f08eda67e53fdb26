"""ScienceQA: lmms-lab/ScienceQA's multiple-choice layout loads into canonical rows whose question is lmms-eval's
prompt (before its post_prompt), both protocols score the letter (and `short` the option's text too), and the
`diagram-scienceqa` generator writes that layout deterministically, its answer letters uniformly spread.

The local copy is built here from generated images, with the columns and dtypes of the dataset card of
lmms-lab/ScienceQA (config `ScienceQA-IMG`), and goes through the data stage's own hub loading path.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import task_hooks

from evals.registry import TASKS
from runtime.config import TaskDataConfig
from runtime.errors import DataError
from stages.data import check_overlap, task_splits
from stages.support import synthetic

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "lmms_scores.json").read_text())["tasks"]["scienceqa"]
POST_PROMPT = FIXTURE["prompt_kwargs"]["post_prompt"]
# the hub's columns (dataset card of lmms-lab/ScienceQA, config ScienceQA-IMG)
COLUMNS = ("image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
           "skill", "lecture", "solution")
README = """---
configs:
- config_name: ScienceQA-IMG
  data_files:
  - split: train
    path: ScienceQA-IMG/train-*
  - split: validation
    path: ScienceQA-IMG/validation-*
  - split: test
    path: ScienceQA-IMG/test-*
---
"""



def _write(rows: list[dict], path: Path) -> None:
    """Rows in the hub's column order and dtypes (answer: int8, choices: a list of strings)."""
    from datasets import Dataset, Features, Image, List, Value

    features = Features({name: Image() if name == "image" else List(Value("string")) if name == "choices"
                         else Value("int8") if name == "answer" else Value("string") for name in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list([{name: r[name] for name in COLUMNS} for r in rows], features=features).to_parquet(str(path))


def _fixture_rows() -> list[dict]:
    """The distinct lmms-eval docs of the protocol fixture (2-5 choices, with and without a hint), as hub rows."""
    docs = list({json.dumps(i["lmms_doc"], sort_keys=True): i for i in FIXTURE["items"]}.values())
    images = synthetic.generate("diagram-scienceqa", len(docs), 9, 32)
    return [{**image_row, **item["lmms_doc"], "expected_prompt": item["lmms_prompt"], "expected": item["doc"]}
            for image_row, item in zip(images, docs, strict=True)]


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory):
    """lmms-lab/ScienceQA (<config>/<split>-*.parquet): the fixture's docs first in the test split, then generated
    rows; train and validation generated."""
    root = tmp_path_factory.mktemp("hub") / "lmms-lab-ScienceQA"
    fixture_rows = _fixture_rows()
    for split, offset in (("train", 0), ("validation", 1000), ("test", 2000)):
        rows = synthetic.generate("diagram-scienceqa", 12, 0, 32, offset)
        if split == "test":
            rows = fixture_rows + rows
        _write(rows, root / "ScienceQA-IMG" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(README)
    return root, fixture_rows


def test_hub_copy_loads_into_canonical_rows(hub_copy, tmp_path):
    root, fixture_rows = hub_copy
    spec = TaskDataConfig(source=str(root), format="hub", hub_config="ScienceQA-IMG", train_size=12, test_size=10)
    splits = task_splits("scienceqa", spec, 0, 32, tmp_path / "raw")
    assert len(splits["train"]) == 12 and len(splits["test"]) == 10  # test: streamed, only test_size rows
    assert check_overlap("scienceqa", spec, splits) == 0
    for row, source in zip(splits["test"], fixture_rows, strict=False):
        # the canonical question is lmms-eval's own prompt for the same doc, less its post_prompt
        assert row["question"] + POST_PROMPT == source["expected_prompt"]
        assert row["answers"] == source["expected"]["answers"] and row["answer"] == source["expected"]["answer"]
        assert row["question_type"] == source["topic"]  # the item's topic (`columns.question_type` remaps it)
    magnet = next(r for r in splits["test"] if "magnets" in r["question"])
    assert magnet["question"] == ("Context: The picture shows a magnet.\nWill these magnets attract or repel?\n"
                                  "A. attract\nB. repel")  # a hint: its Context line first
    whale = next(r for r in splits["test"] if "mammal" in r["question"])
    assert whale["question"] == "Which animal is a mammal?\nA. frog\nB. shark\nC. whale"
    assert whale["answers"] == ["C", "whale"] and whale["answer"] == "C"
    for row in splits["train"]:  # generated rows: the lettered options, the letter and its option's text
        lines = row["question"].split("\n")
        options = [line for line in lines if line[:1].isupper() and line[1:3] == ". "]
        letter, text = row["answers"]
        assert row["answer"] == letter and f"{letter}. {text}" in options
        assert [o[0] for o in options] == [chr(ord("A") + i) for i in range(len(options))]
        assert 2 <= len(options) <= 5 and row["question_type"] in TASKS["scienceqa"].question_types
        assert row["image"]["bytes"][:4] == b"\x89PNG" and row["subset"] == "all"


def test_answer_index_out_of_range_names_the_row(tmp_path):
    rows = synthetic.generate("diagram-scienceqa", 6, 1, 32)
    rows[3] = {**rows[3], "choices": ["red", "blue", "green"], "answer": 5}
    for split in ("train", "test"):
        _write(rows, tmp_path / "src" / f"{split}.parquet")
    spec = TaskDataConfig(source=str(tmp_path / "src"), allow_overlap=True)
    with pytest.raises(DataError, match=r"train\.parquet row 3: not a ScienceQA row \(IndexError: answer index 5 "
                                        r"is out of range for 3 choices\); fix or drop that row"):
        task_splits("scienceqa", spec, 0, 32, tmp_path / "raw")
    rows[3] = {**rows[3], "answer": -1}  # not Python's "last option"
    _write(rows, tmp_path / "src" / "train.parquet")
    with pytest.raises(DataError, match=r"row 3: .*answer index -1 is out of range"):
        task_splits("scienceqa", spec, 0, 32, tmp_path / "raw")


def test_a_source_without_choices_is_named(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "choices"} for r in synthetic.generate("diagram-scienceqa", 4, 0, 32)]
    from datasets import Dataset, Image

    for split in ("train", "test"):
        (tmp_path / "src").mkdir(exist_ok=True)
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(tmp_path / "src" / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"task 'scienceqa' needs column 'choices' \(for 'answers'"):
        task_splits("scienceqa", TaskDataConfig(source=str(tmp_path / "src")), 0, 32, tmp_path / "raw")


def test_scoring_accepts_the_letter_and_under_short_the_text():
    utils = task_hooks("scienceqa")
    doc = {"question": "Which color is the arrow?\nA. red\nB. blue", "answers": ["B", "blue"], "answer": "B"}
    for prediction, short, lmms in (("B", 1.0, 1.0), ("b", 1.0, 1.0), ("B. blue", 1.0, 1.0), ("B.", 1.0, 1.0),
                                    ("blue", 1.0, 0.0), ("Blue.", 1.0, 0.0), ("The answer is B.", 1.0, 0.0),
                                    ("A", 0.0, 0.0), ("A. blue", 0.0, 0.0), ("red", 0.0, 0.0), ("(B)", 0.0, 0.0),
                                    ("B\nA", 1.0, 0.0)):
        assert utils.process_scienceqa(doc, [prediction]) == {"scienceqa_accuracy": short}, prediction
        assert utils.process_scienceqa_lmms(doc, [prediction]) == {"scienceqa_accuracy": lmms}, prediction
    score = TASKS["scienceqa"].score  # the question-only prior and the GRPO accuracy reward
    assert score("B", ["B", "blue"]) == score("blue", ["B", "blue"]) == 1.0
    assert score("A", ["B", "blue"]) == score("", ["B", "blue"]) == 0.0
    assert score("B", ["B"]) == 1.0  # the reward passes the letter alone


def test_short_protocol_file():
    task = TASKS["scienceqa"]
    assert task.protocols() == ("short", "lmms")
    text = task.task_file("short").read_text()
    assert "task: vlmlab_scienceqa_short" in text and "utils.process_scienceqa\n" in text
    assert 'doc_to_text: "<image>{{question}}"' in text and f"metric: {task.metric}\n" in text


def test_generator_writes_the_hub_layout_deterministically():
    rows = synthetic.generate("diagram-scienceqa", 40, seed=3, image_size=64)
    assert all(tuple(r) == COLUMNS for r in rows)
    again = synthetic.generate("diagram-scienceqa", 40, seed=3, image_size=64)
    other = synthetic.generate("diagram-scienceqa", 40, seed=4, image_size=64)
    assert [r["image"]["bytes"] for r in rows] == [r["image"]["bytes"] for r in again]  # deterministic per seed
    assert [{k: v for k, v in r.items() if k != "image"} for r in rows] == \
           [{k: v for k, v in r.items() if k != "image"} for r in again]
    assert [r["image"]["bytes"] for r in rows] != [r["image"]["bytes"] for r in other]
    assert all(r["image"]["bytes"][:4] == b"\x89PNG" for r in rows)


def test_generator_answers_are_consistent_and_letters_uniform():
    rows = synthetic.generate("diagram-scienceqa", 1500, seed=0, image_size=32)
    assert {r["topic"] for r in rows} == set(TASKS["scienceqa"].question_types)
    assert {len(r["choices"]) for r in rows} == {2, 3, 4, 5}
    assert not any(r["hint"] for r in rows)  # the embedded prompts stay short; hub rows' hints: test above
    # each question lists its options in one fixed order: the letter means the same thing every time
    assert all(r["choices"] == list(synthetic.DIAGRAM_QUESTIONS[r["topic"]][1]) for r in rows)
    for r in rows:
        assert 0 <= r["answer"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"])
        assert r["choices"][r["answer"]] in r["solution"]  # "The arrow is red." / "The circle is the largest shape."
    # given the number of options, every position is equally likely to be the answer
    for k in (2, 3, 4, 5):
        positions = Counter(r["answer"] for r in rows if len(r["choices"]) == k)
        n = sum(positions.values())
        assert set(positions) == set(range(k)) and max(positions.values()) / n < 1 / k + 0.1, (k, positions)


def test_synthetic_source_goes_through_the_same_layout(tmp_path):
    """The data stage writes the generator's rows in the hub layout and reads them back through the adapter."""
    spec = TaskDataConfig(train_size=40, test_size=20)
    splits = task_splits("scienceqa", spec, 0, 32, tmp_path / "raw")
    assert len(splits["train"]) == 40 and len(splits["test"]) == 20
    assert check_overlap("scienceqa", spec, splits) == 0
    assert {r["question_type"] for r in splits["train"]} <= set(TASKS["scienceqa"].question_types)
    assert all(r["answer"] in "ABCDE" and r["answers"][0] == r["answer"] for r in splits["train"])


def test_short_yaml_loads_in_lm_eval(tmp_path):
    """As the eval stage runs it: a per-run YAML that includes scienceqa/short.yaml and points data_files at a
    canonical parquet; the prompt is `<image>` + the canonical question, the hook scores letter and text."""
    import yaml
    from datasets import Dataset, Image
    from lm_eval.tasks import TaskManager
    from PIL import Image as PILImage

    rows = [{**item["doc"], "image": PILImage.new("RGB", (8, 8), (200, 30, 30))} for item in FIXTURE["items"][:3]]
    parquet = tmp_path / "test.parquet"
    Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(parquet))
    task = TASKS["scienceqa"]
    spec = {"include": str(task.task_file("short")), "task": task.lm_eval_name("short"),
            "dataset_kwargs": {"data_files": {"test": str(parquet)}}}
    (tmp_path / f"{task.lm_eval_name('short')}.yaml").write_text(yaml.safe_dump(spec))
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load([task.lm_eval_name("short")])
    lm_task = loaded["tasks"][task.lm_eval_name("short")]
    doc = next(iter(lm_task.test_docs()))
    assert lm_task.doc_to_text(doc) == "<image>Which color is the sky?\nA. blue\nB. green"
    assert lm_task.process_results(doc, ["A"]) == lm_task.process_results(doc, ["blue"]) == {"scienceqa_accuracy": 1.0}
    assert lm_task.process_results(doc, ["green"]) == {"scienceqa_accuracy": 0.0}
