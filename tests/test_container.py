"""The Dockerfile, checked statically (the image build and in-container run are measured by hand; see README)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed (pip install -e '.[dev]')")
def test_dockerfile_passes_hadolint():
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
