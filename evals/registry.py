"""The benchmark tasks: one entry each, read by the config, the data and eval stages, the CLI, leaderboard, reports,
the MLflow cost view and the GRPO accuracy reward.

Adding a task = one ``Task`` entry here + its folder ``evals/tasks/<name>/`` (one lm-eval YAML per protocol,
``short.yaml`` and/or ``lmms.yaml``, each including ``evals/tasks/_template.yaml``, and the hooks they name in its
``utils.py``, as lmms-eval keeps a task) + its synthetic generator (``stages/support/synthetic.py``). Nothing else
names a task.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
TEMPLATE = "_template.yaml"  # in TASK_DIR: what every task YAML includes
PROTOCOLS = ("short", "lmms")  # short: terse prompts for tiny models; lmms: lmms-eval's published task protocol
# lmms-eval's command line (`--reasoning_tags`, default in lmms_eval/__main__.py) has its evaluator cut these blocks
# out of every generation before any task scores it (lmms_eval/evaluator.py, lmms_eval/api/reasoning.py); the
# default of eval.reasoning_tags, cut by the lmms hooks (evals/hooks.py)
REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))
CANONICAL = ("image", "question", "answers", "answer", "question_type", "subset")
REQUIRED = ("image", "question", "answers")


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    ``columns`` maps canonical names to the columns of the task's own layout (``layout``: the hub dataset it
    follows); ``layouts`` adds the column maps of other published copies, picked by the source's hub id.
    ``subsets``: values of the ``subset`` column -> names; the task's metric is then the mean of the subsets' means
    (ChartQA: human and augmented, as papers report it). ``adapt`` turns one source row (already renamed to
    canonical keys) into canonical fields when a plain column map is not enough (multiple choice).
    """
    name: str
    title: str
    metric: str
    scorer: str  # "module:function" (prediction, references) -> float; by name, so the data stage's code
    # fingerprint does not cover the metrics (a new scoring rule reruns eval only)
    layout: str
    columns: dict[str, str]
    generator: str
    question_types: tuple[str, ...]
    numeric_types: frozenset[str] = frozenset()
    subsets: dict = field(default_factory=dict)
    layouts: dict[str, dict[str, str]] = field(default_factory=dict)
    formats: tuple[str, ...] = ()  # local layouts beyond parquet / save_to_disk (datasets.py readers)
    adapt: Callable[[dict], dict] | None = None

    def score(self, prediction: str, references: list[str]) -> float:
        module, _, name = self.scorer.partition(":")
        return getattr(importlib.import_module(module), name)(prediction, references)

    def protocols(self) -> tuple[str, ...]:
        return tuple(p for p in PROTOCOLS if self.task_file(p).is_file())

    def task_file(self, protocol: str) -> Path:
        return TASK_DIR / self.name / f"{protocol}.yaml"

    def files(self, protocol: str) -> list[Path]:
        """What scoring under ``protocol`` reads: the task's YAML, the shared template it includes, its hooks."""
        return [self.task_file(protocol), TASK_DIR / TEMPLATE, TASK_DIR / self.name / "utils.py"]

    def lm_eval_name(self, protocol: str) -> str:
        return f"vlmlab_{self.name}_{protocol}"

    def columns_for(self, layout: str, available: set[str]) -> dict[str, str]:
        """The column map of a source: "canonical" (rows keyed by canonical names, e.g. from the_cauldron), the
        layout of its hub id when known, else the first published layout whose required columns it has (a local
        copy of any of them loads as is)."""
        if layout == "canonical":
            return {name: name for name in CANONICAL}
        overlays = [self.layouts[layout]] if layout in self.layouts else []
        for overlay in (*overlays, {}, *self.layouts.values()):
            columns = {**self.columns, **overlay}
            if all(columns.get(name) in available for name in REQUIRED):
                return columns
        return {**self.columns, **(overlays[0] if overlays else {})}


def _textvqa_row(f: dict) -> dict:
    """lmms-lab/textvqa has the 10 answers and no single one: the training target is the most frequent answer, case
    aside (the first of those tied), in its most frequent spelling, as VQAv2's multiple_choice_answer is."""
    if f.get("answer") is not None or not isinstance(f["answers"], list) or not f["answers"]:
        return {}
    answers = [str(a) for a in f["answers"]]
    folded = [a.strip().lower() for a in answers]
    top = max(folded, key=folded.count)
    spellings = [a for a, k in zip(answers, folded, strict=True) if k == top]
    return {"answer": max(spellings, key=spellings.count)}


def _docvqa_row(f: dict) -> dict:
    """lmms-lab/DocVQA's question_types is a list (e.g. ["table/list", "layout"]): the first is the item's type."""
    qtypes = f.get("question_type")
    if isinstance(qtypes, (list, tuple)):
        return {"question_type": str(qtypes[0]) if qtypes else None}
    return {}


def _scienceqa_row(f: dict) -> dict:
    """lmms-lab/ScienceQA's multiple choice (``choices``, ``answer`` an index into them, ``hint``) as canonical fields:
    the question as lmms-eval's scienceqa_img prompt before its post_prompt ("Context: {hint}\n" when there is a hint,
    "{question}\n", then "A. choice\nB. choice..."), answers [letter, option text], answer the letter. Rows already
    canonical (a string answer, e.g. from the_cauldron) pass through."""
    index = f.get("answer")
    if not isinstance(index, int) or isinstance(index, bool):
        return {}
    choices, question, hint = f["answers"], f["question"], f.get("hint") or ""
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be a list of option strings, got {choices!r}")
    if not 0 <= index < len(choices):
        raise IndexError(f"answer index {index} is out of range for {len(choices)} choices")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    context = f"Context: {hint}\n" if hint else ""
    return {"question": f"{context}{question}\n{options}", "answers": [letters[index], choices[index]],
            "answer": letters[index]}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task(name="vqa", title="VQAv2", metric="vqa_accuracy", scorer="evals.metrics:vqa_accuracy",
         layout="lmms-lab/VQAv2",
         columns={"image": "image", "question": "question", "answers": "answers",
                  "answer": "multiple_choice_answer", "question_type": "question_type"},
         generator="shapes-vqa", question_types=("color", "shape", "count", "presence"),
         layouts={"HuggingFaceM4/VQAv2": {}},
         formats=("vqa_official",)),
    Task(name="chartqa", title="ChartQA", metric="chartqa_relaxed_accuracy", scorer="evals.metrics:relaxed_accuracy",
         layout="HuggingFaceM4/ChartQA",
         columns={"image": "image", "question": "query", "answers": "label", "answer": "label",
                  "question_type": "question_type", "subset": "human_or_machine"},
         generator="bar-chartqa", question_types=("value", "highest", "lowest", "count"),
         numeric_types=frozenset({"value"}),
         subsets={0: "human", 1: "augmented", "human": "human", "augmented": "augmented",
                  "human_test": "human", "augmented_test": "augmented"},
         layouts={"lmms-lab/ChartQA": {"question": "question", "answers": "answer", "answer": "answer",
                                       "question_type": "type", "subset": "type"}},
         formats=("chartqa_json",)),
    Task(name="textvqa", title="TextVQA", metric="textvqa_accuracy", scorer="evals.metrics:vqa_accuracy",
         layout="lmms-lab/textvqa",
         columns={"image": "image", "question": "question", "answers": "answers",
                  "question_type": "question_type"},
         generator="sign-textvqa", question_types=("word",),
         adapt=_textvqa_row),
    Task(name="docvqa", title="DocVQA", metric="docvqa_anls", scorer="evals.metrics:anls",
         layout="lmms-lab/DocVQA",  # hub_config: DocVQA
         columns={"image": "image", "question": "question", "answers": "answers",
                  "question_type": "question_types"},
         generator="form-docvqa", question_types=("form", "layout"),
         adapt=_docvqa_row),
    Task(name="scienceqa", title="ScienceQA", metric="scienceqa_accuracy", scorer="evals.metrics:choice_accuracy",
         layout="lmms-lab/ScienceQA",  # hub_config: ScienceQA-IMG
         columns={"image": "image", "question": "question", "answers": "choices", "answer": "answer",
                  "hint": "hint", "question_type": "topic"},
         generator="diagram-scienceqa", question_types=("side", "size", "direction", "color"),
         adapt=_scienceqa_row),
)}


def task(name: str) -> Task:
    """The task called ``name``, or a KeyError naming the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def metric_names() -> list[str]:
    """Every task's main metric name, in registry order (eval/<name> in MLflow)."""
    return [t.metric for t in TASKS.values()]
