"""Load any supported source into vlmlab's canonical task view, and validate it row by row.

Canonical columns (what training and eval read): ``image`` (an image), ``question`` (str),
``answers`` (list[str]: the 10 VQA human answers, or the ChartQA labels), ``answer`` (the training target) and
``question_type`` (str, for per-type accuracy).

Sources: the synthetic generator, a local directory (parquet files, ``save_to_disk``, the official VQA
questions/annotations JSON + COCO images, or the ChartQA repo's ``<split>/<split>_*.json`` + ``png/``), or a hub
dataset id. Column names follow each kind's real layout (VQAv2, HuggingFaceM4/ChartQA); ``columns`` remaps them.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from harness.errors import DataError

KIND_DEFAULT_COLUMNS = {
    # canonical -> source column in the real dataset layout
    "vqa": {"image": "image", "question": "question", "answers": "answers", "answer": "multiple_choice_answer",
            "question_type": "question_type"},
    "chartqa": {"image": "image", "question": "query", "answers": "label", "answer": "label",
                "question_type": "question_type"},
}
REQUIRED = ("image", "question", "answers")
SYNTHETIC_TASK = {"vqa": "shapes-vqa", "chartqa": "bar-chartqa"}


NUMERIC_TYPES = {"value"}  # chart question types whose answers must be numbers (relaxed accuracy needs them)


def _is_number(text: str) -> bool:
    try:
        float(text.strip().rstrip("%").replace(",", ""))
    except ValueError:
        return False
    return True


def canonical_features():
    from datasets import Features, Image, Sequence, Value

    return Features({"image": Image(), "question": Value("string"), "answers": Sequence(Value("string")),
                     "answer": Value("string"), "question_type": Value("string")})


def _answer_texts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in value]


def _image_bytes(value, where: str) -> dict:
    """Normalise an image cell (dict with bytes/path, a path, or a PIL image) to {'bytes', 'path'}."""
    from PIL import Image

    if value is None:
        raise DataError(f"{where}: image is missing")
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    if isinstance(value, (str, Path)):
        value = {"bytes": None, "path": str(value)}
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path or not Path(path).is_file():
            raise DataError(f"{where}: image file not found: {path}")
        data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:
        raise DataError(f"{where}: image cannot be decoded ({path or 'embedded bytes'}): {exc}") from None
    return {"bytes": data, "path": Path(path).name if path else None}


def canonicalize(rows, kind: str, columns: dict[str, str], origin: str, limit: int | None) -> list[dict]:
    """Map source rows to canonical rows, checking every row. ``rows`` is a datasets.Dataset or list of dicts."""
    mapping = {**KIND_DEFAULT_COLUMNS[kind], **columns}
    available = set(rows.column_names if hasattr(rows, "column_names") else (rows[0].keys() if rows else ()))
    if len(rows) == 0:
        raise DataError(f"{origin}: split is empty")
    for name in REQUIRED:
        if mapping[name] not in available:
            raise DataError(f"{origin}: missing column '{mapping[name]}' (needed for '{name}'; "
                            f"columns present: {', '.join(sorted(available))}; remap with data.<task>.columns)")
    if hasattr(rows, "cast_column"):
        from datasets import Image
        if mapping["image"] in available:
            rows = rows.cast_column(mapping["image"], Image(decode=False))
    n = len(rows) if limit is None else min(limit, len(rows))
    out = []
    for i in range(n):
        row = rows[i]
        where = f"{origin} row {i}"
        answers = _answer_texts(row[mapping["answers"]])
        if not answers:
            raise DataError(f"{where}: no answers in column '{mapping['answers']}'")
        target = row.get(mapping["answer"]) if mapping["answer"] in available else None
        target = _answer_texts(target)[0] if _answer_texts(target) else answers[0]
        question = row[mapping["question"]]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty question in column '{mapping['question']}'")
        qtype = row.get(mapping["question_type"]) if mapping["question_type"] in available else None
        if kind == "chartqa" and qtype in NUMERIC_TYPES and not all(_is_number(a) for a in answers):
            raise DataError(f"{where}: question type '{qtype}' needs a numeric answer, got {answers!r} "
                            f"in column '{mapping['answers']}'")
        out.append({"image": _image_bytes(row[mapping["image"]], where), "question": question.strip(),
                    "answers": answers, "answer": target, "question_type": str(qtype or "all")})
    return out


def _vqa_official(root: Path, split: str) -> list[dict]:
    """Official VQA layout: *questions*.json + *annotations*.json, images COCO_<subtype>_<id:012d>.jpg."""
    def pick(pattern: str) -> Path:
        found = sorted(root.rglob(pattern))
        matching = [p for p in found if split in p.name] or found
        if not matching:
            raise DataError(f"{root}: no file matching '{pattern}' (official VQA layout)")
        return matching[0]

    qfile, afile = pick("*questions*.json"), pick("*annotations*.json")
    questions = json.loads(qfile.read_text())
    annotations = {a["question_id"]: a for a in json.loads(afile.read_text())["annotations"]}
    subtype = questions.get("data_subtype", "")
    images = {p.name: p for p in root.rglob("*.jpg")} | {p.name: p for p in root.rglob("*.png")}
    rows = []
    for i, q in enumerate(questions["questions"]):
        ann = annotations.get(q["question_id"])
        if ann is None:
            raise DataError(f"{afile}: no annotation for question_id {q['question_id']} (row {i} of {qfile.name})")
        name = f"COCO_{subtype}_{q['image_id']:012d}.jpg"
        path = images.get(name)
        rows.append({"image": str(path) if path else str(root / name), "question": q["question"],
                     "answers": ann["answers"],
                     "multiple_choice_answer": ann.get("multiple_choice_answer"),
                     "question_type": ann.get("answer_type") or ann.get("question_type")})
    return rows


def _chartqa_json(root: Path, split: str) -> list[dict]:
    """ChartQA repo layout: <root>/<split>/<split>_{human,augmented}.json and <root>/<split>/png/."""
    split_dir = root / split
    files = sorted(split_dir.glob(f"{split}_*.json"))
    if not files:
        raise DataError(f"{split_dir}: no {split}_*.json (ChartQA layout)")
    rows = []
    for f in files:
        for entry in json.loads(f.read_text()):
            rows.append({"image": str(split_dir / "png" / entry["imgname"]), "query": entry["query"],
                         "label": [str(entry["label"])], "question_type": f.stem.split("_", 1)[1]})
    return rows


def _detect_format(root: Path) -> str:
    if (root / "dataset_dict.json").exists() or (root / "dataset_info.json").exists():
        return "hf_disk"
    if list(root.rglob("*.parquet")):
        return "parquet"
    if list(root.rglob("*questions*.json")):
        return "vqa_official"
    if list(root.glob("*/*_augmented.json")) or list(root.glob("*/*_human.json")):
        return "chartqa_json"
    raise DataError(f"{root}: cannot tell the dataset format; set data.<task>.format")


def load_split(spec, kind: str, split: str, limit: int | None):
    """Rows of one split of a non-synthetic source, in its own layout, and a name for error messages."""
    return load_rows(spec.source, spec.format, split, limit)


def load_rows(source: str, fmt: str, split: str, limit: int | None):
    """(rows, origin) of one split of a hub id or a local directory in any supported format."""
    from datasets import load_dataset, load_from_disk

    root = Path(source).expanduser()
    if fmt == "hub" or (fmt == "auto" and not root.exists()):
        sliced = f"{split}[:{limit}]" if limit else split
        return load_dataset(source, split=sliced), f"{source}:{split}"
    fmt = _detect_format(root) if fmt == "auto" else fmt
    if fmt == "hf_disk":
        ds = load_from_disk(str(root))
        return (ds[split] if hasattr(ds, "keys") else ds), f"{root}:{split}"
    if fmt == "parquet":
        files = sorted(p for p in root.rglob("*.parquet") if p.name.startswith(split) or f"/{split}/" in str(p))
        if not files:
            raise DataError(f"{root}: no parquet files for split '{split}'")
        return load_dataset("parquet", data_files=[str(f) for f in files], split="train"), f"{files[0]}"
    if fmt == "vqa_official":
        return _vqa_official(root, split), f"{root}:{split}"
    return _chartqa_json(root, split), f"{root}:{split}"
