"""The real image: a private dockerd, a locally made Debian base, the real Dockerfile, `harness run dpo` inside.

The build needs the network (pip, the Debian mirror), which the loopback-only namespace of scripts/test lacks.
scripts/test therefore keeps a handle on the machine's network namespace (`VLMLAB_HOST_NETNS`: fd 9 of the pytest
process, reached through /proc by its xdist workers, which inherit no descriptors), and only dockerd and the build
script enter it. dockerd listens on a unix socket only (no TCP, no bridge, no iptables) and
every container runs with `--network none`. Its data root is a cache under ~/.cache/vlmlab, so later runs on this
machine reuse the base image and the dependency layer; with an empty cache everything is built from nothing.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, check_default_run, loopback_only, reference_run, run_without_tty

from evals.registry import TASKS
from runtime.config import load_config

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmlab" / "docker"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
IMAGE = "vlmlab:ci"


def _with_network(argv: list[str]) -> list[str]:
    """argv run in the machine's network namespace when the suite runs in a loopback-only one."""
    if not loopback_only():
        return argv
    return ["nsenter", f"--net={os.environ['VLMLAB_HOST_NETNS']}", *argv]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "dockerd needs root"
    for tool in ("dockerd", "debootstrap", "nsenter"):
        if not shutil.which(tool):
            return f"{tool} is not installed (scripts/test installs docker.io and debootstrap where apt can)"
    if loopback_only() and not Path(os.environ.get("VLMLAB_HOST_NETNS") or "/nonexistent").exists():
        return "the image build needs the network: run the suite through scripts/test"
    return None


@pytest.fixture(scope="module")
def docker_env():
    """A private dockerd (overlay2) on a unix socket; stopped afterwards by its PID."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / "lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one dockerd per data root: a second CI run on this machine waits here
    run_dir = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))  # short: the socket path must stay < 108 chars
    sock = run_dir / "docker.sock"
    argv = _with_network([
        "dockerd", f"--host=unix://{sock}", f"--data-root={CACHE / 'data'}", f"--exec-root={run_dir / 'exec'}",
        f"--pidfile={run_dir / 'pid'}", "--storage-driver=overlay2", "--iptables=false", "--ip6tables=false",
        "--bridge=none"])
    with open(run_dir / "dockerd.log", "w") as log:
        daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER": DOCKER, "VLMLAB_IMAGE": IMAGE}
    try:
        deadline = time.time() + 60
        while subprocess.run([DOCKER, "info"], env=env, capture_output=True).returncode != 0:
            assert daemon.poll() is None, (run_dir / "dockerd.log").read_text()[-3000:]
            assert time.time() < deadline, "dockerd did not come up"
            time.sleep(1)
        yield env
    finally:
        subprocess.run([DOCKER, "image", "prune", "-f"], env=env, capture_output=True)  # superseded builds
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        lock.close()


@pytest.fixture(scope="module")
def image(docker_env):
    """`scripts/build-image --local-base`: debootstrap base (cached) + the real Dockerfile, tagged vlmlab:ci."""
    argv = _with_network([str(ROOT / "scripts" / "build-image"), "--local-base"])
    start = time.time()
    build = subprocess.run(argv, env=docker_env, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    size = json.loads(_docker(docker_env, "image", "inspect", IMAGE).stdout)[0]["Size"]
    print(f"image {IMAGE}: built in {time.time() - start:.0f} s, {size / 1e9:.2f} GB")
    return IMAGE


def _docker(env, *args, timeout=120) -> subprocess.CompletedProcess:
    out = subprocess.run([DOCKER, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"docker {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


# The long test comes first: under scripts/test's two workers, a worker takes on another file once its current one
# has at most two tests left, and this file's other tests are short.
def test_harness_run_dpo_default_preset_in_the_container(docker_env, image, tmp_path):
    """The README's Docker command, `harness run dpo` on the embedded default preset: its console is #26's page (no
    TTY in `docker run` without -t), it reproduces the host's reference, results and the MLflow DB land on the
    volume; the same command in a new container then reuses every stage from the volume's cache. (One pipeline
    run: an sft run first and a dpo run after it cost another eval stage and cold start, ~90 s here, and showed
    nothing this does not.)"""
    volume = tmp_path / "work"
    volume.mkdir()
    os.chown(volume, 1000, 1000)
    docker_run = [DOCKER, "run", "--rm", "--network", "none", "--shm-size=2g", "-v", f"{volume}:/work", image]
    if os.environ.get("OMP_WAIT_POLICY"):  # scripts/test's: the container shares the cores with the other tests
        docker_run[2:2] = ["-e", f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"]
    start = time.time()
    lines, code = run_without_tty([*docker_run, "harness", "run", "dpo"], ROOT, docker_env, timeout=2400)
    print(f"in-container `harness run dpo` (default preset): {time.time() - start:.0f} s")
    result = check_default_run(volume, lines, code, shown_workdir=Path("/work"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert result["manifest"]["git"]["sha"] == head
    # same pins, same CPU arithmetic: the container reproduces the host's reference run of the default preset made on
    # its CPU (a CI host is one of two kinds so far; each has its reference)
    path, recorded = reference_run("dpo", result["manifest"])
    reference, where = recorded["metrics"], f"{path.relative_to(ROOT)}, here {result['manifest'].get('reproduction')}"
    metrics = result["metrics"]
    tasks = [TASKS[name] for name, spec in load_config(None).data.tasks.items() if spec is not None]  # the preset's
    keys = [f"eval/{prefix}{t.metric}" for t in tasks for prefix in ("", "sft_")] + ["dpo/reward_accuracy"]
    for key in keys:
        assert abs(metrics[key] - reference[key]) <= 0.01, (key, metrics[key], reference[key], where)
    assert metrics["dpo/reward_margin_end"] > metrics["dpo/reward_margin_start"]

    start = time.time()
    again = subprocess.run([*docker_run, "harness", "run", "dpo"], env=docker_env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    print(f"in-container `harness run dpo` again (every stage from the volume's cache): {time.time() - start:.0f} s")
    results = [json.loads(p.read_text()) for p in sorted((volume / "runs").glob("*/result.json"))]
    assert len(results) == 2 and results[0]["run_id"] == result["run_id"], results
    assert results[1]["reused_stages"] == ["data", "model", "sft", "dpo", "eval"]
    assert results[1]["metrics"] == metrics
    # the MLflow store is on the volume: each run's parent and one child per stage, all FINISHED
    with sqlite3.connect(volume / "mlflow.db") as db:
        statuses = db.execute("SELECT r.status, t.value FROM runs r LEFT JOIN tags t ON t.run_uuid = r.run_uuid "
                              "AND t.key = 'mlflow.parentRunId'").fetchall()
    assert statuses and all(status == "FINISHED" for status, _ in statuses), statuses
    assert sum(parent is None for _, parent in statuses) == 2 and len(statuses) == 12, statuses


def test_image_runs_as_non_root_and_carries_no_secret_or_build_cache(docker_env, image):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    labels = json.loads(_docker(docker_env, "image", "inspect", image).stdout)[0]["Config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == head
    help_text = _docker(docker_env, "run", "--rm", "--network", "none", image, "harness", "--help").stdout
    assert "run" in help_text and "sweep" in help_text and "leaderboard" in help_text
    whoami = _docker(docker_env, "run", "--rm", "--network", "none", image, "id", "-u").stdout.strip()
    assert whoami == "1000"
    # no pip caches, wheels or build secret left behind (BuildKit leaves the bind mounts' points as empty dirs)
    leftovers = _docker(docker_env, "run", "--rm", "--network", "none", "--user", "0", image, "sh", "-c",
                        "for p in /root/.cache/pip /home/vlmlab/.cache/pip /opt/vlmlab/wheels /wheels /run/secrets "
                        "/tmp/requirements.txt; do [ -f $p ] || [ -n \"$(ls -A $p 2>/dev/null)\" ] && echo $p; "
                        "done; true").stdout
    assert leftovers.strip() == "", leftovers
    # the proxy's CA bundle was a build secret: none of this machine's extra CAs is in the image's trust store
    store = "".join(_docker(docker_env, "run", "--rm", "--network", "none", image, "sh", "-c",
                            "cat /etc/ssl/certs/*.pem 2>/dev/null; true").stdout.split())
    assert len(store) > 10_000, "the image has no CA store to check"
    extra_cas = list(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    for extra_ca in extra_cas:
        body = "".join(extra_ca.read_text().split("-----")[2].split())
        assert body[:200] not in store, f"{extra_ca} is in the image"
    assert "BEGIN" not in _docker(docker_env, "history", "--no-trunc", image).stdout


def test_runtime_user_has_no_sudo_though_the_base_gave_it_one(docker_env, image):
    """rayproject/ray makes uid 1000 a passwordless sudoer, and scripts/build-image's local base does the same, so
    the first check is a real control: the image built on it must have taken that away."""
    base = re.search(r"^BASE=(\S+)$", (ROOT / "scripts" / "build-image").read_text(), flags=re.M).group(1)
    control = subprocess.run([DOCKER, "run", "--rm", "--network", "none", "--user", "1000", base, "sudo", "-n", "true"],
                             env=docker_env, capture_output=True, text=True, timeout=120)
    assert control.returncode == 0, f"the base's uid 1000 should have passwordless sudo: {control.stderr}"
    denied = subprocess.run([DOCKER, "run", "--rm", "--network", "none", image, "sudo", "-n", "true"],
                            env=docker_env, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0, "the image's runtime user can sudo"
    left = _docker(docker_env, "run", "--rm", "--network", "none", image, "sh", "-c",
                   "command -v sudo; ls /etc/sudoers /etc/sudoers.d 2>/dev/null; true").stdout
    assert left.strip() == "", left
