"""TextVQA and DocVQA: each task's hub layout loads into canonical rows, its metric scores as published, and its
synthetic generator writes that layout deterministically.

The local copies are built here from generated images, in the published layouts (columns as on the dataset cards
of lmms-lab/textvqa and lmms-lab/DocVQA, config `DocVQA`), and go through the data stage's own hub loading path.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import task_hooks

from evals.metrics import anls, vqa_accuracy
from evals.registry import TASKS
from runtime.config import TaskDataConfig
from stages.data import check_overlap, task_splits
from stages.support import synthetic

# the hub's columns (dataset cards: lmms-lab/textvqa; lmms-lab/DocVQA, config DocVQA)
TEXTVQA_COLUMNS = {"image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
                   "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens"}
DOCVQA_COLUMNS = {"questionId", "question", "question_types", "image", "docId", "ucsf_document_id",
                  "ucsf_document_page_no", "answers", "data_split"}
DOCVQA_README = """---
configs:
- config_name: DocVQA
  data_files:
  - split: validation
    path: DocVQA/validation-*
  - split: test
    path: DocVQA/test-*
---
"""



def _write(rows: list[dict], path: Path) -> None:
    from datasets import Dataset, Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(path))


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory):
    """lmms-lab/textvqa (data/<split>-*.parquet) and lmms-lab/DocVQA (<config>/<split>-*.parquet), built from
    generated images with exactly the hub's columns."""
    root = tmp_path_factory.mktemp("hub")
    for split, offset in (("train", 0), ("validation", 1000)):
        rows = synthetic.generate("sign-textvqa", 12, 0, 64, offset)
        rows = [{k: v for k, v in r.items() if k in TEXTVQA_COLUMNS} for r in rows]
        rows[0]["answers"] = ["coca cola", "Coca-Cola", "coke", "coca cola", "coke", "coke", "coca cola", "cola",
                              "coca cola", "coke"]  # a real-looking item: a tie, the first of the tied wins
        _write(rows, root / "lmms-lab-textvqa" / "data" / f"{split}-00000-of-00001.parquet")
    docs = synthetic.generate("form-docvqa", 12, 0, 64, 1000)
    docs[0]["question_types"] = ["table/list", "layout"]  # real items often have several types
    docs[1]["answers"] = ["$ 4.50", "4.50"]
    for split in ("validation", "test"):
        _write(docs, root / "lmms-lab-DocVQA" / "DocVQA" / f"{split}-00000-of-00001.parquet")
    (root / "lmms-lab-DocVQA" / "README.md").write_text(DOCVQA_README)
    return root


@pytest.mark.parametrize(("generator", "columns", "extra"), [("sign-textvqa", TEXTVQA_COLUMNS, {"question_type"}),
                                                             ("form-docvqa", DOCVQA_COLUMNS, set())])
def test_generators_write_the_hub_layout(generator, columns, extra):
    rows = synthetic.generate(generator, 30, seed=3, image_size=64)
    assert all(set(r) == columns | extra for r in rows)
    again = synthetic.generate(generator, 30, seed=3, image_size=64)
    other = synthetic.generate(generator, 30, seed=4, image_size=64)
    assert [r["image"]["bytes"] for r in rows] == [r["image"]["bytes"] for r in again]  # deterministic per seed
    assert [r["image"]["bytes"] for r in rows] != [r["image"]["bytes"] for r in other]
    assert all(r["image"]["bytes"][:4] == b"\x89PNG" for r in rows)
    assert len({r["question"] for r in rows}) > 1


def test_sign_textvqa_rows():
    rows = synthetic.generate("sign-textvqa", 60, seed=0, image_size=64)
    task = TASKS["textvqa"]
    assert {r["question_type"] for r in rows} == set(task.question_types)
    for r in rows:
        word = r["ocr_tokens"][0]
        assert len(r["answers"]) == 10 and word in synthetic.SIGN_WORDS
        assert Counter(a.lower() for a in r["answers"]).most_common(1)[0][0] == word.lower()
    assert len({r["ocr_tokens"][0] for r in rows}) == len(synthetic.SIGN_WORDS)


def test_form_docvqa_rows():
    rows = synthetic.generate("form-docvqa", 60, seed=0, image_size=64)
    assert {r["question_types"][0] for r in rows} == set(TASKS["docvqa"].question_types)
    assert {r["question"] for r in rows} == {"who is the sender?", "who is the recipient?", "what is the total?"}
    for r in rows:
        if r["question"] == "what is the total?":
            assert r["answers"][0].isdigit()
        else:
            assert r["answers"][0] in synthetic.DOC_NAMES and r["answers"][1] == r["answers"][0].capitalize()


def test_textvqa_hub_copy_loads_into_canonical_rows(hub_copies, tmp_path):
    spec = TaskDataConfig(source=str(hub_copies / "lmms-lab-textvqa"), format="hub", test_split="validation",
                          train_size=12, test_size=10)
    splits = task_splits("textvqa", spec, 0, 64, tmp_path / "raw")
    assert len(splits["train"]) == 12 and len(splits["test"]) == 10  # test: streamed, only test_size rows
    assert check_overlap("textvqa", spec, splits) == 0
    first = splits["train"][0]
    assert first["answers"][:3] == ["coca cola", "Coca-Cola", "coke"] and first["answer"] == "coca cola"
    for row in splits["train"] + splits["test"]:
        folded = [a.lower() for a in row["answers"]]
        assert len(row["answers"]) == 10 and row["answer"].lower() == max(folded, key=folded.count)
        assert row["question_type"] == "all" and row["subset"] == "all"  # the hub layout has no question type
        assert row["question"].endswith("?") and row["image"]["bytes"][:4] == b"\x89PNG"


def test_docvqa_hub_copy_loads_into_canonical_rows(hub_copies, tmp_path):
    spec = TaskDataConfig(source=str(hub_copies / "lmms-lab-DocVQA"), format="hub", hub_config="DocVQA",
                          train_split="validation", test_split="test", test_size=10, allow_overlap=True)
    splits = task_splits("docvqa", spec, 0, 64, tmp_path / "raw")
    test = splits["test"]
    assert len(test) == 10 and len(splits["train"]) == 12
    assert test[0]["question_type"] == "table/list"  # the first of the item's question_types
    assert test[1]["answers"] == ["$ 4.50", "4.50"] and test[1]["answer"] == "$ 4.50"
    assert {r["question_type"] for r in test[2:]} <= {"form", "layout"}
    for row in test:
        assert row["question"] in {"who is the sender?", "who is the recipient?", "what is the total?"}
        assert row["answer"] == row["answers"][0] and row["subset"] == "all"


def test_synthetic_source_goes_through_the_same_layout(tmp_path):
    """The data stage writes the generators' rows in their hub layouts and reads them back like a local copy."""
    for kind in ("textvqa", "docvqa"):
        spec = TaskDataConfig(train_size=40, test_size=20)
        splits = task_splits(kind, spec, 0, 64, tmp_path / "raw")
        assert len(splits["train"]) == 40 and len(splits["test"]) == 20
        assert check_overlap(kind, spec, splits) == 0
        assert {r["question_type"] for r in splits["train"]} <= set(TASKS[kind].question_types)


def test_vqa_accuracy_over_ten_answers():
    answers = ["stop"] * 6 + ["STOP", "Stop", "stop", "open"]
    assert vqa_accuracy("Stop.", answers) == 1.0
    assert vqa_accuracy("open", answers) == pytest.approx(0.3)  # one annotator: 9 subsets at 1/3, one at 0
    assert vqa_accuracy("open", ["open", "open"] + ["stop"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("exit", answers) == 0.0


def test_anls_cases():
    assert anls("ANN", ["ANN", "Ann"]) == 1.0
    assert anls("  ann", ["ANN"]) == 1.0  # normalised: strip, lower case
    assert anls("BOB", ["ANN"]) == 0.0
    assert anls("JIMM", ["JIM"]) == pytest.approx(0.75)  # 1 - 1/4
    assert anls("42", ["47"]) == 0.5  # at the threshold: kept (lmms-eval's rule)
    assert anls("4", ["47"]) == 0.5
    assert anls("4", ["478"]) == 0.0  # below the threshold
    assert anls("MAX", ["ANN", "MAX"]) == 1.0  # the best answer counts


def test_short_protocol_hooks_score_with_the_tasks_metrics():
    textvqa, docvqa = task_hooks("textvqa"), task_hooks("docvqa")
    sign = {"answers": ["stop"] * 8 + ["STOP", "open"]}
    assert textvqa.process_textvqa(sign, ["The answer is STOP."]) == {"textvqa_accuracy": 1.0}
    assert textvqa.process_textvqa(sign, ["open"]) == {"textvqa_accuracy": pytest.approx(0.3)}
    doc = {"answers": ["JIM", "Jim"]}
    assert docvqa.process_docvqa(doc, ["jim."]) == {"docvqa_anls": 1.0}
    assert docvqa.process_docvqa(doc, ["JIMM"]) == {"docvqa_anls": pytest.approx(0.75)}
    assert docvqa.process_docvqa(doc, ["EVE"]) == {"docvqa_anls": 0.0}
    for kind in ("textvqa", "docvqa"):
        assert TASKS[kind].protocols() == ("short", "lmms")
        text = TASKS[kind].task_file("short").read_text()
        assert f"task: vlmlab_{kind}_short" in text and f"utils.process_{kind}\n" in text
        assert f"metric: {TASKS[kind].metric}\n" in text
