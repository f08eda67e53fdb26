"""Config loading, validation and the CLI's handling of bad input (exit code 2, key named, nothing written)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from runtime.config import CONFIG_DIR, load_config, parse_overrides
from runtime.errors import ConfigError

HARNESS = [sys.executable, "-m", "harness.cli"]


def test_presets_validate():
    tiny = load_config("tiny")
    assert tiny.model.source == "tiny" and tiny.pipelines["sft"] == ["data", "model", "sft", "eval"]
    t4 = load_config(str(CONFIG_DIR / "smolvlm-256m-t4.yaml"))
    assert t4.resources.use_gpu and t4.sft.precision == "fp16" and t4.sft.lora.enabled
    assert t4.model.source == "HuggingFaceTB/SmolVLM-256M-Instruct"


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["sft.max_steps=12", "sft.save_steps=6", "sft.learning_rate=3e-4", "sft.lora.enabled=true",
                             "data.tasks.vqa.columns={question: q}"])
    assert cfg.sft.max_steps == 12 and cfg.sft.learning_rate == pytest.approx(3e-4)
    assert cfg.sft.lora.enabled is True and cfg.data.tasks["vqa"].columns == {"question": "q"}
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("overrides, message", [
    (["sft.max_stepz=3"], "sft.max_stepz: unknown key"),
    (["sft.max_steps=many"], "sft.max_steps: Input should be a valid integer"),
    (["sft.learning_rate=-1"], "sft.learning_rate: Input should be greater than 0"),
    (["model.source=./no/such/model"], "model.source: model directory not found: ./no/such/model"),
    (["data.tasks.vqa.source=/no/such/dir"], "data.tasks.vqa.source: data directory not found"),
    (["pipelines.sft=[data, teleport]"], "unknown stage 'teleport'"),
    (["run_name=../escape"], "run_name"),
    (["noequals"], "not of the form key=value"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_yaml_is_parsed_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_bad_config_exits_2_and_writes_nothing(workdir):
    cfg = workdir / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"sft": {"max_steps": 0}}))
    proc = subprocess.run([*HARNESS, "run", "sft", "--config", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "sft.max_steps: Input should be greater than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "runs").exists()
    assert not (workdir / "mlflow.db").exists()  # failed before touching tracking


def test_cli_validate_and_env(workdir):
    ok = subprocess.run([*HARNESS, "validate", "tiny"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = subprocess.run([*HARNESS, "validate", "tiny", "eval.batch_size=0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "eval.batch_size" in bad.stderr
    env = subprocess.run([*HARNESS, "env", "--json"], capture_output=True, text=True)
    assert env.returncode == 0 and '"transformers": "5.24.0"' in env.stdout


def test_stage_runtime_env_reaches_the_ray_workers():
    from runtime.raytrain import worker_runtime_env

    cfg = load_config(None, ["sft.runtime_env.env_vars.MALLOC_ARENA_MAX=64", "sft.runtime_env.env_vars.X=true"])
    assert worker_runtime_env(cfg.sft) == {"env_vars": {"MALLOC_ARENA_MAX": "64", "X": "true"}}
    assert worker_runtime_env(cfg.dpo) is None  # other stages keep the driver's environment
    with pytest.raises(ConfigError, match="dpo.runtime_env.image_uri: unknown key"):  # removed: see docs/
        load_config(None, ["dpo.runtime_env.image_uri=localhost/vlmlab:latest"])
    with pytest.raises(ConfigError, match="sft.runtime_env.env_vars.X"):
        load_config(None, ["sft.runtime_env.env_vars.X=[1,2]"])
    with pytest.raises(ConfigError, match="dpo.runtime_env.pip"):
        load_config(None, ["dpo.runtime_env.pip=[torch]"])


def test_a_protocol_a_task_lacks_names_the_task(monkeypatch, tmp_path):
    """A registered task without an `lmms` YAML: choosing that protocol fails in validation, naming the task."""
    import dataclasses

    from evals import registry

    monkeypatch.setattr(registry, "TASK_DIR", tmp_path)  # where only toy/short.yaml exists
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "short.yaml").write_text("task: vlmlab_toy_short\n")
    toy = dataclasses.replace(registry.TASKS["vqa"], name="toy")
    monkeypatch.setitem(registry.TASKS, "toy", toy)
    only_toy = "data.tasks={" + ", ".join(f"{name}: null" for name in registry.TASKS if name != "toy") + ", toy: {}}"
    with pytest.raises(ConfigError, match=r"eval.protocol: task 'toy' has no 'lmms' protocol \(it has: short\); "
                                          r"choose one of those or drop the task"):
        load_config(None, [only_toy, "eval.protocol=lmms"])
    assert load_config(None, [only_toy]).data.tasks.keys() == {"toy"}
