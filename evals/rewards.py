"""Reward functions for GRPO, in TRL's signature: ``f(completions, **dataset_columns) -> list[float]``.

Built-ins are named in config as ``accuracy`` and ``format``; a user's own reward is ``module:function`` or
``path/to/file.py:function`` and receives the same arguments (the dataset columns ``answer``, ``answers``,
``task`` and ``question_type`` among them).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from collections.abc import Callable
from importlib.machinery import PathFinder
from pathlib import Path

from evals.metrics import extract_short_answer
from evals.registry import TASKS

_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def completion_text(completion) -> str:
    """Plain text of a completion (conversational completions are a list of messages)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content)
    return content


def accuracy_reward(completions, answer, task, **_) -> list[float]:
    """The task's own metric of the short answer against the training target (VQA: exact match after
    normalisation, ChartQA: relaxed (5%) match)."""
    return [TASKS[task].score(extract_short_answer(completion_text(completion)), [target])
            for completion, target, task in zip(completions, answer, task, strict=True)]


def format_reward(completions, **_) -> list[float]:
    """1.0 when the completion is `<think>…</think><answer>…</answer>`."""
    return [float(bool(_FORMAT.fullmatch(completion_text(c)))) for c in completions]


BUILTIN = {"accuracy": accuracy_reward, "format": format_reward}


def _split(spec: str) -> tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward '{spec}' is not a built-in ({', '.join(BUILTIN)}) nor 'module:function' "
                         "or 'path/to/file.py:function'")
    return target, name


def _module_file(module: str) -> Path:
    """The source file of ``module`` (dotted), found on sys.path the way import would, without importing it or its
    parent packages."""

    parts, spec, search = module.split("."), None, None
    for i in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[:i + 1]), search)
        if spec is None:
            raise ValueError(f"cannot find module '{module}' on the Python path; give a path/to/file.py instead")
        search = spec.submodule_search_locations
    origin = Path(spec.origin or "")
    if origin.suffix != ".py":
        raise ValueError(f"module '{module}' is not Python source ({spec.origin}); give a path/to/file.py instead")
    return origin


MAX_SOURCE_BYTES = 4 << 20  # a reward module read (never run) to find its function


def check(spec: str) -> None:
    """Check a reward spec without running user code: a built-in, or a file/module (found, not imported) whose
    source defines ``function`` at top level (def, assignment or import). Raises ValueError."""
    if spec in BUILTIN:
        return
    target, name = _split(spec)
    try:
        path = Path(target).expanduser() if target.endswith(".py") else _module_file(target)
    except ValueError as exc:
        raise ValueError(f"reward '{spec}': {exc}") from None
    if not path.is_file():
        raise ValueError(f"reward '{spec}': file not found: {path}")
    if path.stat().st_size > MAX_SOURCE_BYTES:
        raise ValueError(f"reward '{spec}': {path} is {path.stat().st_size / 2 ** 20:.1f} MiB, more than a reward "
                         f"module needs (at most {MAX_SOURCE_BYTES // 2 ** 20} MiB); give the file that defines it")
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"reward '{spec}': {path} is not valid Python ({exc}); fix the file") from None
    except (RecursionError, MemoryError):  # nested past what the parser holds: no reward module looks like that
        raise ValueError(f"reward '{spec}': {path} is nested too deep to parse; fix the file") from None
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
    if name not in defined:
        raise ValueError(f"reward '{spec}': {path} defines no top-level function '{name}'; check the name")


def resolve(spec: str) -> Callable:
    """A built-in name, ``module:function`` or ``file.py:function`` -> the callable (importing, so running, the
    user's code: only where the run uses it). Raises ValueError."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    target, name = _split(spec)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward '{spec}': file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(f"vlmlab_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"reward '{spec}': importing {path} failed: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward '{spec}': cannot import module '{target}': {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward '{spec}': '{name}' is not a function in {target}")
    return fn
