"""`harness gc`: keep the last N runs of each pipeline and what they use; free the rest of an output dir.

A run's stage results can live in another run's directory (a reused stage points there), so a kept run keeps those
runs too. A cache entry goes with the run directory its files are in. Ray storage of a finished stage is no longer
needed (its model was copied into the run directory); an interrupted stage's is kept while it is newer than the
oldest kept run (a rerun resumes from it). The eval's item cache keeps the answers kept runs scored with, and what an
interrupted eval wrote. Nothing a live run holds (its lease) is touched.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from evals.item_cache import parse_name
from harness.cache import ITEM_CACHE, CacheEntry
from runtime.errors import UserError
from runtime.lease import Lease
from runtime.records import read_json, read_result

KEYS = TypeAdapter(list[str])


@dataclass
class Plan:
    runs: list[Path] = field(default_factory=list)
    entries: list[Path] = field(default_factory=list)
    storage: list[Path] = field(default_factory=list)
    answers: list[Path] = field(default_factory=list)  # the eval's item cache files (evals/item_cache.py)
    kept_runs: int = 0

    @property
    def paths(self) -> list[Path]:
        return self.runs + self.entries + self.storage + self.answers

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
    out.answers = _unused_answers(root, {run: results[run] for run in kept}, live)
    return out


def _unused_answers(root: Path, kept: dict[Path, dict], live: set[Path]) -> list[Path]:
    """The item cache's files no kept run's eval used. Kept: the keys a kept run's eval scored with (its result's
    ``item_cache_keys``), a live ``--force`` run's own files, and every file written since the oldest kept run that
    has not finished began (an interrupted eval, whose keys no result names, resumes from them)."""
    used = {key for run, result in kept.items() for key in _item_cache_keys(run, result)}
    since = min(((run / "config.yaml").stat().st_mtime for run, result in kept.items() if not result),
                default=float("inf"))
    directory, unused = root / ".cache" / ITEM_CACHE, []
    for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else []:
        parsed = parse_name(path.name)
        if parsed is None:  # not the cache's own: left alone
            continue
        key, attempt, _ = parsed
        if key in used or root / attempt in live or path.stat().st_mtime >= since:
            continue
        unused.append(path)
    return unused


def _item_cache_keys(run: Path, result: dict) -> list[str]:
    """The item cache keys a finished run's eval scored with (none for an unfinished run or an older vlmlab's)."""
    eval_outputs = [stage.get("outputs") or {} for stage in result.get("stages", []) if stage.get("name") == "eval"]
    try:
        return [key for outputs in eval_outputs for key in KEYS.validate_python(outputs.get("item_cache_keys", []))]
    except ValidationError as exc:
        raise UserError(f"{run / 'result.json'}: eval outputs.item_cache_keys is not a list of strings "
                        f"({exc.errors()[0]['msg']}); repair it, or delete that run directory yourself") from None


def apply(p: Plan) -> None:
    for path in p.paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
