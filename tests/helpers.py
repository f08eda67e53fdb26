"""Helpers the test modules share (fixtures stay in conftest.py): import them as `from helpers import ...`."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
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
