"""The eval's item-level response cache: every batch's answers, kept as the batch finishes.

Scoring dies with its process (a preempted spot node, a SIGKILL, a Ray worker lost): the answers of the batches it
finished are on disk, and a rerun (or Ray's retry of the shard) generates only the rest. `harness eval` of a model the
pipeline already scored generates nothing. lmms-eval keeps such a cache per rank (SQLite + a JSONL audit log; its
PR #1217 put the package version into the key, so stale answers are not reused); here it is one append-only JSONL
file per shard, each line one batch, flushed and fsync'd before the next batch starts.

What an answer depends on is in the key, so no answer is reused where it could differ: the model's files (their
sha256), the protocol and the task files (template and hooks included), the generation settings, the batch size,
the device and dtype, the seed, and the versions of torch, transformers and lm-eval. A batch is found by that key
and the content of every item in it, in order (the prompt, the generation settings, the image's pixels): padding
changes greedy answers, so an answer is reused only inside the batch it was generated in. Scores are never cached:
lm-eval scores the answers afresh, cached or not, so a change in the scoring code applies to cached answers too.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

VERSION = 1
PACKAGES = ("torch", "transformers", "lm_eval")


class CachedBatch(BaseModel):
    """One line of a shard's file: a batch's key and its answers, in the batch's order."""
    model_config = ConfigDict(extra="forbid")
    batch: str
    answers: list[str]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # framed: ("ab", "c") and ("a", "bc") differ
        h.update(part)
    return h.hexdigest()


def model_digest(model_dir: Path) -> str:
    """sha256 over every file of a checkpoint directory (relative names and contents): weights, config, tokenizer and
    processor files all change answers."""
    parts = []
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            parts += [path.relative_to(model_dir).as_posix().encode(), hashlib.file_digest(f, "sha256").digest()]
    return _digest(*parts)


def request_digest(args: Sequence) -> str:
    """One item of lm-eval's generate_until: ``(context, gen_kwargs, {"visual": [images]})``."""
    context, gen_kwargs, *aux = args
    parts = [context.encode(), json.dumps(gen_kwargs, sort_keys=True, default=str).encode()]
    for image in (aux[0] or {}).get("visual", []) if aux else []:
        parts += [f"{image.mode} {image.size}".encode(), image.tobytes()]
    return _digest(*parts)


def settings_key(settings: dict) -> str:
    """The part of the key every batch of one scoring job shares (``settings`` plus vlmlab's cache version and the
    installed versions of the packages that generate)."""
    payload = {"version": VERSION, "packages": {p: version(p) for p in PACKAGES}, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


SHARED = "shared"


@dataclass(frozen=True)
class Location:
    """Where a run's eval keeps its answers: ``directory`` (one per output dir) and the run's ``attempt``: None for
    a plain run, which reads every run's answers; a ``--force`` run's id, which reads only its own (its shards'
    retries reuse them) and leaves them for later plain runs."""
    directory: str
    attempt: str | None = None


def parse_name(name: str) -> tuple[str, str, int] | None:
    """``<key>.<attempt>.shard<k>.jsonl`` -> (key, attempt, k); None for any other name. (An attempt is a run id,
    which a run_name may give dots.)"""
    key, _, rest = name.removesuffix(".jsonl").partition(".")
    attempt, _, shard = rest.rpartition(".")
    if not name.endswith(".jsonl") or not key or not attempt or not shard.startswith("shard") \
            or not shard[5:].isdigit():
        return None
    return key, attempt, int(shard[5:])


class ItemCache:
    """The answers of key ``key``'s batches found at ``where`` (every shard's file: a batch is the same whichever
    shard generated it), and this shard's file, appended to as its batches finish."""

    def __init__(self, where: Location, key: str, shard: int):
        self.directory, self.key = Path(where.directory), key
        self.path = self.directory / f"{key}.{where.attempt or SHARED}.shard{shard}.jsonl"
        self.answers: dict[str, list[str]] = {}
        self.damaged = 0  # unreadable lines (a write torn by a kill): their batches are generated again
        self.unwritable: str | None = None
        for path in sorted(self.directory.glob(f"{key}.{where.attempt or '*'}.shard*.jsonl")):
            with open(path, errors="replace") as f:
                for line in f:
                    try:
                        entry = CachedBatch.model_validate_json(line)
                    except ValidationError:
                        self.damaged += 1
                        continue
                    self.answers[entry.batch] = entry.answers

    def batch_key(self, requests: Sequence) -> str:
        return _digest(self.key.encode(), *(request_digest(r.args).encode() for r in requests))

    def get(self, requests: Sequence) -> list[str] | None:
        found = self.answers.get(self.batch_key(requests))
        return found if found is not None and len(found) == len(requests) else None

    def put(self, requests: Sequence, answers: list[str]) -> None:
        """Append the batch's answers and fsync them: once this returns, a kill loses nothing of this batch. Where
        the directory cannot be written (a worker node that does not share the output dir, a full disk) the eval
        goes on uncached, and ``unwritable`` says why."""
        batch = self.batch_key(requests)
        self.answers[batch] = list(answers)
        if self.unwritable:
            return
        line = CachedBatch(batch=batch, answers=list(answers)).model_dump_json() + "\n"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.unwritable = f"{self.path}: {exc.strerror or exc}"
