"""Secrets: what counts as one, that none is written anywhere by a real pipeline run against a real `mlflow server`,
that `harness reproduce` asks for them again, and that user code only runs when asked."""
from __future__ import annotations

import json
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, loopback_only, tiny_overrides
from typer.testing import CliRunner

from harness.cli import app
from runtime.cost import cluster_gpus, gpu_alias
from runtime.errors import UserError
from runtime.secrets import placeholders, redact, redact_text, restore

ALNUM = string.ascii_letters + string.digits


def _rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("text, expected", [
    ("max_new_tokens=8", "max_new_tokens=8"),  # a key word must be a whole word: 'tokens' is not 'token'
    ("postgresql://bob:ab/cd1234@db/x", "postgresql://***@db/x"),  # userinfo of any scheme, '/' in the password
    ("https://ghp_abcdef@github.com/x", "https://***@github.com/x"),  # a token as the user name
    ("http://u:p@ssw0rd@host", "http://***@host"),  # userinfo ends at the last '@'
    ("harness sync --tracking-uri http://alice:pw@host", "harness sync --tracking-uri http://***@host"),
    ("HF_TOKEN=abc123", "HF_TOKEN=***"),
    ("{'db_password': 'hunter2', 'n': 1}", "{'db_password': '***', 'n': 1}"),
    ('"apiKey": "k-123"', '"apiKey": "***"'),
    ("auth: basic-xyz", "auth: ***"),
    ("pushing with ghp_" + "a" * 36 + " now", "pushing with *** now"),
    ("key sk-" + "b" * 40, "key ***"),
    ("id AKIA" + "C" * 16, "id ***"),
    ("hook xoxb-1234567890-abcdef", "hook ***"),
    ("hf_" + "d" * 34, "***"),
    ("${secret:HF_TOKEN} at http://${secret:VLMLAB_SECRET_TRACKING_URI}@h", None),  # placeholders stay
    ("sqlite:////tmp/mlflow.db and http://127.0.0.1:5000/", None),
])
def test_what_counts_as_a_secret(text, expected):
    assert redact_text(text) == (text if expected is None else expected)


def test_environment_values_are_secrets(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_KEY", "planted-value-1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsely")  # TOKENIZERS is not the word TOKEN
    assert redact_text("a planted-value-1 b falsely") == "a *** b falsely"


def test_config_secrets_become_placeholders_read_back_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "e" * 34)
    tree = {"tracking": {"uri": "http://carol:pw@h:1/"}, "eval": {"max_new_tokens": 8},
            "sft": {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_" + "e" * 34, "GITHUB_TOKEN": "ghp_" + "f" * 36}}}}
    redacted = redact(tree)
    assert redacted == {"tracking": {"uri": "http://${secret:VLMLAB_SECRET_TRACKING_URI}@h:1/"},
                        "eval": {"max_new_tokens": 8},
                        "sft": {"runtime_env": {"env_vars": {"HF_TOKEN": "${secret:HF_TOKEN}",
                                                             "GITHUB_TOKEN": "${secret:GITHUB_TOKEN}"}}}}
    assert redact(redacted) == redacted
    assert placeholders(redacted) == {"VLMLAB_SECRET_TRACKING_URI", "HF_TOKEN", "GITHUB_TOKEN"}
    env = {"VLMLAB_SECRET_TRACKING_URI": "carol:pw", "HF_TOKEN": "hf_" + "e" * 34, "GITHUB_TOKEN": "ghp_" + "f" * 36}
    assert restore(redacted, env) == tree


@pytest.mark.parametrize("name, model", [
    ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("A100-80G", "A100-80GB"),
    ("A100", "A100"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA GH200 480GB", "GH200"), ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA RTX A6000", "RTX-A6000"),
    ("NVIDIA L40", "L40"), ("CPU", "CPU"),
])
def test_gpu_names_match_the_exact_model(name, model):
    assert gpu_alias(name) == model


def test_cluster_devices_come_from_rays_accelerator_type():
    nodes = [{"Alive": True, "Resources": {"CPU": 8}},  # a head without GPUs
             {"Alive": True, "Resources": {"GPU": 1, "accelerator_type:L40S": 1}},
             {"Alive": True, "Resources": {"GPU": 8, "accelerator_type:A100": 1, "accelerator_type:A100-80G": 1}},
             {"Alive": False, "Resources": {"GPU": 1, "accelerator_type:V100": 1}},
             {"Alive": True, "Resources": {"GPU": 1}}]
    assert cluster_gpus(nodes) == {"L40S", "A100-80GB", "unlabelled-GPU"}


def test_validate_reads_reward_functions_without_running_them(workdir):
    (workdir / "evil.py").write_text("import pathlib\npathlib.Path('RAN').write_text('x')\n"
                                     "def reward(completions, **_):\n    return [0.0] * len(completions)\n")
    ok = CliRunner().invoke(app, ["validate", "tiny", f"grpo.rewards=[{workdir}/evil.py:reward]"])
    assert ok.exit_code == 0, ok.output
    assert not (workdir / "RAN").exists()
    bad = CliRunner().invoke(app, ["validate", "tiny", f"grpo.rewards=[{workdir}/evil.py:other]"])
    assert bad.exit_code == 2 and "defines no top-level function 'other'" in bad.output
    assert not (workdir / "RAN").exists()


def test_trusted_reproduce_takes_secrets_from_the_environment(tmp_path, monkeypatch):
    from harness.reproduce import recorded_config
    from runtime.config import load_config

    config = redact(load_config("tiny", [f"grpo.rewards=[{tmp_path}/r.py:f]",
                                         "tracking.uri=http://carol:pw@127.0.0.1:9/"]).model_dump(mode="json"))
    recorded = {"config": config}
    with pytest.raises(UserError, match="grpo.rewards: .*r.py:f.*rerun with --trust"):
        recorded_config(recorded, tmp_path, trust=False)
    with pytest.raises(UserError, match="set VLMLAB_SECRET_TRACKING_URI in the environment"):
        recorded_config(recorded, tmp_path, trust=True)
    monkeypatch.setenv("VLMLAB_SECRET_TRACKING_URI", "carol:pw")
    assert recorded_config(recorded, tmp_path, trust=True).tracking.uri == "http://carol:pw@127.0.0.1:9/"


def test_cli_messages_pass_the_redactor(workdir, monkeypatch):
    """`harness sync --tracking-uri` with a password, to a server that is not there: the error names the URI, masked."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (workdir / "run").mkdir()
    entry = {"op": "set_terminated", "run_id": "r", "status": "KILLED"}
    (workdir / "run" / "mlflow_outbox.jsonl").write_text(json.dumps(entry) + "\n")
    port = free_port()  # closed again: nothing listens there
    result = CliRunner().invoke(app, ["sync", str(workdir / "run"), "--tracking-uri",
                                      f"http://alice:pw-Planted-42@127.0.0.1:{port}"])
    assert result.exit_code == 2, result.output
    assert f"sync to http://***@127.0.0.1:{port} failed: MLflow tracking server" in result.output
    assert "pw-Planted-42" not in result.output and "alice" not in result.output


def test_the_sqlite_store_is_private(workdir):
    from runtime.tracking import Tracker

    Tracker(f"sqlite:///{workdir / 'mlflow.db'}", "vlmlab")
    assert (workdir / "mlflow.db").stat().st_mode & 0o077 == 0


def _vqa_parquet(directory: Path) -> None:
    from datasets import Dataset, Image

    from stages.support import synthetic

    directory.mkdir(parents=True)
    for split, size, offset in (("train", 64, 0), ("test", 16, 10_000_000)):
        rows = synthetic.generate("shapes-vqa", size, 0, 64, offset)
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(directory / f"{split}.parquet"))


def test_planted_secrets_are_written_nowhere(mlflow_server, tmp_path):
    """Twelve secrets planted through environment variables, config values, overrides, the tracking URI and a data
    path; a real pipeline runs against a real MLflow server; no byte of any secret is in the run's files, the MLflow
    store (database and artifacts) or the run's stdout/stderr. The run itself must succeed."""
    assert loopback_only(), "the pipeline starts Ray: run the tests with scripts/test"
    store, port = mlflow_server.root, mlflow_server.port  # the session's server: this run's experiment is `vlmlab`
    data_token, mlflow_pw, proxy_pw = "hf_" + _rand(34), _rand(18), "p@ss" + _rand(12)
    pg_pw = _rand(8) + "/" + _rand(8)
    env_plants = {"HF_TOKEN": "hf_" + _rand(34), "AWS_SECRET_ACCESS_KEY": _rand(40),
                  "MY_SERVICE_PASSWORD": _rand(20), "OPENAI_API_KEY": "sk-" + _rand(40),
                  "MLFLOW_TRACKING_USERNAME": "vlmlab-user", "MLFLOW_TRACKING_PASSWORD": _rand(20)}
    config_plants = {"GITHUB_TOKEN": "ghp_" + _rand(36), "SLACK_HOOK": f"xoxb-{_rand(12, string.digits)}-{_rand(24)}",
                     "DB_URL": f"postgresql://bob:{pg_pw}@db.internal/x",
                     "AWS_ACCESS_KEY_ID": "AKIA" + _rand(16, string.ascii_uppercase + string.digits),
                     "PROXY": f"http://u:{proxy_pw}@proxy.internal:3128"}
    planted = [v for k, v in env_plants.items() if k != "MLFLOW_TRACKING_USERNAME"] + [
        config_plants["GITHUB_TOKEN"], config_plants["SLACK_HOOK"], pg_pw, config_plants["AWS_ACCESS_KEY_ID"],
        proxy_pw, proxy_pw[4:], mlflow_pw, data_token]
    data_dir = tmp_path / f"data-{data_token}" / "vqa"
    _vqa_parquet(data_dir)
    overrides = tiny_overrides() + [f"sft.runtime_env.env_vars.{k}={v}" for k, v in config_plants.items()] + [
        f"tracking.uri=http://carol:{mlflow_pw}@127.0.0.1:{port}", f"data.tasks.vqa.source={data_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env_plants
    run = subprocess.run([sys.executable, "-m", "harness.cli", "run", "sft", *overrides, "-o", str(tmp_path / "runs")],
                         cwd=tmp_path, env=env, capture_output=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output.decode(errors="replace")[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert (run_dir / "result.json").is_file()
    assert b"warning: sft.runtime_env.env_vars.GITHUB_TOKEN holds a secret" in output
    written = (run_dir / "config.yaml").read_text()  # the secrets were there, and were replaced
    for name in ("GITHUB_TOKEN", "SLACK_HOOK", "DB_URL", "AWS_ACCESS_KEY_ID", "PROXY", "VLMLAB_SECRET_TRACKING_URI",
                 "VLMLAB_SECRET_DATA_TASKS_VQA_SOURCE"):
        assert "${secret:" + name + "}" in written, name
    assert b"sft.runtime_env.env_vars.GITHUB_TOKEN" in mlflow_server.db.read_bytes()  # params reached MLflow

    files = [p for root in (tmp_path / "runs", store) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "result.json" for p in files if store in p.parents)  # artifacts reached the server
    hits = [f"{where}: {secret[:6]}..." for where, data in [("stdout/stderr", output)] + [
        (str(p), p.read_bytes()) for p in files] for secret in planted if secret.encode() in data]
    assert not hits, hits

    for path in (run_dir, run_dir / "config.yaml", run_dir / "result.json"):  # data and URIs: owner only
        assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)

    # reproduce asks for the secrets again, by name, before any work
    again = subprocess.run([sys.executable, "-m", "harness.cli", "reproduce", str(run_dir), "--trust"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr
    for name in ("DB_URL", "GITHUB_TOKEN", "PROXY", "VLMLAB_SECRET_DATA_TASKS_VQA_SOURCE",
                 "VLMLAB_SECRET_TRACKING_URI"):
        assert name in again.stderr, again.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) == [run_dir.name]
