"""`harness reproduce`: rerun a recorded run's config from scratch and compare metric by metric."""
from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import ValidationError

from evals.registry import TASKS
from evals.rewards import BUILTIN
from harness.codeprint import code_manifest, dependency_versions
from runtime.config import PipelineConfig, format_errors
from runtime.errors import ConfigError, UserError
from runtime.records import read_result
from runtime.secrets import placeholders, restore
from stages import STAGES

# Metrics that measure the machine, not the result: never compared.
TIMING_MARKERS = ("per_second", "runtime", "wall", "seconds", "cost/", "_unix")
# How close a rerun must come, by where both ran (manifest["reproduction"]). On a 0-1 metric (eval/*) the tolerance is
# absolute; elsewhere (losses, margins) relative to the recorded value, of the same size.
GPU_TOLERANCE = 0.005  # cuBLAS and cuDNN pick kernels and reduction orders per card, driver and library version
CPU_TOLERANCE = 0.02  # another CPU model, instruction set or thread count: oneDNN's and torch's kernels differ across
# them, and a greedy answer that flips on one item of 300 moves a task's score by 0.003: two items in a hundred. A long
# training run can drift much further (measured, the default `harness run dpo` at the same commit on two hosts that
# both print "AMD EPYC": mean accuracy 0.505 and 0.596, DocVQA 0.37 and 0.67): the message says to rerun on the
# recorded CPU to check exactly
MANIFEST_FIELDS = ("git", "packages", "packages_sha256", "hardware", "data_fingerprints", "model_weights_sha256")


def load_result(target: str) -> tuple[dict, Path]:
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / "result.json"
    if not path.is_file():
        raise UserError(f"no result.json at {target}: give a run directory or its result.json")
    return read_result(path), path


def untrusted(config: dict) -> list[str]:
    """What in a recorded config would run code or change the workers' environment: custom GRPO rewards,
    trust_remote_code, a stage's runtime_env (env vars such as LD_PRELOAD, a container image)."""

    sections = {name: value for name, value in config.items() if isinstance(value, dict)}
    found = [f"grpo.rewards: {spec}" for spec in sections.get("grpo", {}).get("rewards") or []
             if spec not in BUILTIN]
    if sections.get("model", {}).get("trust_remote_code"):
        found.append("model.trust_remote_code: true")
    for stage, section in sections.items():
        env = section.get("runtime_env")
        if isinstance(env, dict) and any(env.values()):
            found.append(f"{stage}.runtime_env: {', '.join(k for k, v in env.items() if v)}")
    return found


def recorded_config(recorded: dict, path: Path, trust: bool):
    """The recorded run's config, ready to rerun: user code only with ``trust``, secrets back from the environment."""

    risky = untrusted(recorded["config"])
    if risky and not trust:
        raise UserError(f"{path} asks to run code or set the workers' environment ({'; '.join(risky)}); "
                        "read it, and rerun with --trust if you trust whoever made it")
    missing = sorted(name for name in placeholders(recorded["config"]) if name not in os.environ)
    if missing:
        raise UserError(f"{path}: the recorded run used secrets that were kept out of result.json; set "
                        f"{', '.join(missing)} in the environment to the values it used, then rerun")
    config = restore(recorded["config"], os.environ) | {"run_name": None}
    if recorded.get("fit"):  # its batch sizes were fitted to its device: rerun them as chosen
        config["resources"] = {**config.get("resources", {}), "fit": "off"}
    try:
        return PipelineConfig.model_validate(config)
    except ValidationError as exc:
        fix = "it no longer validates: rerun it with the vlmlab version of its manifest"
        raise ConfigError(format_errors(exc, f"the config recorded in {path}", fix)) from None


def _layout_moves() -> dict[str, tuple[str, ...]]:
    """Where each file of the layout before the runtime/ floor (vlmlab's issue #34) lives now: the files a stage
    recorded then, under their new paths (one old file may have become several)."""
    moves: dict[str, tuple[str, ...]] = {"harness/__init__.py": ("runtime/__init__.py",)}
    for name in ("config", "cost", "errors", "manifest", "secrets", "tracking", "output"):
        moves[f"harness/{name}.py"] = (f"runtime/{name}.py",)
    moves["harness/lease.py"] = ("runtime/lease.py", "runtime/atomic.py")
    moves["harness/raytrain.py"] = ("runtime/raytrain.py", "runtime/ray_private.py")
    for task in TASKS:
        for protocol in ("short", "lmms"):
            moves[f"evals/tasks/{task}_{protocol}.yaml"] = (f"evals/tasks/{task}/{protocol}.yaml",
                                                            "evals/tasks/_template.yaml")
    moves["evals/tasks/utils.py"] = (*(f"evals/tasks/{task}/utils.py" for task in TASKS), "evals/hooks.py")
    return moves


LAYOUT_MOVES = _layout_moves()


def code_differences(recorded: dict) -> list[str]:
    """How the project code each recorded stage ran differs from the code here, file by file (stage records carry
    their code since schema 2), and which declared packages changed version. Files a layout change moved are
    followed to their new paths (``LAYOUT_MOVES``) and said once, not listed as gone and new."""
    out = []
    for stage in recorded.get("stages", []):
        code = stage.get("code") if isinstance(stage, dict) else None
        if not code or stage.get("name") not in STAGES:
            continue
        old = code["files"]
        now = code_manifest(f"stages.{stage['name']}", getattr(STAGES[stage["name"]], "DATA_FILES", ()))
        moved = {path: LAYOUT_MOVES[path] for path in old if path in LAYOUT_MOVES}
        arrived = {new for news in moved.values() for new in news}
        changed = sorted(f for f in (set(old) - set(moved)) | (set(now) - arrived) if old.get(f) != now.get(f))
        if moved:
            shown = ", ".join(f"{path} -> {news[0]}" for path, news in sorted(moved.items())[:3])
            out.append(f"stage {stage['name']} ran vlmlab's layout before runtime/ (issue #34): {len(moved)} of its "
                       f"files live under new paths now ({shown}, ...), edited by the move")
        if changed:
            out.append(f"stage {stage['name']} ran other code: {', '.join(changed)} "
                       f"(recorded at git {str(code.get('git_sha'))[:12]})")
    packages = recorded.get("manifest", {}).get("packages")
    packages = packages if isinstance(packages, dict) else {}  # a damaged record's versions are unknown, not an error
    for name, version in dependency_versions().items():
        old = packages.get(name.replace("-", "_"), packages.get(name))
        if isinstance(old, str) and version is not None and old != version:
            out.append(f"package {name}: recorded {old}, now {version}")
    return out


def reproduction_record(records: list[dict], workers: list[dict], threads: int) -> dict:
    """What a run's results may be compared against again, for manifest["reproduction"]: the class of device the
    stages ran on, its model, and (CPU) the thread count each worker's torch used."""
    devices = sorted({r.get("device", "CPU") for r in records if r.get("device")} - {"CPU"})
    if devices:
        return {"device_class": "gpu", "devices": devices, "tolerance": GPU_TOLERANCE}

    def one(key: str):
        values = sorted({str(hw.get(key)) for hw in workers if hw.get(key)})
        return values[0] if len(values) == 1 else values or None

    return {"device_class": "cpu", "cpu": one("cpu"), "cpu_capability": one("cpu_capability"), "threads": threads,
            "tolerance": 0.0, "tolerance_elsewhere": CPU_TOLERANCE}


def tolerance_for(recorded: dict, now: dict, given: float | None = None) -> tuple[float, str]:
    """The tolerance a rerun is held to, and why: ``given`` (--tolerance); GPU_TOLERANCE when either ran on a GPU;
    exact (0) on the same CPU model with the same threads; CPU_TOLERANCE on another CPU or thread count."""
    if given is not None:
        return given, "--tolerance"
    old, new = recorded.get("reproduction") or {}, now.get("reproduction") or {}
    if "gpu" in (old.get("device_class"), new.get("device_class")):
        return GPU_TOLERANCE, (f"a GPU run ({', '.join(old.get('devices') or new.get('devices') or ['GPU'])}): "
                               f"+-{GPU_TOLERANCE} on 0-1 metrics, as kernels and reduction orders vary")
    if not old:
        return CPU_TOLERANCE, "recorded before vlmlab kept where it ran: the CPU tolerance"
    def where(r: dict) -> str:
        return f"{r.get('cpu')} ({r.get('cpu_capability') or 'ISA unrecorded'}), {r.get('threads')} threads"

    same = ("cpu", "cpu_capability", "threads")
    if all(old.get(k) == new.get(k) for k in same):
        return 0.0, f"exact: the same CPU as recorded, {where(old)}"
    return CPU_TOLERANCE, (f"another CPU, instruction set or thread count (recorded {where(old)}; now {where(new)}): "
                           f"kernels differ, +-{CPU_TOLERANCE}; a long training run can drift further, so rerun on "
                           "the recorded CPU to check exactly")


def comparable(name: str) -> bool:
    return not any(marker in name for marker in TIMING_MARKERS)


def compare_metrics(recorded: dict, now: dict, tolerance: float) -> list[dict]:
    """One row per comparable recorded metric: recorded, now, delta, ok (within ``tolerance``: absolute on eval/*
    metrics, which are 0-1; relative to the recorded value on the others)."""
    rows = []
    for name, old in sorted(recorded.items()):
        if not comparable(name):
            continue
        new = now.get(name)
        delta = None if new is None else new - old
        allowed = tolerance if name.startswith("eval/") else tolerance * max(1.0, abs(old))
        ok = delta is not None and math.isfinite(delta) and abs(delta) <= allowed
        rows.append({"metric": name, "recorded": old, "now": new, "delta": delta, "ok": ok})
    return rows


def manifest_differences(recorded: dict, now: dict) -> list[str]:
    out = []
    for field in MANIFEST_FIELDS:
        old, new = recorded.get(field), now.get(field)
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                for key in sorted(set(old) | set(new)):
                    if old.get(key) != new.get(key):
                        out.append(f"{field}.{key}: recorded {old.get(key)!r}, now {new.get(key)!r}")
            else:
                out.append(f"{field}: recorded {old!r}, now {new!r}")
    return out
