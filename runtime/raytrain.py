"""Ray plumbing in one place: start/attach Ray once per process, run a training loop as a TorchTrainer, run a
stage's shards as Ray tasks.

Locally this starts a Ray instance inside the process (reused by every stage and trial); under
`ray job submit` (RAY_ADDRESS set) it attaches to the cluster. Ray's public API only; the two uses of its private
API live in runtime/ray_private.py.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime import ray_private
from runtime.cost import gpu_alias
from runtime.errors import UserError
from runtime.manifest import hardware
from runtime.output import active_stage, forward_worker_output, worker_output

STATE_API_ENV = "VLMLAB_RAY_STATE_API"
_started_here = False  # this process started its own local Ray (which never grows), rather than attaching


def ensure_ray(dashboard: bool = False) -> None:
    """Start a local Ray (or attach to the cluster under `ray job submit`) once per process."""
    # torch's native libraries load before Ray's, as in every stage worker (seen: MKL failed to load libtorch_cpu.so
    # in a job driver that had attached to a cluster first)
    import torch  # noqa: F401, I001

    import ray


    if ray.is_initialized():
        return
    # under `harness run` the workers write their output to the run's logs (runtime/output.py); -v prints it here
    log_to_driver = forward_worker_output()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train's controller polls its workers every 2 s by default, and a finished stage waits several polls
    # (~6 s) before fit() returns. Each poll interrupts the training process, so faster is not free: 300 default
    # SFT steps took 78.5 s at 0.25 s, 74.2 s at 1 s, 75.8 s at 2 s (busy time, 2 runs each, 2 CPU cores).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    previous = signal.getsignal(signal.SIGTERM)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
    else:
        # A local instance shares the training cores: the dashboard (nine processes) and Ray Train's metrics export
        # are opt-in (ray.dashboard); a single machine is never preempted, so no preemption-watcher actor polls.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not dashboard:
            # Only the dashboard reads metrics and task events: without it every Ray process would still
            # collect and ship them, on the cores the training uses
            for name in ("RAY_TRAIN_METRICS_ENABLED", "RAY_enable_metrics_collection",
                         "RAY_task_events_report_interval_ms"):
                os.environ.setdefault(name, "0")
        # Ray ships every progress-bar redraw of a worker to the driver's console: one a second is plenty
        os.environ.setdefault("TQDM_MININTERVAL", "1")
        # glibc gives threads their own malloc arena only up to 8 per core. A Ray worker runs ~40 threads, so on a
        # small machine the training thread and its OpenMP helper came to share one arena and queued on its lock
        # (~2,000 sleeps a second each; 250 SFT steps on 2 cores: 0.285 -> 0.250 s/step with a wider limit).
        # Read when a process starts: Ray's processes inherit it, the running driver keeps its own arenas.
        os.environ.setdefault("MALLOC_ARENA_MAX", str(max(64, 8 * (os.cpu_count() or 1))))
        # Inherited by Ray's workers (sweep trials included): fit() drops the State API poller there
        os.environ[STATE_API_ENV] = "1" if dashboard else "0"
        ray.init(num_cpus=os.cpu_count(), include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=log_to_driver)
        global _started_here
        _started_here = True
        atexit.register(reap_hung_actors)  # runs before the atexit shutdown ray.init registered
    # ray.init installs a SIGTERM handler that just exits; keep the harness's (mark runs KILLED, say how to resume)
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def reap_hung_actors() -> list[int]:
    """SIGKILL the processes of actors Ray counts as dead that never exited; returns their PIDs.

    Ray 2.60's core worker can deadlock in its C++ exit handlers (a pubsub publisher, destroyed while the io_context
    shuts down, posts to that io_context's held lock). Seen on Ray Train controllers, 2 of the 8 trials of a sweep,
    each holding ~400 MB: once a local Ray stops they live on, orphaned, for good. Only this process's own
    descendants are touched.
    """
    import psutil
    import ray

    if not ray.is_initialized():
        return []
    try:
        dead = ray_private.dead_actor_pids()
    except Exception:  # the GCS is already gone: nothing left to ask
        return []
    mine = {proc.pid: proc for proc in psutil.Process().children(recursive=True)}
    reaped = []
    for pid in dead:
        proc = mine.get(pid)
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                reaped.append(proc.pid)
    return reaped


def scaling(resources) -> Any:
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                         resources_per_worker=worker_bundle(resources))


def worker_bundle(resources) -> dict[str, float]:
    """What one worker (a training rank, an eval or generation shard) asks Ray for."""
    bundle = {"CPU": float(resources.cpus_per_worker)}
    if resources.use_gpu:
        bundle["GPU"] = float(resources.gpus_per_worker)
    return bundle


def room_for(bundle: dict[str, float], nodes: list[dict]) -> int:
    """How many such bundles the nodes could hold in all (each bundle on one node), busy or not."""
    return sum(min(int(node.get(k, 0.0) // v) for k, v in bundle.items()) for node in nodes)


def _describe(nodes: list[dict]) -> str:
    if not nodes:
        return "no alive node"
    parts = [" ".join(f"{k} {node.get(k, 0):g}" for k in ("CPU", "GPU")) for node in nodes]
    return f"{len(nodes)} node(s): " + "; ".join(parts)


_PLACEABLE: set[tuple] = set()  # worker shapes this process has seen the cluster hold: checked once


def require_resources(resources, what: str) -> None:
    """Wait until the cluster has room for ``resources.workers`` workers, at most ``resources.placement_timeout_s``.

    Room means total capacity (busy nodes free up; a concurrent sweep trial is no reason to fail). A pending
    placement group is the demand an autoscaler grows the cluster for. A Ray this process started itself never
    grows, so it is answered at once. Raises UserError naming what is missing and what the cluster has.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group


    bundle = worker_bundle(resources)
    shape = (resources.workers, *sorted(bundle.items()))
    if shape in _PLACEABLE:
        return

    def nodes() -> list[dict]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    timeout = 0.0 if _started_here else resources.placement_timeout_s
    deadline = time.monotonic() + timeout
    group = None
    try:
        while room_for(bundle, nodes()) < resources.workers:
            if time.monotonic() >= deadline:
                want = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
                raise UserError(
                    f"resources: {what} needs {resources.workers} worker(s) of {{{want}}}, but after "
                    f"{timeout:g} s the cluster has room for {room_for(bundle, nodes())} ({_describe(nodes())}); "
                    "lower resources.workers / cpus_per_worker / gpus_per_worker, add nodes, or raise "
                    "resources.placement_timeout_s")
            if group is None:
                group = placement_group([bundle] * resources.workers, strategy="PACK")
            if group.wait(timeout_seconds=min(5.0, max(0.1, deadline - time.monotonic()))):
                break
    finally:
        if group is not None:
            remove_placement_group(group)
    _PLACEABLE.add(shape)


def deterministic(use_gpu: bool) -> None:
    """In a worker about to use its GPU: deterministic algorithms, as transformers' ``enable_full_determinism`` sets
    them (cuBLAS's fixed workspace, cuDNN without autotuning), but an op with no deterministic CUDA kernel warns
    (into the stage's log) instead of failing the stage. Before the first CUDA call: cuBLAS reads its workspace
    setting once. On CPU nothing changes: the same config and seed already give the same metrics."""
    if not use_gpu:
        return
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


_task_phases: dict[str, float] | None = None  # the running shard's seconds per phase (a Ray task process runs one
# task at a time); None outside run_shards' tasks, where phase() and add_phase() record nothing


def add_phase(name: str, seconds: float) -> None:
    """Inside a shard run by ``run_shards``: ``seconds`` of this task went to phase ``name`` (runtime.cost.PHASES),
    for the stage's split of its held time."""
    if _task_phases is not None:
        _task_phases[name] = _task_phases.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str):
    """Time the block as phase ``name`` of the running shard (see add_phase)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add_phase(name, time.perf_counter() - start)


def _on_worker(fn: Callable, shard, use_gpu: bool, threads: int, log=None) -> dict:
    """One shard of work inside a Ray task: ``fn(shard, device)``, where it ran, when it began (Unix time) and its
    seconds per phase. ``log``: where the task's output goes (a runtime.output.WorkerLog; None: Ray's own worker log,
    forwarded to the driver)."""
    global _task_phases
    began, _task_phases = time.time(), {}
    try:
        with phase("start"):  # a fresh worker process imports torch here
            import ray
            import torch

            torch.set_num_threads(threads)
            deterministic(use_gpu)
        start = time.perf_counter()
        with worker_output(log):
            result = fn(shard, "cuda" if use_gpu else "cpu")  # Ray made only this task's GPUs visible
        return {"result": result, "seconds": time.perf_counter() - start, "began": began, "ended": time.time(),
                "phases": dict(_task_phases), "node_id": ray.get_runtime_context().get_node_id(),
                "device": torch.cuda.get_device_name(0) if use_gpu else "CPU", "hardware": hardware()}
    finally:
        _task_phases = None


def submit_shards(fn: Callable, shards: list, resources, stage: str, max_retries: int = 3,
                  logs: list | None = None) -> list:
    """Start ``fn(shard, device)`` once per shard as Ray tasks, each holding one worker's resources, so that a
    cluster's head (which has none) never runs one and the driver never loads a model. A task whose worker dies
    is retried (``max_retries``). Returns their ObjectRefs, in shard order; each comes to ``{result, seconds, began,
    ended, phases, node_id, device, hardware}``. Their output goes to the running stage's logs as ``<stage>.shard<k>``
    (or to ``logs``, one WorkerLog per shard, where no stage runs in this process: a task submitting shards).
    """
    import ray

    ensure_ray()
    require_resources(resources, f"stage '{stage}'")
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # placement_group=None: inside a Tune trial a task would otherwise land in the trial's own (CPU-less) bundle
    options = {"num_cpus": resources.cpus_per_worker, "max_retries": max_retries, "name": f"{stage}-shard",
               "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
    if resources.use_gpu:
        options["num_gpus"] = resources.gpus_per_worker
    task = ray.remote(_on_worker).options(**options)
    threads = max(1, int(resources.cpus_per_worker))
    if logs is None:
        live = active_stage()
        logs = [live.worker_log(f"shard{i}", label=stage) if live else None for i in range(len(shards))]
    return [task.remote(fn, shard, resources.use_gpu, threads, log) for shard, log in zip(shards, logs, strict=True)]


def spare_workers(resources, busy_workers: int) -> int:
    """How many more workers of ``resources``' shape the cluster has room for now, beyond ``busy_workers`` about to
    start (a stage's training ranks): what is free on each live node, each worker on one node. (Ray started.)"""
    return max(0, room_for(worker_bundle(resources), ray_private.free_per_node()) - busy_workers)


def run_shards(fn: Callable, shards: list, resources, stage: str, max_retries: int = 3) -> list[dict]:
    """``submit_shards`` and wait for them all, the running stage's progress on the console. Returns, in shard order,
    what each task returned."""
    import ray

    refs = submit_shards(fn, shards, resources, stage, max_retries)
    live = active_stage()  # the running stage: where its workers log, and its progress on the console
    pending, finished = list(refs), 0
    if live:
        live.update(0, len(refs), label=stage)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # a failed shard (retries spent) fails the stage at once
        finished += len(ready)
        if live:
            live.update(finished, len(refs), label=stage)
    return ray.get(refs)


def run_held(fn: Callable, jobs: list, cfg, meter, stage: str) -> list[dict]:
    """``run_shards`` for a stage: Ray started first (starting it holds no device), then the stage's devices held on
    ``meter`` while the shards run, their phases added to it, and the device model they actually ran on recorded
    (``meter.device``)."""

    ensure_ray(cfg.ray.dashboard)
    with meter.hold(devices_held(cfg.resources), "CPU"):
        done = run_shards(fn, jobs, cfg.resources, stage)
    per_worker = meter.devices / cfg.resources.workers
    # The first task on each of the `workers` slots waited for its placement and process since the hold began (start);
    # a later task's wait for its slot is the tail of another task, counted as idle.
    for rank, d in enumerate(sorted(done, key=lambda d: d["began"])):
        meter.add_worker(d["began"] if rank < cfg.resources.workers else meter.hold_began, d["phases"], per_worker)
    if done:
        meter.device = gpu_alias(done[0]["device"])
    return done


def devices_held(resources) -> float:
    """How many priced devices a stage holds: GPUs, or CPU cores on a CPU run."""
    per = resources.gpus_per_worker if resources.use_gpu else resources.cpus_per_worker
    return resources.workers * per


def _tune_callbacks() -> list:
    """Inside a Ray Tune trial, forward the training reports (loss...) to Tune, e.g. for ASHA."""
    try:
        from ray.tune.integration.ray_train import TuneReportCallback

        return [TuneReportCallback()]
    except RuntimeError:  # not in a Tune session
        return []


def in_tune_trial() -> bool:
    """Whether this process runs a Ray Tune trial (whose resources are the trial's, not the cluster's to spare)."""
    return bool(_tune_callbacks())


def worker_runtime_env(stage_cfg) -> dict | None:
    """The Ray runtime_env for a training stage's workers (None: the driver's own environment)."""
    env = {k: v for k, v in stage_cfg.runtime_env.model_dump(exclude_none=True).items() if v}
    return env or None


def _logged(loop: Callable[[dict], None], live, stage: str, ranks: int) -> Callable[[dict], None]:
    """``loop`` with each rank's output in the run's logs (``ray/<stage>.rank<k>.log``); rank 0 also reports its
    progress to the driver's console (harness/console.py)."""
    logs = [live.worker_log(f"rank{rank}", progress=rank == 0, label=stage) for rank in range(ranks)]

    def train_loop_with_logs(config: dict) -> None:
        import ray.train

        with worker_output(logs[ray.train.get_context().get_world_rank()]):
            loop(config)

    return train_loop_with_logs


def fit(loop: Callable[[dict], None], settings, storage: Path | str, name: str, model_out: Path,
        max_failures: int = 0, runtime_env: dict | None = None, validation=None) -> dict:
    """Run ``loop({"settings": settings})`` on Ray Train workers; copy the final checkpoint (the trained model) to
    ``model_out``. Returns the last report's metrics and ``model_copy_seconds`` (that copy). ``storage`` is a
    directory or a bucket URI (s3://...).
    ``validation``: a ray.train ValidationConfig for the checkpoints reported with ``validation`` (Ray runs it as a
    task per checkpoint while training goes on; fit returns once every one has finished).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    ensure_ray()  # normally already started by the stage, with its config
    require_resources(settings.resources, f"stage '{settings.prefix}'")
    live = active_stage()
    if live is not None and live.worker_log("rank0") is not None:  # each rank writes its output to the run's logs
        loop = _logged(loop, live, settings.prefix, settings.resources.workers)
    trainer = ray_private.trainer_class(os.environ.get(STATE_API_ENV) == "0")(
        loop, train_loop_config={"settings": settings}, scaling_config=scaling(settings.resources),
        run_config=RunConfig(name=name, storage_path=storage if isinstance(storage, str) else str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=_tune_callbacks(), worker_runtime_env=runtime_env),
        validation_config=validation,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name}: training finished without a final checkpoint")
    copying = time.perf_counter()
    result.checkpoint.to_directory(str(model_out))
    return dict(result.metrics or {}) | {"model_copy_seconds": time.perf_counter() - copying}
