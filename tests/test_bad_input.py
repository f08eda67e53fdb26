"""Hostile and broken input, table-driven, through the real CLI (in-process): config files, overrides, data files,
result.json files for `harness reproduce`, command-line arguments. Every case must exit 2 with one line that names
the problem and the fix, before any work: no run directory, no MLflow store, no result.json, no user code run."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from evals.registry import TASKS
from harness.cli import app
from runtime.config import load_config


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('user code ran')\ndef reward(c, **_): ...\n"


def _vqa(questions: bytes | str, annotations: str = '{"annotations": []}') -> dict:
    return {"vqa/v2_questions_train.json": questions, "vqa/v2_annotations_train.json": annotations,
            "vqa/v2_questions_test.json": questions, "vqa/v2_annotations_test.json": annotations}


def _result(**config_changes) -> str:
    """A well-formed result.json whose recorded config has ``config_changes`` (dotted keys) applied."""
    config = load_config("tiny").model_dump(mode="json")
    for dotted, value in config_changes.items():
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    return json.dumps({"run_id": "r", "pipeline": "sft", "config": config, "metrics": {}, "manifest": {}})


def _hf_disk_train_only(root):
    from datasets import Dataset, DatasetDict

    row = {"image": {"bytes": PNG, "path": None}, "question": "q?", "answers": ["a"]}
    DatasetDict({"train": Dataset.from_list([row])}).save_to_disk(str(root / "disk"))


def _parquet(root, rows, splits=("train", "test")):
    from datasets import Dataset

    (root / "pq").mkdir()
    for split in splits:
        Dataset.from_list(rows).to_parquet(str(root / "pq" / f"{split}.parquet"))


RUN = ["run", "sft"]
VQA_DIR = "data.tasks.vqa.source={d}/vqa"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

# id, argv ({d}: the case's directory), files to create there, problem named, fix named
CASES = [
    # config files
    ("config-not-utf8", [*RUN, "-c", "{d}/c.yaml"], {"c.yaml": "seed: 1 # caf\xe9\n".encode("latin-1")},
     "not UTF-8 text (byte 13", "save the file as UTF-8"),
    ("config-duplicate-key", [*RUN, "-c", "{d}/c.yaml"], {"c.yaml": "seed: 1\nsft: {max_steps: 3}\nseed: 2\n"},
     "duplicate key 'seed' at line 3", "fix it there"),
    ("config-bad-yaml", [*RUN, "-c", "{d}/c.yaml"], {"c.yaml": "seed: [1\n"}, "not valid YAML", "fix it there"),
    ("config-python-tag", [*RUN, "-c", "{d}/c.yaml"], {"c.yaml": "seed: !!python/object/apply:os.system [id]\n"},
     "not valid YAML: could not determine a constructor", "fix it there"),
    ("config-top-level-list", [*RUN, "-c", "{d}/c.yaml"], {"c.yaml": "[1, 2]\n"},
     "top level must be a mapping", "seed: 0"),
    ("config-missing", [*RUN, "-c", "{d}/nope.yaml"], {}, "config file not found", "give a YAML file or a preset"),
    ("config-unknown-key", [*RUN, "-c", "{d}/c.yaml"], {"c.yaml": "sft: {max_stepz: 3}\n"},
     "sft.max_stepz: unknown key (did you mean 'max_steps'?)", "fix it in the config file"),
    # overrides
    ("lr-scheduler", [*RUN, "sft.lr_scheduler=bogus"], {}, "sft.lr_scheduler: Input should be 'linear'", "fix it"),
    ("negative-seed", [*RUN, "seed=-1"], {}, "seed: Input should be greater than or equal to 0", "fix it"),
    ("infinite-lr", [*RUN, "sft.learning_rate=.inf"], {}, "sft.learning_rate: Input should be a finite number",
     "fix it"),
    ("nan-beta", ["run", "dpo", "dpo.beta=.nan"], {}, "dpo.beta: Input should be a finite number", "fix it"),
    ("zero-beta", ["run", "dpo", "dpo.beta=0"], {}, "dpo.beta: Input should be greater than 0", "fix it"),
    ("save-after-end", [*RUN, "sft.max_steps=1000", "sft.save_steps=5000"], {},
     "sft.save_steps: more than max_steps (1000)", "set it to 1000 or less"),
    ("long-run-name", [*RUN, "run_name=" + "x" * 300], {}, "run_name: String should have at most 100 characters",
     "fix it"),
    ("run-name-escape", [*RUN, "run_name=../escape"], {}, "run_name: String should match pattern", "fix it"),
    ("eval-alone", ["run", "x", "pipelines={x: [eval]}"], {}, "stage 'eval' needs tasks from an earlier 'data'",
     "put 'data' before it"),
    ("sft-before-model", ["run", "x", "pipelines={x: [data, sft, eval]}"], {},
     "stage 'sft' needs model_dir from an earlier 'model'", "put 'model' before it"),
    ("stage-twice", [*RUN, "pipelines.sft=[data, model, sft, sft, eval]"], {}, "stage 'sft' appears twice",
     "list each stage once"),
    ("unknown-stage", [*RUN, "pipelines.sft=[data, teleport]"], {}, "unknown stage 'teleport'", "known: data"),
    ("unknown-pipeline", ["run", "nosuch"], {}, "unknown pipeline 'nosuch'", "declare it under pipelines:"),
    ("no-prices", [*RUN, "cost.prices={}"], {}, "cost.prices: Dictionary should have at least 1 item", "fix it"),
    ("cpu-unpriced", [*RUN, "cost.prices={T4: 0.35}"], {}, "no price for device CPU", "set cost.prices.CPU="),
    ("negative-price", [*RUN, "cost.prices.CPU=-1"], {}, "cost.prices.CPU: Input should be greater than or equal",
     "fix it"),
    pytest.param("gpu-without-cuda", [*RUN, "resources.use_gpu=true"], {}, "torch sees no CUDA GPU",
                 "set resources.use_gpu=false", marks=NO_CUDA, id="gpu-without-cuda"),
    ("precision", [*RUN, "sft.precision=fp8"], {}, "sft.precision: Input should be 'auto'", "fix it"),
    ("dpo-loss", ["run", "dpo", "dpo.loss_type=bogus"], {}, "dpo.loss_type: Input should be 'sigmoid'", "fix it"),
    ("connector", [*RUN, "model.source=compose", "model.compose={vision: a, language: b, connector: qformer}"], {},
     "model.compose.connector: Input should be 'linear', 'mlp' or 'pixel_shuffle'", "fix it"),
    ("unknown-task", [*RUN, "data.tasks.chartq.train_size=5"], {},
     "data.tasks: unknown task 'chartq' (did you mean 'chartqa'?)", "known tasks: vqa, chartqa"),
    ("task-under-old-key", [*RUN, "data.vqa.train_size=5"], {}, "data.vqa: unknown key (did you mean 'tasks.vqa'?)",
     "fix it"),
    ("no-task-left", [*RUN, "data.tasks={" + ", ".join(f"{k}: null" for k in TASKS) + "}"], {}, "no task left",
     "give at least one of vqa, chartqa"),
    ("eval-unknown-task", ["eval", "tiny", "--tasks", "vqa,docs"], {}, "--tasks: unknown task 'docs'",
     "comma-separated list of those"),
    ("unknown-protocol", [*RUN, "eval.protocol=vlmevalkit"], {}, "eval.protocol: Input should be 'short' or 'lmms'",
     "fix it"),
    ("not-key-value", [*RUN, "noequals"], {}, "override 'noequals' is not of the form key=value",
     "e.g. sft.max_steps=50"),
    ("not-an-integer", [*RUN, "sft.max_steps=many"], {}, "sft.max_steps: Input should be a valid integer", "fix it"),
    ("empty-experiment", [*RUN, "tracking.experiment="], {}, "tracking.experiment: String should have at least 1",
     "fix it"),
    ("missing-model-dir", [*RUN, "model.source=./no/such/model"], {}, "model.source: model directory not found",
     "fix it"),
    ("reward-undefined", ["run", "grpo", "grpo.rewards=[{d}/evil.py:nothere]"], {"evil.py": EVIL},
     "defines no top-level function 'nothere'", "check the name"),
    ("reward-no-module", ["run", "grpo", "grpo.rewards=[no_such_module_xyz:f]"], {},
     "cannot find module 'no_such_module_xyz'", "give a path/to/file.py instead"),
    ("column-name", [*RUN, "data.tasks.vqa.columns={note: x}"], {},
     "data.tasks.vqa.columns.note.[key]: Input should be 'image'",
     "fix it"),
    ("zero-new-tokens", [*RUN, "eval.max_new_tokens=0"], {}, "eval.max_new_tokens: Input should be greater than",
     "fix it"),
    ("missing-data-dir", [*RUN, "data.tasks.vqa.source=/no/such/dir"], {}, "data directory not found", "fix it"),
    # paths and text at the edges, bounded input
    ("output-dir-a-file", [*RUN, "--output-dir", "{d}/f"], {"f": "x"}, "/f is a file, not a directory",
     "give a directory"),
    ("output-dir-too-long", [*RUN, "--output-dir", "/tmp/" + "x" * 300], {}, "longer than the OS allows",
     "use a shorter path"),
    ("unknown-home", [*RUN, "data.tasks.vqa.source=~no_such_user_x/d"], {}, "no user 'no_such_user_x' here",
     "give the path in full"),
    ("yaml-alias-bomb", ["run", "sft", "--config", "{d}/bomb.yaml"], {"bomb.yaml": "a: &a [x, x, x, x, x, x, x, x]\n"
     + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 8)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))},
     "expands to more than 200,000 values", "a vlmlab config has a few hundred"),
    ("yaml-too-deep", ["run", "sft", "--config", "{d}/deep.yaml"], {"deep.yaml": "seed: " + "[" * 3000 + "]" * 3000},
     "nested too deep", "a vlmlab config nests a few levels"),
    ("reward-too-deep", ["run", "grpo", "grpo.rewards=[{d}/deep.py:f]"], {"deep.py": "f = " + "(" * 300 + ")" * 300},
     "deep.py is not valid Python", "fix the file"),
    ("eval-not-a-model", ["eval", "{d}/m"], {"m/config.json": '{"model_type": "nope"}'}, "config.json does not load",
     "give a Hugging Face checkpoint directory"),
    ("eval-hub-id-offline", ["eval", "someone/not-a-cached-vlm"], {}, "not in the local Hugging Face cache",
     "download it first"),
    ("workers-beyond-the-machine", [*RUN, "resources.workers=4096"], {}, "resources.workers: 4096 worker(s)",
     "lower resources.workers"),
    # each command checks what its work would check before that work starts: a sweep its shared stages' checks,
    # room and data; an estimate its calibration run's; a run its finished run_name before the MLflow store exists
    ("sweep-workers-beyond-the-machine", ["sweep", "dpo-beta", "resources.workers=4096"], {},
     "resources.workers: 4096 worker(s)", "lower resources.workers"),
    ("sweep-shared-model-not-a-model", ["sweep", "dpo-beta", "model.source={d}/m"],
     {"m/config.json": '{"model_type": "nope"}'}, "config.json does not load",
     "give a Hugging Face checkpoint directory"),
    ("estimate-workers-beyond-the-machine", ["estimate", "sft", "-d", "T4", "resources.workers=4096"], {},
     "resources.workers: 4096 worker(s)", "lower resources.workers"),
    ("run-name-finished", [*RUN, "run_name=done"], {"runs/done/result.json": "{}"}, "has already finished",
     "rerun with --force"),
    ("sync-to-a-missing-store", ["sync", "{d}/run", "--tracking-uri", "sqlite:///{d}/typo.db"],
     {"run/mlflow_outbox.jsonl": '{"op": "set_terminated", "run_id": "r", "status": "KILLED"}\n'},
     "no MLflow store at sqlite:///", "give the store this run logged to"),
    ("leaderboard-pipeline-quote", ["leaderboard", "--pipeline", "sft' or '1'='1"], {}, "not a pipeline name",
     "`harness runs` lists"),
    ("report-bad-grades-history", ["report", "{d}/r"],
     {"r/result.json": json.dumps({"run_id": "r", "pipeline": "sft", "config": {}, "metrics": {}, "manifest": {},
                                   "stages": [{"name": "sft", "metrics": {"sft/grades/frozen_fraction": 0.5}}]}),
      "r/sft/grades_history.json": '{"q_proj": {"group": "language", "changes": [["x", 1]]}}'},
     "grades_history.json: not a vlmlab GradES history (q_proj.changes.0.0", "rerun the stage with GradES on"),
    ("checkpoints-all-without-scoring-while-training", [*RUN, "eval.checkpoints=all", "eval.while_training=off"],
     {}, "checkpoints=all scores each checkpoint while its stage trains", "set while_training to auto"),
    ("report-bad-checkpoint-curve", ["report", "{d}/r"],
     {"r/result.json": json.dumps({"run_id": "r", "pipeline": "sft", "config": {}, "metrics": {}, "manifest": {},
                                   "stages": [{"name": "eval", "outputs": {"checkpoints": [{"step": "two"}]}}]})},
     "the eval stage's outputs.checkpoints is not what vlmlab wrote (0.checkpoint: field required",
     "rerun the eval"),
    # secrets: a token-shaped run name (it becomes paths and MLflow names), a secret-named key's value never echoed
    ("secret-run-name", [*RUN, "run_name=ghp_" + "a" * 36], {}, "run_name: looks like a secret", "pick another name"),
    ("secret-key-value", [*RUN, "sft.runtime_env.env_vars={HF_TOKEN: [hunter2]}"], {},
     "HF_TOKEN, Input should be a valid string (the value is not shown", "fix it"),
    # text is text: rich would draw ':train:' as an emoji and eat '[bold]' as markup
    ("markup-in-path", [*RUN, "data.tasks.vqa.source=/no/such/vqav2:train:[bold]x[/]"], {},
     "data directory not found: /no/such/vqav2:train:[bold]x[/]", "fix it"),
    # data files (checked before the first stage)
    ("vqa-corrupt-json", [*RUN, VQA_DIR], _vqa('{"questions": [1,'),
     "v2_questions_train.json: not valid JSON at line 1", "repair or re-download the file"),
    ("vqa-not-utf8", [*RUN, VQA_DIR], _vqa('{"questions": [], "x": "caf\xe9"}'.encode("latin-1")),
     "v2_questions_train.json: not UTF-8 text", "save it as UTF-8"),
    ("vqa-no-image-id", [*RUN, VQA_DIR],
     _vqa('{"questions": [{"question_id": 1, "question": "q?"}]}',
          '{"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}]}'),
     "v2_questions_train.json row 0: no 'image_id'", "fix or drop that entry"),
    ("vqa-annotations-not-list", [*RUN, VQA_DIR], _vqa('{"questions": []}', '{"annotations": 3}'),
     "expected an object with a list under 'annotations'", "give the file in the official VQA layout"),
    ("chartqa-no-imgname", [*RUN, "data.tasks.chartqa.source={d}/chartqa"],
     {"chartqa/train/train_human.json": '[{"query": "q?", "label": "1"}]', "chartqa/test/test_human.json": "[]"},
     "train_human.json row 0: no 'imgname'", "fix or drop that entry"),
    ("disk-missing-split", [*RUN, "data.tasks.vqa.source={d}/disk"], _hf_disk_train_only,
     "no split 'test' (splits: train)", "set the task's train_split / test_split"),
    ("parquet-missing-split", [*RUN, "data.tasks.vqa.source={d}/pq"],
     lambda d: _parquet(d, [{"image": {"bytes": PNG, "path": None}, "question": "q", "answers": ["a"]}], ["train"]),
     "no parquet files for split 'test'", "add them or set the task's train_split / test_split"),
    ("parquet-missing-column", [*RUN, "data.tasks.vqa.source={d}/pq"],
     lambda d: _parquet(d, [{"image": {"bytes": PNG, "path": None}, "query": "q", "answers": ["a"]}]),
     "task 'vqa' needs column 'question'", "remap with data.tasks.vqa.columns"),
    ("parquet-bad-image", [*RUN, "data.tasks.vqa.source={d}/pq"],
     lambda d: _parquet(d, [{"image": {"bytes": b"not a png", "path": None}, "question": "q", "answers": ["a"]}]),
     "row 0: image cannot be decoded", "replace it or drop that row"),
    # result.json for reproduce
    ("result-empty-object", ["reproduce", "{d}/r.json"], {"r.json": "{}"}, "not a vlmlab result (run_id: field "
     "required", "give the result.json a `harness run` wrote"),
    ("result-list", ["reproduce", "{d}/r.json"], {"r.json": "[1, 2]"}, "the top level is a list",
     "give the result.json"),
    ("result-not-json", ["reproduce", "{d}/r.json"], {"r.json": "{oops"}, "not valid JSON", "give the result.json"),
    ("result-not-utf8", ["reproduce", "{d}/r.json"], {"r.json": b'{"x": "\xff"}'}, "not UTF-8 text",
     "give the result.json"),
    ("result-missing", ["reproduce", "{d}/none"], {}, "no result.json at", "give a run directory or its result.json"),
    ("result-custom-reward", ["reproduce", "{d}/r.json"], {"r.json": _result(**{"grpo.rewards": ["{d}/evil.py:f"]}),
                                                          "evil.py": EVIL},
     "grpo.rewards: ", "rerun with --trust"),
    ("result-remote-code", ["reproduce", "{d}/r.json"], {"r.json": _result(**{"model.trust_remote_code": True})},
     "model.trust_remote_code: true", "rerun with --trust"),
    ("result-runtime-env", ["reproduce", "{d}/r.json"],
     {"r.json": _result(**{"sft.runtime_env": {"image_uri": None, "env_vars": {"LD_PRELOAD": "/tmp/x.so"}}})},
     "sft.runtime_env: env_vars", "rerun with --trust"),
    ("result-secret-missing", ["reproduce", "{d}/r.json"],
     {"r.json": _result(**{"tracking.uri": "http://${secret:VLMLAB_TEST_NOT_SET}@127.0.0.1:9/"})},
     "kept out of result.json", "set VLMLAB_TEST_NOT_SET in the environment"),
    ("result-invalid-config", ["reproduce", "{d}/r.json"], {"r.json": _result(**{"sft.max_steps": 0})},
     "sft.max_steps: Input should be greater than or equal to 1", "rerun it with the vlmlab version"),
    # command-line arguments
    ("unknown-option", [*RUN, "--bogus"], {}, "No such option: --bogus", "--help"),
    ("negative-tolerance", ["reproduce", "{d}", "--tolerance", "-1"], {}, "Invalid value for '--tolerance'",
     "--help"),
    ("unknown-command", ["frob"], {}, "No such command 'frob'", "--help"),
    ("ui-port-out-of-range", ["ui", "--port", "0"], {}, "Invalid value for '--port'", "--help"),
    # a path the OS refuses, given to any command: one line naming it (found by tests/test_cli_properties.py)
    ("report-name-too-long", ["report", "x" * 300], {}, "File name too long", "give a path this system can open"),
    ("override-control-character", [*RUN, "sft.max_steps=\x1f"], {}, "not valid YAML", "fix it there"),
    ("leaderboard-format", ["leaderboard", "--format", "xml"], {}, "--format must be table, markdown, csv or json",
     "must be"),
    ("sweep-mode", ["sweep", "--space", "dpo.beta=choice(0.1,0.2)", "--mode", "sideways"], {},
     "--mode must be max or min", "must be"),
    ("sweep-preset", ["sweep", "nosuch"], {}, "unknown sweep preset 'nosuch'", "known: "),
    ("sweep-sampler", ["sweep", "--space", "dpo.beta=bogus(1)"], {}, "unknown sampler 'bogus'", "use "),
    ("sweep-scheduler", ["sweep", "dpo-beta", "--scheduler", "hyperband"], {}, "--scheduler must be asha",
     "must be"),
    # a sweep's space is checked against the schema over the whole range a trial can draw, before any trial
    ("sweep-value-out-of-schema", ["sweep", "-p", "dpo", "--space", "dpo.beta=grid(0.1,1.0,0)"], {},
     "a trial with dpo.beta=0): dpo.beta: Input should be greater than 0", "narrow the --space range"),
    ("sweep-float-range-on-int", ["sweep", "-p", "dpo", "--space", "dpo.max_steps=uniform(200,300)"], {},
     "dpo.max_steps: Input should be a valid integer", "narrow the --space range"),
    ("sweep-range-end-breaks-a-rule", ["sweep", "--space", "sft.save_steps=randint(100,5000)"], {},
     "sft.save_steps: more than max_steps (1200)", "narrow the --space range"),
    ("sweep-choice-not-allowed", ["sweep", "-p", "dpo", "--space", "dpo.loss_type=choice(sigmoid,bogus)"], {},
     "dpo.loss_type: Input should be 'sigmoid'", "narrow the --space range"),
    ("sweep-unknown-objective", ["sweep", "dpo-beta", "--objective", "eval/nosuch"], {},
     "--objective 'eval/nosuch': not a metric", "use eval/<metric>"),
    ("sweep-objective-of-a-dropped-task", ["sweep", "dpo-beta", "data.tasks.vqa=null", "--objective",
                                           "eval/vqa_accuracy"], {}, "not a metric this pipeline's eval writes",
     "use eval/<metric>"),
    ("sweep-pipeline-without-eval", ["sweep", "-p", "nev", "--space", "sft.learning_rate=grid(1e-3,1e-4)",
                                     "pipelines.nev=[data,model,sft]"], {}, "has no eval stage", "sweep a pipeline"),
]


def _make(directory, files) -> None:
    if callable(files):
        files(directory)
        return
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{d}", str(directory)))


def test_the_table_is_big_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case, argv, files, problem, fix",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input_exits_2_with_one_line_before_any_work(workdir, case, argv, files, problem, fix):
    _make(workdir, files)
    before = sorted(workdir.rglob("*"))
    result = CliRunner().invoke(app, [a.replace("{d}", str(workdir)) for a in argv])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert problem in lines[0], lines[0]
    assert lines[0].find(fix, lines[0].index(problem)) > 0, lines[0]  # the fix, after the problem
    assert "hunter2" not in result.output and "ghp_" not in result.output  # no case's secret echoed
    # nothing written: no run directory, no MLflow store (so no run left RUNNING), no result.json, no user code ran
    assert sorted(workdir.rglob("*")) == before


def test_a_bug_is_one_line_and_exit_1_with_the_traceback_in_a_redacted_log(tmp_path, monkeypatch):
    """The CLI's last line of defence, for what is not bad input (bad input is exit 2, above): any other exception is
    one `internal error:` line naming the log file, exit 1; the log holds the traceback, redacted, owner-only."""
    import typer

    from harness.cli import _Commands

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cli = typer.Typer(cls=_Commands)

    @cli.command()
    def boom():
        raise RuntimeError("store http://bob:hunter2@db.example/x failed: " + "y" * 500)

    @cli.command()
    def fine():  # two commands: typer makes a group of them, the harness's own kind of app
        pass

    result = CliRunner().invoke(cli, ["boom"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("internal error: RuntimeError: store http://***@db.example/x failed: yyy")
    assert "hunter2" not in result.output and len(lines[0]) < 500
    log = next((tmp_path / "state" / "vlmlab" / "logs").glob("harness-*.log"))
    assert str(log) in lines[0] and log.stat().st_mode & 0o077 == 0
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and 'raise RuntimeError("store' in text
    assert "hunter2" not in text and "http://***@db.example/x" in text


@pytest.mark.parametrize("argv", [["leaderboard"], ["runs"], ["leaderboard", "--format", "json"]])
def test_reading_commands_create_no_store(workdir, argv):
    """A command that only reads runs, with no MLflow store yet, says there is nothing and creates nothing (reading a
    missing SQLite file through MLflow would create an empty store)."""
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert sorted(workdir.rglob("*")) == []
