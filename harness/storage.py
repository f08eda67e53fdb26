"""Output dirs in object storage: `--output-dir s3://bucket/prefix` (or `gs://`, any URI `pyarrow.fs` opens).

The pipeline works on a local mirror of the output dir (`$VLMLAB_LOCAL_DIR/<sha256 of the URI>[:16]`, by default
under `~/.cache/vlmlab/remote/`) and copies into the bucket what a later run, on any machine, needs: `config.yaml` at
the start, each finished stage's files, `stage.json` and cache entry, `result.json` at the end. Ray Train's
`storage_path` is the bucket itself (`<uri>/.cache/ray`), so checkpoints are written to and restored from there by
Ray. A cache entry missing from the mirror is fetched, with the files it lists, before it is verified as usual.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

from runtime.atomic import atomic_write
from runtime.errors import UserError

DEFAULT_MIRRORS = "~/.cache/vlmlab/remote"


def is_remote(output_dir: str) -> bool:
    """A URI with a scheme other than file:// (s3://, gs://...), as opposed to a local path."""
    return "://" in output_dir and not output_dir.startswith("file://")


class OutputDir:
    """Where run directories go: ``local`` (a directory, or a bucket's local mirror) and, for a bucket, ``uri``."""

    def __init__(self, output_dir: str):
        self.uri: str | None = None
        if not is_remote(output_dir):
            self.local = Path(output_dir.removeprefix("file://")).expanduser().resolve()
            return
        import pyarrow.fs


        self.uri = output_dir.rstrip("/")
        if "@" in self.uri.split("://", 1)[1].split("/", 1)[0]:  # Ray and MLflow would store the URI as it is
            raise UserError("--output-dir: put no credentials in the URI; give them in the environment "
                            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)")
        try:
            self.fs, self.base = pyarrow.fs.FileSystem.from_uri(self.uri)  # what Ray Train uses for storage_path
            bucket = self.base.split("/", 1)[0]
            found = self.fs.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
        except (OSError, ValueError) as exc:  # an unknown scheme, an unreachable endpoint, refused credentials
            raise UserError(f"--output-dir: cannot use {self.uri} ({exc})") from None
        if not found:
            raise UserError(f"--output-dir: bucket '{bucket}' does not exist: create it first")
        mirrors = Path(os.environ.get("VLMLAB_LOCAL_DIR") or DEFAULT_MIRRORS).expanduser()
        self.local = (mirrors / hashlib.sha256(self.uri.encode()).hexdigest()[:16]).resolve()

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.local).as_posix()

    def uri_of(self, path: Path) -> str:
        """The bucket URI of a path in the mirror (the path itself for a local output dir)."""
        return f"{self.uri}/{self._rel(path)}" if self.uri else str(path)

    def _key(self, path: Path) -> str:
        return f"{self.base}/{self._rel(path)}"

    def has(self, path: Path) -> bool:
        """Whether the file exists in the mirror or in the bucket."""
        if path.exists() or self.uri is None:
            return path.exists()
        import pyarrow.fs

        return self.fs.get_file_info(self._key(path)).type != pyarrow.fs.FileType.NotFound

    def push(self, *files: Path) -> None:
        """Upload files of the mirror to the same place in the bucket, in order (a no-op for a local dir)."""
        if self.uri is None:
            return
        import pyarrow.fs

        for file in files:
            pyarrow.fs.copy_files(str(Path(file).resolve()), self._key(file),
                                  source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.fs)

    def pull(self, file: Path) -> bool:
        """Download a file of the bucket into the mirror unless it is there; whether it is there now."""
        if file.exists() or self.uri is None:
            return file.exists()
        try:
            stream = self.fs.open_input_stream(self._key(file))
        except FileNotFoundError:
            return False
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.part")  # a torn download never looks whole
        try:
            with stream, open(tmp, "wb") as out:
                while chunk := stream.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def pull_entry(self, entry: Path) -> None:
        """Fetch a stage-cache entry and the files it lists from the bucket, when the mirror lacks the entry.

        Entries record absolute paths: one written through another mirror (another machine, another
        ``VLMLAB_LOCAL_DIR``) has that mirror's prefix replaced by this one's.
        """
        if self.uri is None or entry.exists():
            return
        try:
            with self.fs.open_input_stream(self._key(entry)) as stream:
                text = stream.read().decode()
            written_under = Path(json.loads(text)["stage_dir"]).parents[1]  # <mirror>/<run id>/<stage>
        except (FileNotFoundError, ValueError, KeyError, IndexError):
            return  # absent, or unreadable: the lookup reports a miss (or the damage) as for a local entry
        if written_under != self.local:
            text = text.replace(f'"{written_under}/', f'"{self.local}/')
        for file in json.loads(text).get("files", {}):
            with contextlib.suppress(ValueError):  # a path outside the mirror: the lookup names it as missing
                self.pull(Path(file))

        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(entry, text)

    def delete_dir(self, path: Path) -> None:
        """Remove a directory of the bucket (a no-op for a local dir)."""
        if self.uri is not None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(self._key(path))
