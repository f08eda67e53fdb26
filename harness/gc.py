"""`harness gc`: keep the last N runs of each pipeline and what they use; free the rest of an output dir.

A run's stage results can live in another run's directory (a reused stage points there), so a kept run keeps those
runs too. A cache entry goes with the run directory its files are in. Ray storage of a finished stage is no longer
needed (its model was copied into the run directory); an interrupted stage's is kept while it is newer than the
oldest kept run (a rerun resumes from it). Nothing a live run holds (its lease) is touched.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harness.cache import CacheEntry
from runtime.errors import UserError
from runtime.lease import Lease
from runtime.records import read_json, read_result


@dataclass
class Plan:
    runs: list[Path] = field(default_factory=list)
    entries: list[Path] = field(default_factory=list)
    storage: list[Path] = field(default_factory=list)
    kept_runs: int = 0

    @property
    def paths(self) -> list[Path]:
        return self.runs + self.entries + self.storage

    def size(self) -> int:
        return sum(_size(p) for p in self.paths)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read(path: Path) -> dict:
    """A cache entry; a damaged one is read as empty (it names no run and no file to keep, and is freed)."""
    try:
        return read_json(path, CacheEntry, "cache entry", "")
    except UserError:
        return {}


def _result(run: Path) -> dict:
    """A run's result.json ({} before it finishes), checked: gc decides what to delete from it, so a damaged one stops
    it before anything is deleted."""
    path = run / "result.json"
    return read_result(path, "repair it, or delete that run directory yourself") if path.exists() else {}


def _run_of(stage_dir: str, root: Path) -> Path | None:
    try:
        return root / Path(stage_dir).resolve().relative_to(root).parts[0]
    except (ValueError, IndexError):
        return None


def plan(root: Path, keep: int) -> Plan:
    root = root.resolve()
    cache = root / ".cache"
    runs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "config.yaml").exists()]
    live = {d for d in runs if Lease(cache / "leases" / f"run-{d.name}").holder() is not None}
    results = {run: _result(run) for run in runs}  # every one checked before anything is planned
    by_pipeline: dict[str, list[Path]] = {}
    for run in runs:
        pipeline = results[run].get("pipeline", "(unfinished)")
        by_pipeline.setdefault(pipeline, []).append(run)
    kept = set(live)
    for group in by_pipeline.values():
        kept |= set(sorted(group, key=lambda d: d.stat().st_mtime, reverse=True)[:keep])
    for run in list(kept):  # the runs whose stage results a kept run reused, or whose files its config names
        named = [stage.get("reused_from") or "" for stage in results[run].get("stages", [])]
        config = (run / "config.yaml").read_text(errors="replace") if (run / "config.yaml").is_file() else ""
        named += [str(other) for other in runs if f"{other}/" in config]
        for path in named:
            owner = _run_of(path, root)
            if owner is not None and owner.exists():
                kept.add(owner)
    out = Plan(runs=sorted(set(runs) - kept), kept_runs=len(kept))
    oldest_kept = min((d.stat().st_mtime for d in kept), default=float("inf"))
    entries = {p: _read(p) for p in sorted(cache.glob("*.json")) if p.name != "fingerprints.json"}
    cached: set[str] = set()  # <stage>-<key16> of every finished stage
    for path, entry in entries.items():
        owner = _run_of(entry.get("stage_dir", ""), root)
        if owner is None or owner in out.runs or not owner.exists():
            out.entries.append(path)
        if entry.get("stage") and entry.get("key"):
            cached.add(f"{entry['stage']}-{entry['key'][:16]}")
    leases = cache / "leases"
    for storage in sorted((cache / "ray").iterdir()) if (cache / "ray").is_dir() else []:
        base, damaged, _ = storage.name.partition(".damaged-")
        stage, _, rest = base.partition("-")
        key16, _, attempt = rest.partition("-")  # a --force run's own storage ends with its run id
        if attempt:
            if root / attempt not in live:
                out.storage.append(storage)
            continue
        if damaged:
            out.storage.append(storage)
            continue
        if any(Lease(p).holder() for p in leases.glob(f"{base}*") if not p.name.endswith(".guard")):
            continue  # a live run is training there
        finished = base in cached  # its model was copied into the run directory: checkpoints no longer needed
        if finished or storage.stat().st_mtime < oldest_kept:  # else: an interrupted stage a rerun resumes
            out.storage.append(storage)
    return out


def apply(p: Plan) -> None:
    for path in p.paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
