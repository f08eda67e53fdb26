"""`harness reproduce`: rerun a recorded run's config from scratch and compare metric by metric."""
from __future__ import annotations

import json
import math
from pathlib import Path

from harness.errors import UserError

# Metrics that measure the machine, not the result: never compared.
TIMING_MARKERS = ("per_second", "runtime", "wall", "seconds", "cost/", "_unix")
MANIFEST_FIELDS = ("git", "packages", "packages_sha256", "hardware", "data_fingerprints", "model_weights_sha256")


def load_result(target: str) -> tuple[dict, Path]:
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / "result.json"
    if not path.is_file():
        raise UserError(f"no result.json at {target}")
    try:
        return json.loads(path.read_text()), path
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None


def comparable(name: str) -> bool:
    return not any(marker in name for marker in TIMING_MARKERS)


def compare_metrics(recorded: dict, now: dict, tolerance: float) -> list[dict]:
    """One row per comparable recorded metric: recorded, now, delta, ok."""
    rows = []
    for name, old in sorted(recorded.items()):
        if not comparable(name):
            continue
        new = now.get(name)
        delta = None if new is None else new - old
        ok = delta is not None and math.isfinite(delta) and abs(delta) <= tolerance
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
