"""Random input at the CLI's own boundaries (#39), drawn by Hypothesis: YAML config files, `key=value` overrides and
the arguments of every command. Each must exit 0 (the input happens to be valid: validate-only paths, listings of
an empty directory) or 2 with one `error:` line; never 1, never a traceback. Commands that start work get one
override the schema refuses (a poison), so a draw that is otherwise valid stops before any work, and the test
checks that nothing was created. Seeded, Hypothesis's database off, in-process (no Ray): ~1 min in all."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from helpers import property_settings
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli import app
from runtime.config import load_config
from runtime.output import VERBOSE_ENV

SETTINGS = property_settings(200)


def _keys(node, prefix=""):
    for key, value in node.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")


KEYS = sorted(_keys(load_config("tiny").model_dump(mode="json")))
WORDS = ["", " ", "0", "-1", "1", "3.5", "1e999", "nan", "inf", "true", "null", "~", "abc", "x" * 300,
         "/nonexistent/x", "~no_such_user_x/d", "s3://bucket/key", ":train:[bold]x[/]", "ghp_" + "a" * 36,
         "http://bob:hunter2@127.0.0.1:9/", "[1, 2]", "{a: 1}", "&a [*a]", "'unclosed", "{d}", "{d}/file", "tiny",
         "sft", "dpo", "vqa", "\t", "é", "%s", "${secret:NOT_SET_HERE}"]
words = st.sampled_from(WORDS) | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-3, 3000) | st.floats(allow_nan=True, allow_infinity=True) | words
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS) | st.sampled_from([k.rsplit(".", 1)[-1] for k in KEYS]) | words, inner, max_size=4),
    max_leaves=12)


def _invoke(tmp_path, argv: list[str]):
    (tmp_path / "file").write_text("not a directory")
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    result = CliRunner().invoke(app, argv)
    lines = result.output.strip().splitlines()
    assert result.exit_code in (0, 2), (argv, result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, result.output)
    assert "hunter2" not in result.output and "ghp_" + "a" * 36 not in result.output, result.output
    return result, lines


@pytest.fixture(autouse=True)
def _environment_kept():
    """The commands run in this process: what one sets in the environment (`run -v` sets VLMLAB_VERBOSE for its Ray
    workers) is undone after each example (``_fresh``) and after the test."""
    saved = dict(os.environ)
    yield saved
    _restore(saved)


def _restore(saved: dict) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def _fresh(tmp_path, monkeypatch, saved: dict):
    _restore(saved)
    assert VERBOSE_ENV not in os.environ
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in os.listdir(tmp_path):
        path = tmp_path / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@SETTINGS
@given(document=documents | st.builds(lambda top: top, st.dictionaries(st.sampled_from(KEYS), documents, max_size=5)))
def test_any_yaml_document_is_validated_in_one_line(tmp_path, monkeypatch, _environment_kept, document):
    _fresh(tmp_path, monkeypatch, _environment_kept)
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        text = json.dumps(document, default=str)
    (tmp_path / "config.yaml").write_text(text)
    result, lines = _invoke(tmp_path, ["validate", str(tmp_path / "config.yaml")])
    if result.exit_code == 2:
        assert "config" in lines[0] or str(tmp_path) in lines[0] or "." in lines[0], lines[0]


@SETTINGS
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS) | words, words | st.integers(-3, 3000).map(str)), max_size=4))
def test_any_overrides_are_validated_in_one_line(tmp_path, monkeypatch, _environment_kept, pairs):
    _fresh(tmp_path, monkeypatch, _environment_kept)
    _invoke(tmp_path, ["validate", "tiny", *(f"{k}={v}" for k, v in pairs)])


OPTIONS = {  # every command but `ui` (a valid draw would serve until stopped); poisoned ones get a refused override
    "run": (["--config", "-c", "--output-dir", "-o", "--force", "-v"], ["sft.max_steps=0"]),
    "eval": (["--tasks", "--protocol", "--limit", "--config", "--output-dir", "--force"], ["eval.batch_size=0"]),
    "sweep": (["--space", "--pipeline", "--trials", "--objective", "--mode", "--scheduler", "--config",
               "--output-dir"], ["sft.max_steps=0"]),
    "estimate": (["--device", "--config", "--steps", "--json"], ["sft.max_steps=0"]),
    "reproduce": (["--tolerance", "--trust", "--output-dir"], []),
    "leaderboard": (["--experiment", "--pipeline", "--metric", "--format", "--plot", "--sort", "--filter",
                     "--tracking-uri"], []),
    "runs": (["--limit", "--experiment", "--output-dir", "--tracking-uri"], []),
    "report": (["--experiment", "--output-dir", "--tracking-uri"], []),
    "compare": (["--tasks", "--json", "--seed", "--experiment", "--output-dir", "--tracking-uri"], []),
    "sync": (["--tracking-uri"], []),
    "validate": ([], []),
    "gc": (["--output-dir", "--keep", "--apply"], []),
    "env": (["--json"], []),
}
FLAGS = {"--force", "-v", "--json", "--trust", "--apply"}
LOCAL_URIS = ["sqlite:///{d}/m.db", "sqlite:///{d}/file", "file:{d}/mlruns", "", "bogus://x", "{d}/file"]


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(OPTIONS)))
    names, poison = OPTIONS[command]
    argv = [command, *draw(st.lists(words, max_size=2))]
    for name in draw(st.lists(st.sampled_from(names), max_size=4)) if names else []:
        argv.append(name)
        if name not in FLAGS:
            argv.append(draw(st.sampled_from(LOCAL_URIS)) if name == "--tracking-uri" else draw(words))
    return argv + poison, bool(poison)


@SETTINGS
@given(line=command_lines())
def test_any_command_line_exits_0_or_2_in_one_line_and_poisoned_ones_do_no_work(tmp_path, monkeypatch,
                                                                              _environment_kept, line):
    argv, poisoned = line
    _fresh(tmp_path, monkeypatch, _environment_kept)
    result, _ = _invoke(tmp_path, argv)
    if poisoned:
        assert result.exit_code == 2, (argv, result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], (argv, list(tmp_path.iterdir()))
