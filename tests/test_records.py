"""Files vlmlab reads back (#39): a run's result.json, mutated every way Hypothesis finds (cut short, a value of
another type anywhere, a key dropped or added, another top level, bytes that are not UTF-8, a directory), read by every
command that reads it: `harness runs`, `gc` and `report` (`reproduce`'s bad files are test_bad_input's table: a
usable file would rerun for real); a stage's cache entry (its stage record) through the stage cache; a run's
config.yaml through `harness sync`. Each must exit 0 (the mutation left a usable
file) or 2 with one `error:` line naming the file; never 1, never a traceback, never a file created by a failure.
Seeded, Hypothesis's database off, no Ray, no server: a few seconds each."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import property_settings
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli import app
from runtime.config import load_config
from runtime.errors import UserError
from runtime.records import read_result, read_stage

RUN = "20261206-120000-sft-abc123"
SETTINGS = property_settings(200)


def _stage(name: str) -> dict:
    return {"name": name, "metrics": {f"{name}/steps": 4, f"{name}/train_loss": 1.5}, "wall_seconds": 12.5,
            "accelerator_hours": 0.01, "cost_usd": 0.0004, "device": "CPU", "devices": 2.0,
            "cost": {"cost/accelerator_hours": 0.01, "cost/usd": 0.0004, "cost/utilization": 0.5},
            "held": {"start": 10.0, "steps": 20.0, "generation": 0.0, "scoring": 0.0, "saving": 4.0, "idle": 2.0},
            "outputs": {"model_dir": f"runs/{RUN}/{name}/model"}, "key": "0" * 64}


def _eval_stage() -> dict:  # with a checkpoint scored while sft trained (eval.checkpoints=all): the report draws it
    return _stage("eval") | {"outputs": {"scored": ["base", "sft"], "checkpoints": [
        {"checkpoint": "sft-step2", "stage": "sft", "step": 2,
         "metrics": {"vqa_accuracy": 0.1, "mean_accuracy": 0.1}}]}}


VALID = {"schema_version": 2, "run_id": RUN, "pipeline": "sft", "config": load_config("tiny").model_dump(mode="json"),
         "metrics": {"eval/vqa_accuracy": 0.25, "eval/mean_accuracy": 0.3, "sft/steps": 4},
         "manifest": {"git": {"sha": "0" * 40}, "seed": 0}, "stages": [_stage("sft"), _eval_stage()],
         "cost_usd": 0.0004,
         "accelerator_hours": 0.01, "wall_seconds": 30.0, "reused_stages": [], "mlflow_run_id": None}

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


PATHS = [p for p in _paths(VALID) if p and not (len(p) > 2 and p[0] == "config")] + \
        [("config", "sft", "max_steps"), ("config", "tracking")]


def _set(doc, path, value=None, delete=False):
    doc = json.loads(json.dumps(doc))
    node = doc
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@st.composite
def mutated(draw, valid: dict = VALID, paths: list | None = None, dump=json.dumps) -> bytes:
    """The bytes of a file holding ``valid`` (written by ``dump``: result.json by default) after one hostile change at
    one of ``paths``."""
    paths = PATHS if paths is None else paths
    kind = draw(st.sampled_from(["retype", "drop", "add", "cut", "top", "bytes"]))
    text = dump(valid)
    if kind == "retype":
        return dump(_set(valid, draw(st.sampled_from(paths)), draw(json_values))).encode()
    if kind == "drop":
        return dump(_set(valid, draw(st.sampled_from(paths)), delete=True)).encode()
    if kind == "add":
        path = draw(st.sampled_from([p for p in paths if isinstance(_get(valid, p), dict)] or [()]))
        return dump(_set(valid, (*path, draw(st.text(min_size=1, max_size=6))), draw(json_values))).encode()
    if kind == "cut":
        return text[:draw(st.integers(0, len(text) - 1))].encode()
    if kind == "top":
        return dump(draw(json_values)).encode()
    return draw(st.binary(max_size=64))


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-store.db'}")  # none made: nothing to read
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where an internal error's log would go
    run = tmp_path / "runs" / RUN
    (run / "sft").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    return run


def _check(argv: list[str], run: Path, body: bytes, allow_created: tuple[str, ...] = ()) -> None:
    (run / "result.json").write_bytes(body)
    root = run.parent.parent
    before = set(root.rglob("*"))
    out = CliRunner().invoke(app, argv)
    lines = out.output.strip().splitlines()
    assert out.exit_code in (0, 2), (out.exit_code, out.output[-2000:], body[:300])
    assert "Traceback" not in out.output
    before = {p for p in before if "state" not in p.relative_to(root).parts}
    if out.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: ") and "result.json" in lines[0], out.output
        assert set(root.rglob("*")) == before, "a failure created files"
    else:
        assert all(any(part in allow_created for part in p.relative_to(root).parts) for p in set(root.rglob("*"))
                   - before), "created something"  # an internal error's log (under state/) would be one


@SETTINGS
@given(body=mutated())
def test_the_reader_returns_a_result_or_one_user_error(tmp_path, body):
    path = tmp_path / "result.json"
    path.write_bytes(body)
    try:
        result = read_result(path)
    except UserError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        return
    assert isinstance(result["metrics"], dict) and all(isinstance(v, float) for v in result["metrics"].values())
    assert all(isinstance(s["name"], str) for s in result.get("stages", []))
    stage = tmp_path / "stage.json"  # each of its stages is a stage record
    for record in result.get("stages", []):
        stage.write_text(json.dumps(record))
        assert read_stage(stage)["name"] == record["name"]


@SETTINGS
@given(body=mutated())
def test_runs_lists_or_names_the_bad_file(runs_dir, body):
    _check(["runs"], runs_dir, body)


@SETTINGS
@given(body=mutated())
def test_gc_plans_or_names_the_bad_file_before_deleting_anything(runs_dir, body):
    _check(["gc", "--apply"], runs_dir, body)
    assert runs_dir.exists()


@property_settings(60)  # a usable file draws six figures (~1 s)
@given(body=mutated())
def test_report_draws_or_names_the_bad_file(runs_dir, body):
    _check(["report", RUN], runs_dir, body, allow_created=("report",))
    shutil.rmtree(runs_dir / "report", ignore_errors=True)


def test_a_directory_or_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "result.json").mkdir()
    with pytest.raises(UserError, match="a directory, not a result file"):
        read_result(tmp_path / "result.json")
    if os.geteuid() != 0:  # root reads anything
        secret = tmp_path / "other.json"
        secret.write_text("{}")
        secret.chmod(0)
        with pytest.raises(UserError, match="cannot be read"):
            read_result(secret)


ENTRY = {"key": "1" * 64, "stage_dir": "runs/x/sft", "record": _stage("sft"), "outputs": {"model_dir": "runs/x/m"},
         "files": {}}


@SETTINGS
@given(body=mutated(ENTRY, [p for p in _paths(ENTRY) if p]))
def test_a_damaged_cache_entry_is_reported_and_recomputed(tmp_path, body):
    """A stage's cache entry (its stage record, outputs and file digests) read back: the entry as written, or a miss
    with one warning naming the file (the stage is recomputed); never an exception."""
    from harness.cache import StageCache

    warnings: list[str] = []
    cache = StageCache(tmp_path, warn=warnings.append)
    path = cache._entry_path("sft", ENTRY["key"])  # where store() puts it
    path.write_bytes(body)
    entry = cache.lookup("sft", ENTRY["key"])
    if entry is None:
        assert len(warnings) == 1 and path.name in warnings[0] and "\n" not in warnings[0], warnings
        assert not path.exists()  # deleted: the recomputed stage writes a new one
    else:
        assert entry["key"] == ENTRY["key"] and isinstance(entry["record"]["name"], str) and not warnings


CONFIG = load_config("tiny").model_dump(mode="json")


def _yaml(doc) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


@SETTINGS
@given(body=mutated(CONFIG, [p for p in _paths(CONFIG) if p and len(p) <= 2], dump=_yaml))
def test_sync_reads_the_run_config_or_names_it(runs_dir, monkeypatch, body):
    """A run's config.yaml read back by `harness sync` (where it finds the run's tracking store): exit 0 or 2 with one
    line, never 1, never a traceback, nothing created by a failure."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    (runs_dir / "config.yaml").write_bytes(body)
    (runs_dir / "mlflow_outbox.jsonl").write_text('{"op": "set_terminated", "run_id": "r", "status": "KILLED"}\n')
    root = runs_dir.parent.parent
    before = set(root.rglob("*"))
    out = CliRunner().invoke(app, ["sync", str(runs_dir)])
    lines = out.output.strip().splitlines()
    assert out.exit_code in (0, 2) and "Traceback" not in out.output, (out.exit_code, out.output[-2000:], body[:300])
    assert len(lines) == 1, out.output
    if out.exit_code == 2:
        assert lines[0].startswith("error: ") and set(root.rglob("*")) == before, out.output


def test_scored_checkpoints_are_billed_and_a_bad_or_missing_one_is_said(tmp_path):
    """eval.checkpoints=all: after training, each checkpoint's scores (score_checkpoint's file) bill the time its
    shards ran before the final model's handover as a hold beside the training's (after it, the training's own hold
    covers them); a damaged file (cut short, a phase no worker reports) and a step without one are each a warning."""
    from runtime.cost import Meter
    from stages.eval import bill_scored_checkpoints

    scores = tmp_path / "checkpoint_scores"
    scores.mkdir()
    shard = {"node_id": "n1", "device": "CPU", "began": 1010.0, "ended": 1030.0, "phases": {"generation": 15.0},
             "items": 1, "generated": 1}
    item = {"task": "vqa", "doc_id": 0, "question_type": "count", "subset": "all", "prediction": "2", "score": 1.0}
    record = {"stage": "sft", "step": 2, "settings": {}, "began": 1008.0, "ended": 1030.0, "items": [item],
              "metrics": {"mean_accuracy": 0.25}, "shards": [shard]}
    (scores / "step-0000002.json").write_text(json.dumps(record))
    (scores / "step-0000004.json").write_text('{"stage": "sft", "step": "four"')  # cut short
    (scores / "step-0000006.json").write_text(json.dumps(record | {"step": 6, "shards": [
        shard | {"phases": {"idle": 3.0}}]}))
    meter, said = Meter(devices=1.0, held_seconds=100.0, hold_began=1000.0), []
    found = bill_scored_checkpoints("sft", tmp_path, meter, 1.0, 1015.0, 1020.0, [2, 4, 6, 8], said.append)
    assert [(f["step"], f["began_s"], f["ended_s"], f["training_ended_s"]) for f in found] == [(2, 8.0, 30.0, 15.0)]
    assert meter.held_seconds == 110.0  # the training's 100 s and the shard's 10 s before the handover
    assert meter.spent == {"start": 0.0, "generation": 15.0}
    assert said[0].startswith(f"warning: {scores / 'step-0000004.json'}: not valid JSON")
    assert said[1].startswith(f"warning: {scores / 'step-0000006.json'}: not a vlmlab checkpoint score "
                              "(shards.0.phases")
    assert said[2] == "sft: scored 1 checkpoint(s) while training (mean accuracy step 2: 0.250)"
    assert said[3].startswith("warning: sft's checkpoint(s) of step(s) 4, 6, 8 were not scored")
