"""Stage cache: reuse a finished stage when its key (its config + the keys of its inputs) is unchanged.

An entry records the stage's outputs and the sha256 of every file it wrote; an entry whose files are missing or
changed is reported and recomputed, never used. Entries live in `<output dir>/.cache/`; Ray Train's storage
for a training stage lives beside them under the same key, so an interrupted stage resumes from its last
checkpoint when the same command is run again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import Field

from evals.item_cache import Location
from runtime.atomic import atomic_write
from runtime.config import config_values
from runtime.errors import UserError
from runtime.lease import Lease
from runtime.manifest import sha256_file
from runtime.records import Record, StageRecord, read_json

CACHE_VERSION = 2  # 2: keys cover code, packages and local sources' content
ITEM_CACHE = "eval-items"  # the eval's answers per batch, under the cache root (item_cache())
SKIP_DIRS = {"ray", "trainer"}  # Ray's own storage and TRL's scratch dir are not stage outputs


# Fields a stage reads that never change what it computes: how long to wait for a cluster to have room, and whether
# the eval scores a model while the next stage trains (the same shards and batches either way)
NOT_IN_KEY = {"resources": ("placement_timeout_s",), "eval": ("while_training",)}


class CacheEntry(Record):
    """A finished stage's cache entry (.cache/<stage>-<key>.json): what lookup() hands back to the pipeline."""
    key: str
    stage_dir: str
    record: StageRecord
    outputs: dict
    files: dict[str, str] = Field(default_factory=dict)


def _key_fields(key: str, value):
    if isinstance(value, dict) and key in NOT_IN_KEY:
        return {k: v for k, v in value.items() if k not in NOT_IN_KEY[key]}
    return value


def stage_key(name: str, config_keys: tuple[str, ...], resolved: dict, upstream: list[str],
              depends: dict | None = None) -> str:
    """sha256 over the stage name, the config fields it reads, its upstream stages' keys and what else its result
    ``depends`` on (code and package fingerprints, local sources' content: harness/codeprint.py)."""
    payload = {"version": CACHE_VERSION, "stage": name,
               "config": {k: _key_fields(k, config_values(resolved, k)[k]) for k in config_keys}, "upstream": upstream,
               "depends": depends or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _files(stage_dir: Path) -> list[Path]:
    return sorted(p for p in stage_dir.rglob("*")
                  if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(stage_dir).parts[:1]))


class StageCache:
    def __init__(self, root: Path, warn=print, remote=None):
        self.root = root
        self.warn = warn
        self.remote = remote  # harness.storage.OutputDir of a bucket this cache mirrors, or None

    def _entry_path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key[:24]}.json"

    def ray_storage(self, name: str, key: str, attempt: str | None = None) -> tuple[Path | str, str]:
        """(storage_path, run name) for Ray Train: stable per key, so a rerun resumes from the checkpoints, and held
        by one run at a time (``lease``); ``attempt`` names a private one (``--force``: never resumes, never
        touches another run's). With a bucket, storage_path is its URI: Ray writes and restores checkpoints there."""
        storage = self.remote.uri_of(self.root / "ray") if self.remote else self.root / "ray"
        return storage, f"{name}-{key[:16]}" + (f"-{attempt}" if attempt else "")

    def item_cache(self, attempt: str | None = None) -> Location:
        """The eval's item-level answer cache (evals/item_cache.py): one per output dir, shared by its runs as the
        stage cache is; ``attempt`` (``--force``) reads no other run's answers."""
        return Location(str(self.root / ITEM_CACHE), attempt)

    def lease(self, name: str, key: str) -> Lease:
        """The claim on computing stage ``name`` with ``key`` (and on its Ray storage)."""
        return Lease(self.root / "leases" / f"{name}-{key[:24]}")

    def clear_ray(self, name: str, key: str) -> None:
        """Drop the stage's Ray storage (a damaged entry's); only while holding its lease, or when nobody does."""
        if self.lease(name, key).holder() is not None:
            return
        storage, run_name = self.ray_storage(name, key)
        if self.remote:
            self.remote.delete_dir(self.root / "ray" / run_name)
        else:
            shutil.rmtree(storage / run_name, ignore_errors=True)

    def forget(self, name: str) -> None:
        """Drop every entry of stage ``name``, whatever its key, with its Ray storage (a benchmark re-measures it)."""
        for path in self.root.glob(f"{name}-*.json"):
            path.unlink()
        for path in (self.root / "ray").glob(f"{name}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def lookup(self, name: str, key: str) -> dict | None:
        """The verified entry, or None. A damaged entry is reported, deleted and treated as a miss."""
        path = self._entry_path(name, key)
        if self.remote:
            self.remote.pull_entry(path)
        if not path.exists():
            return None
        try:
            entry = read_json(path, CacheEntry, "cache entry", "")
            problem = None if entry["key"] == key else "key mismatch"
        except UserError as exc:  # damaged: reported below, deleted, recomputed
            entry, problem = None, str(exc).removeprefix(f"{path}: ")
        for file, digest in (entry or {}).get("files", {}).items():
            if problem:
                break
            if not Path(file).is_file():
                problem = f"missing file {file}"
            elif sha256_file(Path(file)) != digest:
                problem = f"hash mismatch for {file}"
        if problem:
            self.warn(f"cache: entry for stage '{name}' is damaged ({problem}; {path.name}); recomputing")
            path.unlink(missing_ok=True)
            self.clear_ray(name, key)
            return None
        return entry

    def store(self, name: str, key: str, stage_dir: Path, record: dict, outputs: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entry = {"schema_version": CACHE_VERSION, "key": key, "stage": name, "stage_dir": str(stage_dir),
                 "record": record, "outputs": outputs,
                 "files": {str(p): sha256_file(p) for p in _files(stage_dir)}}
        atomic_write(self._entry_path(name, key), json.dumps(entry, indent=1, default=str))
        if self.remote:  # the files first: an entry in the bucket never names a file not yet there
            self.remote.push(*map(Path, entry["files"]), self._entry_path(name, key))
