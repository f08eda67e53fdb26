"""Load any supported source into vlmlab's canonical task view, and validate it row by row.

Canonical columns (what training and eval read): ``image`` (an image), ``question`` (str),
``answers`` (list[str]: the 10 VQA human answers, or the ChartQA labels), ``answer`` (the training target),
``question_type`` (str, for per-type accuracy) and ``subset`` (str: the task's reporting subsets, e.g. ChartQA's
human / augmented; "all" otherwise).

Sources: the synthetic generator, a local directory (parquet files, ``save_to_disk``, the official VQA
questions/annotations JSON + COCO images, the ChartQA repo's ``<split>/<split>_*.json`` + ``png/``, or
the_cauldron's ``images`` + ``texts`` rows), or a hub dataset id. Column names follow each task's published layouts
(``evals/registry.py``); ``columns`` remaps them.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from evals.registry import REQUIRED, TASKS
from runtime.errors import DataError


def _is_number(text: str) -> bool:
    try:
        float(text.strip().rstrip("%").replace(",", ""))
    except ValueError:
        return False
    return True


def canonical_features():
    from datasets import Features, Image, Sequence, Value

    return Features({"image": Image(), "question": Value("string"), "answers": Sequence(Value("string")),
                     "answer": Value("string"), "question_type": Value("string"), "subset": Value("string")})


def _answer_texts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) or not isinstance(value, (list, tuple)):  # a record's keys are not answers
        raise TypeError(type(value).__name__)
    return [a["answer"] if isinstance(a, dict) else str(a) for a in value]


def image_bytes(value, where: str) -> dict:
    """Normalise an image cell (dict with bytes/path, a path, or a PIL image) to {'bytes', 'path'}."""
    from PIL import Image

    if value is None:
        raise DataError(f"{where}: image is missing; add it or drop that row")
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    if isinstance(value, (str, Path)):
        value = {"bytes": None, "path": str(value)}
    if not isinstance(value, dict):
        raise DataError(f"{where}: image is {type(value).__name__} {short_repr(value)}, not an image record, encoded "
                        "bytes or a file path; fix or drop that row")
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        try:
            data = Path(path).read_bytes() if isinstance(path, str) and path else None
        except (OSError, ValueError):  # missing, a folder, a name too long for the OS, a NUL byte
            data = None
        if data is None:
            shown = path if isinstance(path, str) and len(path) <= 4096 else short_repr(path)
            raise DataError(f"{where}: image file not found: {shown}; add the file or drop that row")
    elif not isinstance(data, bytes):
        raise DataError(f"{where}: image bytes are {type(data).__name__}, not bytes; fix or drop that row")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:
        raise DataError(f"{where}: image cannot be decoded ({path or 'embedded bytes'}: {exc}); replace it or drop "
                        "that row") from None
    return {"bytes": data, "path": Path(path).name if path else None}


def image_column(ds, column: str, origin: str, remap: str):
    """``ds`` with ``column`` read as undecoded images, once its type is checked: a column of another type (ints,
    lists, records of other fields) raises DataError naming it and the ``remap`` key, before datasets casts it (which
    crashed on some types and turned a list of ints into an image)."""
    from datasets import Image

    problem = not_images(ds.features[column])
    if problem:
        raise DataError(f"{origin}: column '{column}' holds {problem}, not images (image records, encoded bytes or "
                        f"file paths); remap {remap} or fix the data")
    return ds.cast_column(column, Image(decode=False))


def not_images(feature) -> str | None:
    """What a datasets column type holds where it cannot be an image (None where it can: an Image feature, bytes,
    a path, or a {bytes, path} record of those types)."""
    from datasets import Image, Value

    def blob(f) -> bool:
        return isinstance(f, Value) and f.dtype in ("binary", "large_binary", "string", "large_string", "null")

    if isinstance(feature, Image) or blob(feature):
        return None
    if isinstance(feature, dict) and feature and set(feature) <= {"bytes", "path"} and all(map(blob, feature.values())):
        return None
    kind = feature.dtype if isinstance(feature, Value) else f"{type(feature).__name__.lower()} values"
    return kind if not isinstance(feature, dict) else (
        "records of " + ", ".join(f"{k}: {getattr(v, 'dtype', type(v).__name__)}" for k, v in feature.items()))


def column_names(rows) -> set[str]:
    if hasattr(rows, "column_names"):
        return set(rows.column_names)
    return set(rows[0].keys()) if rows else set()


def missing_columns(task: str, mapping: dict[str, str], available: set[str], origin: str) -> None:
    """A DataError naming the first required canonical column the source lacks."""
    for name in REQUIRED:
        if mapping.get(name) not in available:
            raise DataError(f"{origin}: task '{task}' needs column '{mapping.get(name)}' (for '{name}'; columns "
                            f"present: {', '.join(sorted(available))}); remap with data.tasks.{task}.columns")


def canonicalize(rows, task: str, columns: dict[str, str], origin: str, limit: int | None,
                 layout: str = "") -> list[dict]:
    """Map source rows to canonical rows, checking every row. ``rows`` is a datasets.Dataset or list of dicts;
    ``layout`` (a hub id, or "canonical") picks the published copy's column names from the registry."""
    entry = TASKS[task]
    available = column_names(rows)
    mapping = {**entry.columns_for(layout, available), **columns}
    if len(rows) == 0:
        raise DataError(f"{origin}: split is empty; add rows or choose another split")
    missing_columns(task, mapping, available, origin)
    if hasattr(rows, "cast_column") and mapping["image"] in available:
        rows = image_column(rows, mapping["image"], origin, f"data.tasks.{task}.columns.image")
    n = len(rows) if limit is None else min(limit, len(rows))
    out = []
    for i in range(n):
        row = rows[i]
        where = f"{origin} row {i}"
        f = {name: row[col] for name, col in mapping.items() if col in available}  # canonical name -> cell
        if entry.adapt is not None:
            try:
                f.update(entry.adapt(f))
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise DataError(f"{where}: not a {entry.title} row ({type(exc).__name__}: {exc}); fix or drop that "
                                "row") from None
        try:
            answers = _answer_texts(f["answers"])
        except (KeyError, TypeError):
            raise DataError(f"{where}: column '{mapping['answers']}' must hold answer strings or "
                            "{'answer': ...} records") from None
        if not answers:
            raise DataError(f"{where}: no answers in column '{mapping['answers']}'; add one or drop that row")
        try:
            target = _answer_texts(f.get("answer"))
        except (KeyError, TypeError):
            raise DataError(f"{where}: column '{mapping.get('answer')}' must hold an answer string") from None
        target = target[0] if target else answers[0]
        question = f["question"]
        if not isinstance(question, (str, type(None))):
            raise DataError(f"{where}: column '{mapping['question']}' must hold text (got {type(question).__name__} "
                            f"{short_repr(question)}); fix it or remap data.tasks.{task}.columns.question")
        if not question or not question.strip():
            raise DataError(f"{where}: empty question in column '{mapping['question']}'; fill it or drop that row")
        for name in ("question_type", "subset"):  # names, or a ClassLabel's integers (ChartQA's human_or_machine)
            if f.get(name) is not None and (not isinstance(f[name], (str, int)) or isinstance(f[name], bool)):
                raise DataError(f"{where}: column '{mapping[name]}' must hold a name (got {type(f[name]).__name__} "
                                f"{short_repr(f[name])}); fix it or remap data.tasks.{task}.columns.{name}")
        qtype = f.get("question_type")
        if qtype in entry.numeric_types and not all(_is_number(a) for a in answers):
            raise DataError(f"{where}: question type '{qtype}' needs a numeric answer, got {answers!r} "
                            f"in column '{mapping['answers']}'; fix the answer or the question type")
        subset = f.get("subset")
        if entry.subsets and subset is not None and subset not in entry.subsets:
            raise DataError(f"{where}: '{subset}' in column '{mapping['subset']}' is not one of {task}'s subsets "
                            f"({', '.join(map(str, entry.subsets))}); fix it or remap data.tasks.{task}.columns.subset")
        out.append({"image": image_bytes(f["image"], where), "question": question.strip(),
                    "answers": answers, "answer": target, "question_type": str(qtype or "all"),
                    "subset": entry.subsets.get(subset, "all") if subset is not None else "all"})
    return out


def _read_json(path: Path):
    """A JSON file's content, or a DataError naming the file and where it breaks."""
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); repair or "
                        "re-download the file") from None


_KINDS = {str: "a string", int: "an integer", list: "a list", (str, int): "a string or an integer",
          (str, int, float): "a string or a number"}


def _field(entry, key: str, where: str, hint: str, kind: type | tuple[type, ...] | None = None):
    """``entry[key]`` (of type ``kind`` where given: a JSON boolean is not a number), or a DataError naming the file,
    the row and the field."""
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: no '{key}' ({hint}); fix or drop that entry")
    value = entry[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise DataError(f"{where}: '{key}' must be {_KINDS[kind]} (got {type(value).__name__} "
                        f"{short_repr(value)}); fix or drop that entry")
    return value


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _entries(content, key: str | None, path: Path, layout: str) -> list:
    """The list of records of a JSON file: the file itself, or its ``key`` member."""
    records = content.get(key) if key and isinstance(content, dict) else content
    if not isinstance(records, list):
        want = f"an object with a list under '{key}'" if key else "a list of entries"
        raise DataError(f"{path}: expected {want}, got a {type(content).__name__}; give the file in the {layout} "
                        "layout")
    return records


def _vqa_official(root: Path, split: str) -> list[dict]:
    """Official VQA layout: *questions*.json + *annotations*.json, images COCO_<subtype>_<id:012d>.jpg."""
    def pick(pattern: str) -> Path:
        found = sorted(root.rglob(pattern))
        matching = [p for p in found if split in p.name] or found
        if not matching:
            raise DataError(f"{root}: no file matching '{pattern}' (official VQA layout); add it or set the task's "
                            "format")
        return matching[0]

    qfile, afile = pick("*questions*.json"), pick("*annotations*.json")
    questions = _read_json(qfile)
    annotations = {}
    for i, a in enumerate(_entries(_read_json(afile), "annotations", afile, "official VQA")):
        annotations[_field(a, "question_id", f"{afile} row {i}", "official VQA annotations", (str, int))] = a
    subtype = questions.get("data_subtype", "") if isinstance(questions, dict) else ""
    images = {p.name: p for p in root.rglob("*.jpg")} | {p.name: p for p in root.rglob("*.png")}
    rows = []
    for i, q in enumerate(_entries(questions, "questions", qfile, "official VQA")):
        where = f"{qfile} row {i}"
        qid = _field(q, "question_id", where, "official VQA questions", (str, int))
        ann = annotations.get(qid)
        if ann is None:
            raise DataError(f"{afile}: no annotation for question_id {qid} ({where}); add it or drop the question")
        image_id = _field(q, "image_id", where, "official VQA questions", int)
        name = f"COCO_{subtype}_{image_id:012d}.jpg"
        path = images.get(name)
        rows.append({"image": str(path) if path else str(root / name),
                     "question": _field(q, "question", where, "official VQA questions", str),
                     "answers": _field(ann, "answers", f"{afile} question_id {qid}", "official VQA annotations", list),
                     "multiple_choice_answer": ann.get("multiple_choice_answer"),
                     "question_type": ann.get("answer_type") or ann.get("question_type")})
    return rows


def _chartqa_json(root: Path, split: str) -> list[dict]:
    """ChartQA repo layout: <root>/<split>/<split>_{human,augmented}.json and <root>/<split>/png/."""
    split_dir = root / split
    files = sorted(split_dir.glob(f"{split}_*.json"))
    if not files:
        raise DataError(f"{split_dir}: no {split}_*.json (ChartQA layout); add them or set the task's train_split / "
                        "test_split")
    rows = []
    for f in files:
        for i, entry in enumerate(_entries(_read_json(f), None, f, "ChartQA")):
            where = f"{f} row {i}"
            rows.append({"image": str(split_dir / "png" / _field(entry, "imgname", where, "the chart's file in png/",
                                                                 str)),
                         "query": _field(entry, "query", where, "the question", str),
                         "label": [str(_field(entry, "label", where, "the answer", (str, int, float)))],
                         "question_type": f.stem.split("_", 1)[1], "human_or_machine": f.stem.split("_", 1)[1]})
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
    raise DataError(f"{root}: cannot tell the dataset format; set data.tasks.<task>.format")


def in_split(relative: Path, split: str) -> bool:
    """A parquet file of ``split``: named after it or inside a folder named after it, below the source's root
    (never judged by the folders above the root: a source kept under `.../test/vqa` is not all test data)."""
    return relative.name.startswith(split) or split in relative.parts[:-1]


def cauldron_rows(rows, origin: str) -> list[dict]:
    """the_cauldron's layout (``images``: list of images, ``texts``: list of {user, assistant}) as canonical-keyed
    rows, one per question turn, with the row's first image."""
    out = []
    for i, row in enumerate(rows):
        where = f"{origin} row {i}"
        images, texts = row.get("images"), row.get("texts")
        if not images or not isinstance(texts, list):
            raise DataError(f"{where}: not the_cauldron's layout (needs 'images' and 'texts' [{{user, assistant}}]); "
                            "set the task's format")
        for turn in texts:
            if not isinstance(turn, dict) or not turn.get("user") or not turn.get("assistant"):
                raise DataError(f"{where}: a 'texts' turn without 'user' and 'assistant'; fix or drop that row")
            out.append({"image": images[0], "question": turn["user"], "answers": [turn["assistant"]],
                        "answer": turn["assistant"]})
    return out


def load_split(spec, split_key: str, limit: int | None):
    """(rows, origin, layout) of a task's ``train`` or ``test`` split (``train_from`` when given for train): rows in
    the source's own layout, a name for error messages, and the layout's key for ``Task.columns_for``."""
    src = spec.train_from if split_key == "train" and spec.train_from is not None else spec
    split = src.split if src is not spec else getattr(spec, f"{split_key}_split")
    fmt = src.format
    if fmt == "cauldron":
        rows, origin = load_rows(src.source, "auto", split, limit, src.hub_config, src.revision)
        if hasattr(rows, "select"):  # a local copy: only the rows needed, images as bytes
            from datasets import Image, List

            rows = rows.select(range(min(limit or len(rows), len(rows))))
            rows = rows.cast_column("images", List(Image(decode=False))) if "images" in rows.column_names else rows
        return cauldron_rows(rows, origin)[:limit], origin, "canonical"
    rows, origin = load_rows(src.source, fmt, split, limit, src.hub_config, src.revision)
    return rows, origin, src.source


def hub_revision(source: str, config: str | None, revision: str | None) -> str | None:
    """The commit a hub dataset load resolves to (None for local sources or when the hub cannot be asked)."""
    if looks_local(source):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(source, revision=revision).sha
    except Exception:  # offline with a warm cache: the requested revision is all we know
        return revision


def looks_local(source: str) -> bool:
    return Path(source).expanduser().exists()


@contextlib.contextmanager
def quiet():
    """datasets' progress bars off (a pre-flight check prints nothing but its error), as they were afterwards."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _check_parquet(files: list[Path], split: str) -> None:
    """Each file's footer read by pyarrow before datasets loads them (which logs its own error line first, and on a
    file with no rows fails on a batch size): a DataError names the file."""
    import pyarrow.parquet as pq

    rows = 0
    for path in files:
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow's ArrowInvalid, OSError: not a parquet file, cut short, a folder
            raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); repair or re-export it") from None
    if rows == 0:
        raise DataError(f"{files[0].parent}: the parquet files of split '{split}' hold no rows; add rows or choose "
                        "another split")


def load_rows(source: str, fmt: str, split: str, limit: int | None, config: str | None = None,
              revision: str | None = None):
    """(rows, origin) of one split of a hub id or a local directory in any supported format. A hub split of which
    only ``limit`` rows are needed is streamed, not downloaded whole."""
    from datasets import load_dataset, load_from_disk

    root = Path(source).expanduser()
    if fmt == "hub" or (fmt == "auto" and not root.exists()):
        where = f"{source}{'/' + config if config else ''}:{split}"
        try:
            if limit:
                stream = load_dataset(source, config, split=split, revision=revision, streaming=True)
                return list(stream.decode(False).take(limit)), where
            return load_dataset(source, config, split=split, revision=revision), where
        except Exception as exc:  # not on the hub, no such split, offline...
            raise DataError(f"{where}: cannot load from the hub ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}); check the dataset id, config and split, or use a "
                            "local directory") from None
    if config:
        root = root / config  # a local copy of a hub repo: <root>/<config>/<split>-*.parquet
    fmt = _detect_format(root) if fmt == "auto" else fmt
    if fmt == "hf_disk":
        try:
            ds = load_from_disk(str(root))
        except Exception as exc:
            raise DataError(f"{root}: not a readable save_to_disk directory ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}); save it again with Dataset.save_to_disk") from None
        if hasattr(ds, "keys") and split not in ds:
            raise DataError(f"{root}: no split '{split}' (splits: {', '.join(ds.keys())}); set the task's "
                            "train_split / test_split to one of them")
        return (ds[split] if hasattr(ds, "keys") else ds), f"{root}:{split}"
    if fmt == "parquet":
        files = sorted(p for p in root.rglob("*.parquet") if in_split(p.relative_to(root), split))
        if not files:
            raise DataError(f"{root}: no parquet files for split '{split}' (expected {split}*.parquet or "
                            f"{split}/*.parquet); add them or set the task's train_split / test_split")
        _check_parquet(files, split)
        try:
            return load_dataset("parquet", data_files=[str(f) for f in files], split="train"), f"{files[0]}"
        except Exception as exc:
            raise DataError(f"{root}: parquet files of split '{split}' cannot be read ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}); repair or re-export them") from None
    if fmt == "vqa_official":
        return _vqa_official(root, split), f"{root}:{split}"
    return _chartqa_json(root, split), f"{root}:{split}"
