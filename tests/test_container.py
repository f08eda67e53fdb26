"""The Dockerfile and the Kubernetes manifests in deploy/, checked statically (hadolint, user, secrets, pod
security, Ray token auth, a RayJob entrypoint the CLI takes), plus the MLflow server started exactly as its
Deployment starts it."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, free_port, stop_session, wait_http

HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
LOCKED_DOWN = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
               "seccompProfile": {"type": "RuntimeDefault"}}


def _docs() -> list[dict]:
    return [doc for path in sorted((ROOT / "deploy").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _pod_specs(node, where: str = "") -> list[tuple[str, dict]]:
    """Every pod spec in a manifest (anything holding `containers`), wherever the resource nests it."""
    if isinstance(node, list):
        return [found for i, item in enumerate(node) for found in _pod_specs(item, f"{where}[{i}]")]
    if not isinstance(node, dict):
        return []
    if "containers" in node:
        return [(where, node)]
    return [found for key, value in node.items() for found in _pod_specs(value, f"{where}.{key}")]


def _rayjob_argv() -> list[str]:
    return shlex.split(_one("RayJob")["spec"]["entrypoint"])


def test_dockerfile_passes_hadolint():
    """hadolint comes with the dev extras (scripts/setup installs them), so it is always there to run."""
    out = subprocess.run([HADOLINT, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secret():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("0", "root"), users
    assert "pip_cert" not in "".join(re.findall(r"^(?:COPY|ADD|ENV)\b.*$", text, flags=re.M))
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "runs", "mlflow.db"):
        assert path in ignored, path


def test_every_container_runs_locked_down_from_the_image():
    """Head, workers, the job submitter and the MLflow server: non-root uid 1000, no privilege escalation, no
    capabilities, the runtime's default seccomp profile; init containers included, were any declared."""
    seen = []
    for doc in _docs():
        for where, pod in _pod_specs(doc.get("spec", {}), f"{doc['kind']}/{doc['metadata']['name']}"):
            assert pod.get("securityContext", {}).get("runAsUser") == 1000, where
            for container in pod["containers"] + pod.get("initContainers", []):
                name = f"{where}: {container['name']}"
                assert container["image"].startswith("vlmlab:"), name
                assert container.get("securityContext") == LOCKED_DOWN, name
                assert not container.get("securityContext", {}).get("privileged"), name
                seen.append(container["name"])
    assert sorted(seen) == ["mlflow", "ray-head", "ray-job-submitter", "ray-worker"], seen


def test_ray_cluster_uses_token_auth():
    """KubeRay >= 1.5.1 `authOptions.mode: token`: the operator makes the token Secret and gives RAY_AUTH_MODE and
    RAY_AUTH_TOKEN to head, workers and (K8sJobMode) the submitter; it refuses a rayVersion below 2.52."""
    job = _one("RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(p) for p in cluster["rayVersion"].split(".")) >= (2, 52, 0)
    assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"  # the submitter pod gets the token
    import ray
    assert cluster["rayVersion"] == ray.__version__  # the version the image (and these tests) run
    for where, pod in _pod_specs(job["spec"], "RayJob"):
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env, where  # the operator's to set


def test_rayjob_entrypoint_is_a_run_the_cli_accepts_logging_to_the_mlflow_service():
    """The entrypoint is parsed by the CLI's own click command (unknown options fail here as they would in the
    pod), then its config is loaded as `harness run` loads it, without running anything."""
    import typer

    from harness.cli import app
    from runtime.config import load_config

    argv = _rayjob_argv()
    assert argv[:2] == ["harness", "run"]
    command = typer.main.get_command(app).commands["run"]
    params = command.make_context("harness run", argv[2:]).params  # a UsageError names what it rejects
    cfg = load_config(params["config"], params["overrides"] or [])  # ConfigError names any key it rejects
    assert cfg.stages_of(params["pipeline"])[-1] == "eval"
    assert cfg.failure.max_failures >= 1  # a lost worker pod resumes from the last checkpoint
    workers = _one("RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert cfg.resources.workers == sum(g["replicas"] for g in workers) and cfg.resources.use_gpu
    assert params["output_dir"].startswith("/shared/")  # the ReadWriteMany volume every Ray pod mounts
    service = _one("Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    assert cfg.tracking.uri == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"


def test_mlflow_store_is_on_its_own_volume_apart_from_the_rayjob():
    """The database and artifacts live on the PVC the Deployment mounts: nothing the RayJob owns, so its teardown
    leaves the history; one replica, replaced not rolled (two servers must never share the SQLite file)."""
    deploy = _one("Deployment", "mlflow")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    pod = deploy["spec"]["template"]["spec"]
    (mount,) = pod["containers"][0]["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    args = dict(a[2:].split("=", 1) for a in pod["containers"][0]["command"] if a.startswith("--") and "=" in a)
    assert args["backend-store-uri"].startswith(f"sqlite:///{mount['mountPath']}/")
    assert args["artifacts-destination"].startswith(f"{mount['mountPath']}/")
    # only vlmlab's pods get in; the Ray pods carry the label the policy admits
    policy = _one("NetworkPolicy", "mlflow")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"][
        "labels"].items()
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    cluster = _one("RayJob")["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert admitted.items() <= template["metadata"]["labels"].items()


def _request(url: str, host: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Host": host})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _serve(command: list[str], log: Path, port: int) -> subprocess.Popen:
    """The container's command on this machine (the venv's MLflow is the image's: same pins)."""
    argv = [str(Path(sys.executable).with_name(command[0])), *command[1:]]
    with open(log, "a") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", server, "mlflow server", 240, log=log)  # 20-60 s on 2 busy cores
    return server


@pytest.mark.slow  # starts an `mlflow server` (scripts/test --fast leaves it out)
def test_mlflow_server_as_deployed_takes_the_rayjobs_writes_and_keeps_them(tmp_path):
    """The Deployment's own command, with its volume at tmp_path and 127.0.0.1 for 0.0.0.0: requests addressed to
    the RayJob's tracking URI are served (a foreign Host header is refused), and the run, its metric and an artifact
    uploaded through the server are all on the volume once the server is gone (a pod replaced, a RayJob torn down)."""
    from mlflow.tracking import MlflowClient

    deploy = _one("Deployment", "mlflow")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    volume = container["volumeMounts"][0]["mountPath"]
    port = free_port()
    command = [a.replace(f"{volume}/", f"{tmp_path}/").replace("--host=0.0.0.0", "--host=127.0.0.1")
               .replace("--port=5000", f"--port={port}") for a in container["command"]]
    assert command[:2] == ["mlflow", "server"] and f"--port={port}" in command and "--host=127.0.0.1" in command
    job_uri = next(a.split("=", 1)[1] for a in _rayjob_argv() if a.startswith("tracking.uri="))
    job_host = job_uri.removeprefix("http://")
    base = f"http://127.0.0.1:{port}"

    start = time.time()
    server = _serve(command, tmp_path / "mlflow.log", port)
    try:
        print(f"mlflow server up in {time.time() - start:.0f} s")
        status, body = _request(f"{base}/api/2.0/mlflow/experiments/create", job_host, "POST",
                                json.dumps({"name": "vlmlab"}).encode())
        assert status == 200, body
        experiment_id = json.loads(body)["experiment_id"]
        status, _ = _request(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", "evil.example")
        assert status == 403  # MLflow's DNS-rebinding guard is on: only the hosts the manifest names get in
        client = MlflowClient(tracking_uri=base)  # as through `kubectl port-forward`
        run = client.create_run(experiment_id)
        client.log_metric(run.info.run_id, "eval/vqa_accuracy", 0.5)
        (tmp_path / "result.json").write_text('{"ok": true}')
        client.log_artifact(run.info.run_id, str(tmp_path / "result.json"))
        client.set_terminated(run.info.run_id)
        status, body = _request(f"{base}/get-artifact?path=result.json&run_uuid={run.info.run_id}", job_host)
        assert status == 200 and body == b'{"ok": true}'
    finally:
        stop_session(server, signal.SIGTERM)  # the server and its uvicorn workers
    # what a new server on the same volume would read: the database and the artifact files
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # clients upload through the server
    stored = list((tmp_path / "artifacts").rglob("result.json"))
    assert [p.read_text() for p in stored] == ['{"ok": true}']
    kept = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.info.run_id)
    assert kept.data.metrics["eval/vqa_accuracy"] == 0.5 and kept.info.status == "FINISHED"
