"""Data files with the right names and values of any type (#39): a task's parquet files and the official VQA and
ChartQA JSON layouts, each cell drawn by Hypothesis from values of every JSON/Arrow kind (and image cells from real,
broken and wrongly typed images), checked by `harness validate` (the same pre-flight `harness run` does). Each must exit
0 (the drawn file is usable) or 2 with one `error:` line naming the file; never 1, never a traceback, never a second
line (a library's own warning or progress bar). Seeded, Hypothesis's database off, no Ray: ~1 min in all."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import property_settings
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app

SETTINGS = property_settings(200)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=32) | \
    st.sampled_from(["", " ", "a", "what?", "12", "%", "human", "augmented"])
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["answer", "bytes", "path", "x"]), inner, max_size=2), max_leaves=5)
image_cells = st.sampled_from([{"bytes": PNG, "path": None}, {"bytes": b"not a png", "path": None}, PNG, b"",
                               "missing.png", {"bytes": None, "path": "missing.png"}]) | json_values


def _validate(tmp_path: Path, source: Path, task: str = "vqa") -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["validate", "tiny", f"data.tasks.{task}.source={source}"])
    lines = result.output.strip().splitlines()
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("ok: " if result.exit_code == 0 else "error: "), result.output
    if result.exit_code == 2:
        assert str(source) in lines[0] or "data.tasks" in lines[0], lines[0]  # names the file (or the key)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@SETTINGS
@given(image=image_cells, question=json_values, answers=json_values, qtype=json_values)
def test_any_parquet_cells_are_validated_in_one_line(tmp_path, monkeypatch, image, question, answers, qtype):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "pq"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    row = {"image": image, "question": question, "answers": answers, "question_type": qtype}
    try:
        table = pa.Table.from_pylist([row])
        pq.write_table(table, source / "train.parquet")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        table = pa.Table.from_pylist([{k: json.dumps(v, default=str) for k, v in row.items()}])  # Arrow refuses it
        pq.write_table(table, source / "train.parquet")
    shutil.copy(source / "train.parquet", source / "test.parquet")
    _validate(tmp_path, source)


@SETTINGS
@given(question_id=json_values, image_id=json_values, question=json_values, answers=json_values,
       imgname=json_values, label=json_values, layout=st.sampled_from(["vqa", "chartqa"]))
def test_any_json_fields_are_validated_in_one_line(tmp_path, monkeypatch, question_id, image_id, question, answers,
                                                   imgname, label, layout):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / layout
    shutil.rmtree(source, ignore_errors=True)
    if layout == "vqa":
        for split in ("train", "test"):
            (source / "vqa").mkdir(parents=True, exist_ok=True)
            (source / "vqa" / f"v2_questions_{split}.json").write_text(json.dumps(
                {"questions": [{"question_id": question_id, "image_id": image_id, "question": question}]}))
            (source / "vqa" / f"v2_annotations_{split}.json").write_text(json.dumps(
                {"annotations": [{"question_id": question_id, "answers": answers}]}))
        (source / "COCO__000000000001.jpg").write_bytes(PNG)  # image_id 1 finds its picture
    else:
        for split in ("train", "test"):
            (source / split / "png").mkdir(parents=True)
            (source / split / f"{split}_human.json").write_text(json.dumps(
                [{"imgname": imgname, "query": question, "label": label}]))
            (source / split / "png" / "a").write_bytes(PNG)  # imgname "a" finds its chart
    _validate(tmp_path, source, layout)
