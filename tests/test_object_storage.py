"""`--output-dir s3://...` end to end, against a real S3 API: moto's server, started here on 127.0.0.1.

The harness runs in a subprocess (its own local Ray, killed with its process group), so no module-scoped Ray
session may be alive meanwhile.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SLOW_SFT, free_port, loopback_only, stop_session, tiny_overrides, wait_for

BUCKET, PREFIX = "vlmlab-runs", "team/exp"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with an empty bucket; yields a boto3 client and the environment that points
    the AWS SDKs (pyarrow's, hence Ray Train's; boto3) at it."""
    if not loopback_only():
        pytest.fail("this test starts Ray: run it inside a loopback-only network namespace (scripts/test)")
    import boto3

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    assert server.exists(), "moto_server is missing: scripts/setup installs it (dev extras)"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        client = boto3.client("s3", region_name="us-east-1", endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id="test", aws_secret_access_key="test")

        def bucket_made() -> bool:
            assert proc.poll() is None, "moto_server exited"
            try:
                client.create_bucket(Bucket=BUCKET)
                return True
            except Exception:  # not listening yet
                return False

        wait_for(bucket_made, 120, "moto_server")
        yield client, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _read(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _registered_checkpoint(client) -> bool:
    """Ray has registered a checkpoint of the sft stage in the bucket (its snapshot lists one)."""
    for key in _keys(client, f"{PREFIX}/.cache/ray/sft-"):
        if key.endswith("/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(_read(client, key)).get("checkpoint_results"):
                    return True
            except (ValueError, client.exceptions.NoSuchKey):  # being replaced
                pass
    return False


def _harness(root: Path, env: dict, mirrors: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, **env, VLMLAB_LOCAL_DIR=str(mirrors),
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(root: Path, env: dict, mirrors: Path, args: list[str]) -> tuple[int, str, str]:
    proc = _harness(root, env, mirrors, *args)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        stop_session(proc)
    return proc.returncode, out, err


def test_run_to_s3_killed_then_resumed_from_the_bucket(workdir, s3):
    """`harness run sft --output-dir s3://...` SIGKILLed once Ray has registered a checkpoint in the bucket; the
    same command, with an empty local mirror, reuses data and model from the bucket's cache entries, resumes SFT
    from the bucket's checkpoint and leaves config, stages, cache entries and result.json in the bucket."""
    client, env = s3
    args = ["run", "sft", *tiny_overrides(**SLOW_SFT), "run_name=remote", "--output-dir", f"s3://{BUCKET}/{PREFIX}"]
    first = workdir / "mirrors-first"
    proc = _harness(workdir, env, first, *args)
    try:
        wait_for(lambda: _registered_checkpoint(client) or proc.poll() is not None, 600, "a checkpoint in the bucket")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        stop_session(proc)
    # Ray wrote the checkpoints to the bucket, not to the mirror; the finished stages' entries went up too
    assert not list(first.glob("*/.cache/ray"))
    assert {k.rsplit("/", 1)[1].split("-")[0] for k in _keys(client, f"{PREFIX}/.cache/") if k.endswith(".json")
            and "/ray/" not in k} >= {"data", "model"}
    shutil.rmtree(first)  # nothing local survives: the rerun can only resume from the bucket

    second = workdir / "mirrors-second"  # another (empty) mirror path: entries' recorded paths are rewritten
    rc, out, err = _finish(workdir, env, second, args)
    assert rc == 0, (out[-2000:], err[-3000:])
    result = json.loads(_read(client, f"{PREFIX}/remote/result.json"))
    assert result["reused_stages"] == ["data", "model"]
    assert result["metrics"]["sft/resumed_from_step"] >= 10
    assert result["metrics"]["sft/steps"] == 40
    assert f"s3://{BUCKET}/{PREFIX}/remote" in " ".join(out.split())  # says where the run went

    keys = set(_keys(client, PREFIX))
    run = f"{PREFIX}/remote"
    assert {f"{run}/config.yaml", f"{run}/result.json", f"{run}/sft/model/model.safetensors"} <= keys
    assert {f"{run}/{stage}/stage.json" for stage in ("data", "model", "sft", "eval")} <= keys
    entries = [k for k in keys if k.startswith(f"{PREFIX}/.cache/") and k.endswith(".json") and "/ray/" not in k]
    for stage in ("data", "model", "sft", "eval"):
        key = next(k for k in entries if k.rsplit("/", 1)[1].startswith(f"{stage}-"))
        entry = json.loads(_read(client, key))
        assert entry["key"] == next(s["key"] for s in result["stages"] if s["name"] == stage)
        for file in entry["files"]:  # every file an entry names is in the bucket, beside it
            rel = Path(file).relative_to(Path(entry["stage_dir"]).parents[1]).as_posix()
            assert f"{PREFIX}/{rel}" in keys, rel
    assert any(k.endswith("/checkpoint_manager_snapshot.json") for k in keys)

    # finished: the name is taken, as the bucket says, even on a machine whose mirror is empty
    rc, out, err = _finish(workdir, env, workdir / "mirrors-third", args)
    assert rc == 2 and "has already finished" in err and f"s3://{BUCKET}/{PREFIX}/remote/result.json" in \
        " ".join(err.split()), err[-2000:]


def test_unusable_output_uri_is_one_clear_error(s3, monkeypatch, tmp_path):
    """A missing bucket, an unreachable endpoint, credentials in the URI, an unknown scheme: a UserError naming
    --output-dir (exit 2 from the CLI) before any work, never a traceback from the first upload."""
    from harness.storage import OutputDir
    from runtime.errors import UserError

    _, env = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VLMLAB_LOCAL_DIR", str(tmp_path))
    assert OutputDir(f"s3://{BUCKET}/{PREFIX}").local.parent == tmp_path
    with pytest.raises(UserError, match="--output-dir: bucket 'no-such-bucket' does not exist"):
        OutputDir("s3://no-such-bucket/runs")
    with pytest.raises(UserError, match="no credentials in the URI") as info:
        OutputDir(f"s3://AKIAEXAMPLE:hunter2secret@{BUCKET}/runs")
    assert "hunter2secret" not in str(info.value)
    with pytest.raises(UserError, match="--output-dir: cannot use nope://"):
        OutputDir("nope://bucket/runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(UserError, match="--output-dir: cannot use s3://"):
        OutputDir(f"s3://{BUCKET}/runs")
    assert OutputDir("runs").uri is None and OutputDir("file:///tmp/x").local == Path("/tmp/x")
