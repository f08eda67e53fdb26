"""Presets load: local copies of each preset's hub datasets, in their published layouts (lmms-lab's parquet eval
sets, HuggingFaceM4/the_cauldron's training subsets), go through the data stage's own loading path (the `hub`
format, streamed when only `test_size` rows are needed) into canonical rows; and the overlap check stops a run whose
test items also occur in its training split."""
from __future__ import annotations

import pytest

from evals.registry import TASKS
from runtime.config import load_config
from runtime.errors import DataError
from stages.data import check_overlap, item_key, task_splits
from stages.support import synthetic

CAULDRON_README = """---
configs:
- config_name: vqav2
  data_files:
  - split: train
    path: vqav2/train-*
- config_name: chartqa
  data_files:
  - split: train
    path: chartqa/train-*
---
"""


def _write(rows: list[dict], path, image_columns=("image",)):
    from datasets import Dataset, Image, List

    ds = Dataset.from_list(rows)
    for col in image_columns:
        ds = ds.cast_column(col, List(Image()) if col == "images" else Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory):
    """Local copies of lmms-lab/VQAv2, lmms-lab/ChartQA and the_cauldron (vqav2, chartqa subsets), their columns as
    on the dataset cards, built from generated images."""
    root = tmp_path_factory.mktemp("hub")
    shapes = synthetic.generate("shapes-vqa", 24, 0, 32)  # the VQAv2 column layout already
    _write(shapes[:12], root / "lmms-lab-VQAv2" / "data" / "validation-00000-of-00001.parquet")
    charts = synthetic.generate("bar-chartqa", 24, 0, 32)
    lmms_charts = [{"type": "human_test" if i % 2 else "augmented_test", "question": r["query"],
                    "answer": r["label"][0], "image": r["image"]} for i, r in enumerate(charts[:12])]
    _write(lmms_charts, root / "lmms-lab-ChartQA" / "data" / "test-00000-of-00001.parquet")
    cauldron = root / "the_cauldron"
    for name, rows, question, answer in (("vqav2", shapes[12:], "question", "multiple_choice_answer"),
                                         ("chartqa", charts[12:], "query", "label")):
        pairs = [rows[i:i + 2] for i in range(0, len(rows), 2)]  # two questions on one image, as the_cauldron has
        _write([{"images": [pair[0]["image"]],
                 "texts": [{"user": r[question], "assistant": r[answer][0] if isinstance(r[answer], list)
                            else r[answer], "source": name} for r in pair]} for pair in pairs],
               cauldron / name / "train-00000-of-00001.parquet", image_columns=("images",))
    (cauldron / "README.md").write_text(CAULDRON_README)
    return root


def test_t4_preset_loads_through_the_hub_path(hub_copies, tmp_path):
    local = {"lmms-lab/VQAv2": hub_copies / "lmms-lab-VQAv2", "lmms-lab/ChartQA": hub_copies / "lmms-lab-ChartQA",
             "HuggingFaceM4/the_cauldron": hub_copies / "the_cauldron"}
    preset = load_config("smolvlm-256m-t4")
    overrides = []
    for kind, spec in preset.data.tasks.items():
        overrides += [f"data.tasks.{kind}.source={local[spec.source]}", f"data.tasks.{kind}.test_size=10",
                      f"data.tasks.{kind}.train_from.source={local[spec.train_from.source]}",
                      f"data.tasks.{kind}.train_size=11"]
    cfg = load_config("smolvlm-256m-t4", overrides)
    assert cfg.eval.protocol == "lmms" and all(spec.format == "hub" for spec in cfg.data.tasks.values())
    for kind, spec in cfg.data.tasks.items():
        splits = task_splits(kind, spec, cfg.seed, cfg.data.image_size, tmp_path / "raw")
        assert len(splits["test"]) == 10  # streamed: only test_size rows read
        assert len(splits["train"]) == 11  # the_cauldron: one row per question turn
        assert check_overlap(kind, spec, splits) == 0
        for row in splits["test"] + splits["train"]:
            assert row["question"] and row["answers"] and row["image"]["bytes"][:4] == b"\x89PNG"
    vqa_test = task_splits("vqa", cfg.data.tasks["vqa"], 0, 32, tmp_path / "raw")["test"]
    assert all(len(r["answers"]) == 10 for r in vqa_test)  # VQAv2's ten human answers
    charts = task_splits("chartqa", cfg.data.tasks["chartqa"], 0, 32, tmp_path / "raw")["test"]
    assert [r["subset"] for r in charts[:4]] == ["augmented", "human", "augmented", "human"]


def test_a_layout_without_a_required_column_is_named(hub_copies):
    cfg = load_config("smolvlm-256m-t4", [f"data.tasks.chartqa.source={hub_copies / 'lmms-lab-VQAv2'}",
                                          f"data.tasks.chartqa.train_from.source={hub_copies / 'the_cauldron'}",
                                          "data.tasks.chartqa.test_split=validation", "data.tasks.vqa=null"])
    with pytest.raises(DataError, match=r"task 'chartqa' needs column 'query' \(for 'question'.*remap with "
                                        r"data.tasks.chartqa.columns"):
        task_splits("chartqa", cfg.data.tasks["chartqa"], 0, 32, hub_copies / "raw")


def test_overlapping_test_items_stop_the_run(tmp_path):
    """The same real split as train and test: every test item is a training item."""
    from datasets import Dataset, Image

    rows = synthetic.generate("shapes-vqa", 20, 3, 32)
    (tmp_path / "src").mkdir()
    for split in ("train", "test"):
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(tmp_path / "src" / f"{split}.parquet"))
    cfg = load_config(None, [f"data.tasks.vqa.source={tmp_path / 'src'}", "data.tasks.chartqa=null",
                             "data.tasks.vqa.train_size=20", "data.tasks.vqa.test_size=20"])
    spec = cfg.data.tasks["vqa"]
    splits = task_splits("vqa", spec, 0, 32, tmp_path / "raw")
    with pytest.raises(DataError, match=r"data.tasks.vqa: 20 of 20 test items also occur in the training split.*"
                                        r"allow_overlap=true"):
        check_overlap("vqa", spec, splits)
    allowed = spec.model_copy(update={"allow_overlap": True})
    assert check_overlap("vqa", allowed, splits) == 20


def test_synthetic_test_items_never_repeat_a_training_item(tmp_path):
    """Small generated charts repeat by chance; the generator's test split skips those."""
    cfg = load_config(None, ["data.tasks.vqa=null", "data.tasks.chartqa.train_size=3000",
                             "data.tasks.chartqa.test_size=300", "data.image_size=32"])
    splits = task_splits("chartqa", cfg.data.tasks["chartqa"], 0, 32, tmp_path / "raw")
    assert len(splits["test"]) == 300 and check_overlap("chartqa", cfg.data.tasks["chartqa"], splits) == 0
    assert len({item_key(r) for r in splits["train"]}) < 3000  # repeats within train exist: the check is not idle


def test_every_registered_task_declares_what_the_harness_reads():
    for name, task in TASKS.items():
        assert task.name == name and task.metric and task.protocols() and "short" in task.protocols()
        assert task.generator in synthetic.GENERATORS
        assert {"image", "question", "answers"} <= set(task.columns)
