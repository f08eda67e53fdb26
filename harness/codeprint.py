"""What a stage's result depends on besides its config: the project code it runs, the packages under it, and the
content of local source directories. All of it goes into the stage's cache key.

Code: the stage's module and every project module it imports, at module level or inside functions, found by
walking the source with `ast` (no import, no trace), plus the files a stage loads by path (`DATA_FILES`, e.g.
lm-eval task YAMLs and their `utils.py`). Packages: the installed versions of the project's declared dependencies.
Local sources: every file's relative path, size and sha256; hashes are remembered by (size, mtime) so that an
unchanged tree is only stat'ed.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import threading
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("evals", "runtime", "stages", "harness")


def _module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (a module or a package's __init__), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere (functions included; `if TYPE_CHECKING:` blocks skipped)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking_only(node)
               for child in node.body for n in ast.walk(child)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level-1 parents
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    # a module's parent packages run too (their __init__)
    found |= {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 1)}
    return {name for name in found if _module_file(name) is not None}


def code_files(module: str, data_files: tuple[str, ...] = ()) -> list[Path]:
    """Every project file ``module`` runs (its import closure) plus ``data_files`` (paths under the project root:
    files, or folders taken whole); the Python files among those are followed too."""
    todo = [_module_file(module), *(p for entry in data_files for p in _expand(PROJECT_ROOT / entry))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        if path.suffix == ".py":
            todo += [_module_file(name) for name in imports(path)]
    return sorted(seen)


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [path] if path.is_file() else []


def code_manifest(module: str, data_files: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 (first 16 hex digits) of every project file the stage runs."""
    return {str(path.relative_to(PROJECT_ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            for path in code_files(module, data_files)}


def fingerprint(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=1)
def dependency_versions() -> dict[str, str | None]:
    """Installed versions of the project's declared dependencies (from its own metadata)."""
    try:
        requires = metadata.requires("vlmlab") or []
    except metadata.PackageNotFoundError:  # running from a copy of the source that is not installed
        requires = []
    names = sorted({re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r})
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class TreeHasher:
    """Content fingerprints of local directories, with a stat cache (``<cache>/fingerprints.json``): a file whose
    size and mtime are unchanged is not read again."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self._lock = threading.Lock()
        try:
            self._known = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            self._known = {}

    def _file_sha(self, path: Path, st: os.stat_result) -> str:
        key = hashlib.sha256(str(path).encode()).hexdigest()  # a path can hold a secret: never written as is
        stamp = [st.st_size, st.st_mtime_ns]
        known = self._known.get(key)
        if known and known[:2] == stamp:
            return known[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        self._known[key] = [*stamp, h.hexdigest()]
        return h.hexdigest()

    def fingerprint(self, root: Path) -> str:
        """sha256 over (relative path, size, sha256) of every file under ``root`` (or of ``root`` itself)."""
        h = hashlib.sha256()
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            st = path.stat()
            rel = path.name if path == root else str(path.relative_to(root))
            h.update(f"{rel}\0{st.st_size}\0{self._file_sha(path, st)}\0".encode())
        return h.hexdigest()

    def save(self) -> None:
        with self._lock:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._known))
            os.replace(tmp, self.cache_file)
