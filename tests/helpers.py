"""Helpers the test modules share (fixtures stay in conftest.py): import them as `from helpers import ...`."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAST_ENV = "VLMLAB_TESTS_FAST"  # set by conftest under `scripts/test --fast`


def property_settings(examples: int = 200):
    """Hypothesis settings of vlmlab's property tests: seeded, no example database, no deadline; ``examples`` draws
    in the suite, a quarter of them in `scripts/test --fast` (the inner loop's two minutes)."""
    from hypothesis import HealthCheck, settings

    fast = os.environ.get(FAST_ENV) == "1"
    return settings(max_examples=max(25, examples // 4) if fast else examples, derandomize=True, database=None,
                    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
REALDATA = ROOT.parent / "shared" / "realdata"
TASK_DIR = ROOT / "evals" / "tasks"


def task_hooks(task: str) -> ModuleType:
    """``evals/tasks/<task>/utils.py``, loaded by path as lm-eval's `!function utils.<name>` loads it."""
    spec = importlib.util.spec_from_file_location(f"vlmlab_{task}_hooks", TASK_DIR / task / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_yaml(task: str, protocol: str) -> dict:
    """The task's YAML as lm-eval reads it (its `include:` merged under it), `!function` hooks left as names."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(TASK_DIR / task / f"{protocol}.yaml", resolve_func=False)


def loopback_only() -> bool:
    """True inside a network namespace whose only interface is lo (how scripts/test runs the suite)."""
    return sorted(name for _, name in socket.if_nameindex()) == ["lo"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (closed again: bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    """``predicate()``'s first truthy answer, asked every ``every`` s; an AssertionError naming ``what`` after
    ``timeout``."""
    end = time.time() + timeout
    while time.time() < end:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 180, log: Path | None = None,
              any_status: bool = False) -> None:
    """Wait until ``url`` answers (a 2xx; with ``any_status`` any HTTP answer, e.g. a 401 for an unauthenticated
    call, counts as up), failing at once if ``proc`` (the server) exits, with the tail of its ``log`` if it has one."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited" + (f":\n{log.read_text()[-3000:]}" if log else "")
        assert time.time() < deadline, f"{what} did not come up within {timeout:.0f} s"
        time.sleep(0.5)


def stop_session(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> None:
    """Stop a process we started with ``start_new_session=True`` and everything it started, and wait until all of
    it is gone. Its session, not its process group: Ray gives each worker its own group, so a group kill leaves the
    Ray Train controller alive long enough to register one more checkpoint after the test has looked."""
    import psutil

    ours = []
    for candidate in psutil.process_iter():
        try:
            if candidate.pid != proc.pid and os.getsid(candidate.pid) == proc.pid:
                ours.append(candidate)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.send_signal(sig)
    for member in ours:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=timeout)  # through Popen, which keeps its exit code

    def running(member) -> bool:  # a zombie has stopped writing; whoever adopted it reaps it, not us
        try:
            return member.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.monotonic() + timeout
    while alive := [m for m in ours if running(m)]:
        assert time.monotonic() < deadline, f"still running {timeout} s after signal {sig}: {alive}"
        time.sleep(0.1)


def tiny_overrides(**extra) -> list[str]:
    """The default preset shrunk to seconds: small data, few steps, its VQA and ChartQA tasks only (every other
    registered task dropped, so adding a task to the preset leaves these tests as they are). A task that ``extra``
    sizes is kept."""
    from evals.registry import TASKS

    base = {f"data.tasks.{kind}": "null" for kind in TASKS if kind not in ("vqa", "chartqa")
            and not any(key.startswith(f"data.tasks.{kind}.") for key in extra)}
    base |= {
        "data.tasks.vqa.train_size": 64, "data.tasks.vqa.test_size": 16, "data.tasks.chartqa.train_size": 64,
        "data.tasks.chartqa.test_size": 16, "sft.max_steps": 4, "sft.batch_size": 8, "sft.save_steps": 2,
        "sft.logging_steps": 1, "sft.warmup_steps": 0, "eval.batch_size": 16,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --- a real `mlflow server` ----------------------------------------------------------------------------------------

@dataclass
class MlflowServer:
    """A running `mlflow server` on 127.0.0.1: its SQLite store is ``db``, its artifacts are under ``root``."""

    root: Path
    port: int
    proc: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.root / "store.db"


def start_mlflow_server(root: Path, port: int | None = None, timeout: float = 180) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 (on ``port``, or a free one) with its SQLite store and artifact directory in
    ``root``, once its /health answers (20-60 s on 2 busy cores). One worker (each worker starts cold: seconds per
    first request here) and no job runner (8 more processes, ~240 MB each, that tracking does not use). Started in a
    session of its own: stop it with ``stop_session(server.proc, ...)`` (SIGTERM to stop it, SIGKILL to make it die);
    started again on the same root and port, it serves what it stored before."""
    root = Path(root)
    port = free_port() if port is None else port
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=root,
                            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, "mlflow server", timeout)
    except BaseException:
        stop_session(proc)
        raise
    return MlflowServer(root, port, proc)


class Partition:
    """A TCP forwarder to the MLflow server that the test can cut (connections refused, open ones dropped) and
    restore on the same port: a network outage between one client and the server."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
            except OSError:
                pass
            s.close()
        self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# --- a pipeline's run directory and local store, as faults leave them ----------------------------------------------

SLOW_SFT = {"sft.max_steps": 40, "sft.save_steps": 10, "sft.batch_size": 8}


def local_runs(root: Path) -> tuple:
    """A client of ``root``'s SQLite store (``root/mlflow.db``, as the ``workdir`` fixture sets it) and every run of
    its `vlmlab` experiment (none if there is no such experiment)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlmlab")
    return client, (client.search_runs([exp.experiment_id], max_results=1000) if exp else [])


def checkpoints(root: Path, stage: str = "sft") -> list[Path]:
    """The checkpoint directories Ray Train has begun writing for ``stage`` of the runs under ``root/runs``."""
    return sorted((root / "runs" / ".cache" / "ray").glob(f"{stage}-*/checkpoint_*"))


def registered_checkpoint(root: Path, stage: str = "sft", count: int = 1) -> bool:
    """Ray has registered at least ``count`` checkpoints of the stage (not just begun writing one)."""
    for snapshot in (root / "runs" / ".cache" / "ray").glob(f"{stage}-*/checkpoint_manager_snapshot.json"):
        try:
            if len(json.loads(snapshot.read_text()).get("checkpoint_results", [])) >= count:
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


# --- the console of `harness run` (#26) ------------------------------------------------------------------------------

# What reached the console before: Ray workers' forwarded lines, progress bars, Ray's and lm-eval's warnings, git's
# complaint outside a checkout, the summary's missing base score
LEAKS = ("pid=", "it/s]", "examples/s]", "Token authentication", "fatal: not a git repository",
         "HF model type is neither marked", "base nan", "INFO", "Creating parquet")


def run_without_tty(argv: list[str], cwd, env: dict, timeout: float = 3600) -> tuple[list[tuple[float, str]], int]:
    """Run ``argv`` with its output on a pipe (no TTY): its non-empty lines with the time each arrived, its exit
    code."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), ln.rstrip("\n")))
                                              for ln in proc.stdout], daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_session(proc)
    reader.join(timeout=30)
    if code is None:
        pytest.fail(f"{' '.join(argv)} still running after {timeout:.0f} s; its output so far:\n"
                    + "\n".join(ln for _, ln in lines))
    return [(t, ln) for t, ln in lines if ln.strip()], code


def check_default_run(workdir, lines: list[tuple[float, str]], code: int, shown_workdir=None) -> dict:
    """#26's acceptance on the default `harness run dpo` (full preset) without a TTY: the sft pipeline's share of the
    console (every line but the dpo stage's own) within #26's 40 non-empty lines, none of them a library's; each
    training stage's progress at most one line per 10 % of its steps and per 30 s; the run's logs hold one file per
    stage and what the workers printed. Takes the run's (arrival time, non-empty line) pairs, its exit code, its
    workdir and that workdir's path as the run saw it (in a container: the volume's mount point); returns the run's
    result.json. test_docker runs it on the README's container command."""
    from runtime.config import load_config

    cfg = load_config(None)
    text = "\n".join(ln for _, ln in lines)
    assert code == 0, text[-5000:]
    assert not [leak for leak in LEAKS if leak in text], text
    # the dpo stage's own lines: its progress, its done line and its row of the summary table (folded: the row's
    # further lines have an empty stage cell)
    own, in_row = 0, False
    for _, ln in lines:
        in_row = bool(re.match(r"│\s+dpo │", ln)) or (in_row and bool(re.match(r"│\s+│", ln)))
        own += in_row or bool(re.match(r"(dpo +\d+/|stage dpo done in )", ln))
    assert len(lines) - own <= 40, text
    for stage in ("data", "model", "sft", "dpo", "eval"):
        assert sum(ln.startswith(f"stage {stage} done in ") for _, ln in lines) == 1, text
    for stage, steps in (("sft", cfg.sft.max_steps), ("dpo", cfg.dpo.max_steps)):
        progress = [(t, ln) for t, ln in lines if re.match(rf"{stage} +\d+/{steps} ", ln)]
        assert progress, text  # a stage of minutes shows its progress
        percents = [int(re.search(r"(\d+)%", ln).group(1)) // 10 for _, ln in progress]
        assert percents == sorted(set(percents)), text  # at most one line per 10 % of the steps ...
        assert all(b - a >= 29 for (a, _), (b, _) in zip(progress, progress[1:], strict=False)), text  # ... and 30 s
        if stage == "sft":  # the training loss, throughput, time left and dollars so far
            assert all(re.search(r"loss \d+\.\d{3}  [\d.]+ samples/s  ETA \w+  \$\d\.\d{4}$", ln)
                       for _, ln in progress[1:]), text

    run_dir = next((workdir / "runs").glob("*/result.json")).parent
    shown = run_dir if shown_workdir is None else shown_workdir / run_dir.relative_to(workdir)
    assert str(shown) in "".join(text.split()), text  # the summary names it (rich may fold a long path)
    logs = run_dir / "logs"
    assert {p.name for p in logs.glob("*.log")} == {f"{name}.log" for name in ("run", "data", "model", "sft", "dpo",
                                                                               "eval")}
    workers = {p.name: p.read_text(errors="replace") for p in (logs / "ray").glob("*.log")}
    assert "{'loss': " in workers["sft.rank0.log"]  # TRL's loss lines, from the training workers
    assert "dpo.rank0.log" in workers
    assert any(name.startswith("eval.shard") for name in workers)  # and the eval shards' lm-eval output
    assert "Started a local Ray instance" in (logs / "sft.log").read_text()  # Ray's own lines, in the driver's log
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["metrics"]["sft/steps"], result["metrics"]["dpo/steps"]) == (cfg.sft.max_steps, cfg.dpo.max_steps)
    return result


def reference_run(pipeline: str, manifest: dict) -> tuple[Path, dict]:
    """The committed reference run of ``pipeline`` (results/reference/) to hold a run whose manifest is ``manifest``
    to: the one recorded on the same CPU, instruction set and threads (harness reproduce's exact case), else the one
    recorded before vlmlab kept where it ran (results/reference/<pipeline>.json). Long CPU runs do not carry across
    CPUs: the default dpo gave mean accuracy 0.505 on that reference's host and 0.596 on an AVX2 one."""
    from harness.reproduce import tolerance_for

    legacy = ROOT / "results" / "reference" / f"{pipeline}.json"
    for path in sorted((ROOT / "results" / "reference").glob(f"*/{pipeline}.json")):
        recorded = json.loads(path.read_text())
        if tolerance_for(recorded["manifest"], manifest)[0] == 0.0:
            return path, recorded
    return legacy, json.loads(legacy.read_text())


NODES_SCRIPT = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + float(sys.argv[2])
while True:
    alive = [{"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[3]) or time.time() > deadline:
        break
    time.sleep(1)
print(json.dumps(alive))
"""


@contextmanager
def local_cluster(worker_cpus: tuple[int, ...] = (1, 1)):
    """A multi-node Ray cluster on this machine, as a lab runs one: a head with nothing schedulable (0 CPUs, 0 GPUs),
    one worker node per entry of ``worker_cpus`` with that many CPUs (each its own raylet), token auth, and a real
    `mlflow server`, all on loopback. Yields its addresses (``address``: the dashboard, ``gcs``, ``tracking``), the
    ``env`` to reach it with, its ``tmp`` directory and the node ids of the ``head`` and the ``workers``. Used by
    tests/test_cluster.py and benchmarks/eval_scale.py; every process it started is killed on exit."""
    bin_dir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = tmp / "auth_token"  # Ray's token auth, with a token of this cluster's own (not ~/.ray's)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, mlflow_port = free_port(), free_port(), free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    names = ["head"] + [f"worker{i}" for i in range(1, len(worker_cpus) + 1)]

    def start(name: str, args: list[str]) -> subprocess.Popen:
        with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def own_ports() -> list[str]:
        # every node its own agent and metrics ports: Ray's defaults (52365 for the agent's HTTP server, the one job
        # submission talks to) collide with any other Ray on the machine, such as a test on the other xdist worker.
        # Seen: the head's agent never registered and every `ray job submit` answered "No available agent" for 180 s
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    try:
        head = start("head", [str(bin_dir / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=0",
                              "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                              f"--temp-dir={tmp / 'ray'}", *own_ports(), *common])
        address = f"http://127.0.0.1:{dashboard}"
        # any answer (even a 401 for an unauthenticated call) means it is up
        wait_http(f"{address}/api/version", head, "the Ray head's dashboard", log=tmp / "head.log", any_status=True)
        for i, cpus in enumerate(worker_cpus, 1):  # raylets on one machine: each its own temp dir (sockets) and
            # ports, else they collide (seen: "The current node timed out during startup")
            start(f"worker{i}", [str(bin_dir / "ray"), "start", f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus}",
                                 "--num-gpus=0", f"--temp-dir={tmp / f'w{i}'}", *own_ports(), *common])
        server = start("mlflow", [str(bin_dir / "mlflow"), "server", "--backend-store-uri",
                                  f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
                                  "--host", "127.0.0.1", "--port", str(mlflow_port)])
        # worker nodes took > 15 s to register on 2 busy cores: ask the GCS rather than sleep
        nodes = subprocess.run([sys.executable, "-c", NODES_SCRIPT, f"127.0.0.1:{gcs}", "240", str(len(names))],
                               env=env, capture_output=True, text=True, timeout=400)
        alive = json.loads(nodes.stdout.strip().splitlines()[-1]) if nodes.returncode == 0 else []
        logs = "".join(f"\n--- {n}.log\n" + (tmp / f"{n}.log").read_text()[-1500:] for n in names)
        assert len(alive) == len(names), nodes.stdout[-2000:] + nodes.stderr[-2000:] + logs
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", server, "mlflow server", 240, log=tmp / "mlflow.log",
                  any_status=True)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "tmp": tmp,
               "tracking": f"http://127.0.0.1:{mlflow_port}",
               "head": {n["id"] for n in alive if n["cpus"] == 0}, "workers": {n["id"] for n in alive if n["cpus"]}}
    finally:
        for proc in procs:  # SIGKILL: `ray start --block` takes ~30 s to stop its node on SIGTERM
            stop_session(proc)
        shutil.rmtree(tmp, ignore_errors=True)
