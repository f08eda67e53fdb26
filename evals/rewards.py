"""Reward functions for GRPO, in TRL's signature: ``f(completions, **dataset_columns) -> list[float]``.

Built-ins are named in config as ``accuracy`` and ``format``; a user's own reward is ``module:function`` or
``path/to/file.py:function`` and receives the same arguments (the dataset columns ``answer``, ``answers``,
``task`` and ``question_type`` among them).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from evals.metrics import extract_short_answer, normalize_vqa_answer, relaxed_accuracy

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
    """1.0 for the right short answer: VQA exact match after normalisation, ChartQA relaxed (5%) match."""
    out = []
    for completion, target, kind in zip(completions, answer, task, strict=True):
        pred = extract_short_answer(completion_text(completion))
        if kind == "chartqa":
            out.append(relaxed_accuracy(pred, [target]))
        else:
            out.append(float(normalize_vqa_answer(pred) == normalize_vqa_answer(target)))
    return out


def format_reward(completions, **_) -> list[float]:
    """1.0 when the completion is `<think>…</think><answer>…</answer>`."""
    return [float(bool(_FORMAT.fullmatch(completion_text(c)))) for c in completions]


BUILTIN = {"accuracy": accuracy_reward, "format": format_reward}


def resolve(spec: str) -> Callable:
    """A built-in name, ``module:function`` or ``file.py:function`` -> the callable. Raises ValueError."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward '{spec}' is not a built-in ({', '.join(BUILTIN)}) nor 'module:function' "
                         "or 'path/to/file.py:function'")
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
