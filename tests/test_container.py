"""The Dockerfile and the KubeRay manifest, checked statically (hadolint, user, secrets, a command the CLI takes)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


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


def test_kuberay_job_uses_the_image_and_a_valid_harness_command():
    import shlex

    import yaml

    from harness.config import load_config

    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    pods = [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["containers"][0]["image"].startswith("vlmlab:")
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["harness", "run", "dpo"]
    overrides = [a for a in argv[3:] if "=" in a and not a.startswith("--")]
    cfg = load_config(None, overrides)  # raises ConfigError naming any key the CLI would reject
    assert cfg.resources.workers == 4 and cfg.resources.use_gpu
    assert "dpo" in cfg.pipelines
