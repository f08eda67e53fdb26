"""Leases: one live owner per stage key or run directory, among runs that may start at once.

A lease is a small JSON file naming its owner (pid, host, process start time). It is taken over only from an owner
that is gone: on the same host, a process that no longer exists (or is another process with a recycled pid); on
another host, one that stopped refreshing the lease (the owner touches it every `REFRESH_S`). Every check and
take-over happens under a POSIX lock on a guard file, so two runs never both win.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

import psutil

from runtime.atomic import atomic_write

REFRESH_S = 15.0
STALE_AFTER_S = 120.0  # an owner on another host that has not refreshed for this long is gone


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": psutil.Process().create_time(),
            "since": time.time()}


def owner_alive(owner: dict, mtime: float) -> bool:
    """Whether the process that wrote a lease still holds it."""
    if owner.get("host") != socket.gethostname():
        return time.time() - mtime < STALE_AFTER_S
    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["proc_start"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


class Lease:
    """An exclusive, refreshed claim on ``path`` (the lease file itself)."""
    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def _guard(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.lockf(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(guard, fcntl.LOCK_UN)

    def holder(self) -> dict | None:
        """The live owner of the lease, or None when it is free (absent, or its owner is gone)."""
        try:
            owner, mtime = json.loads(self.path.read_text()), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable: only a writer that died mid-write leaves that (writes are atomic)
            return None
        return owner if owner_alive(owner, mtime) else None

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free; returns None on success, else its live owner."""
        with self._guard():
            owner = self.holder()
            if owner is not None:
                return owner
            atomic_write(self.path, json.dumps(_me()))
        self._thread = threading.Thread(target=self._refresh, name="vlmlab-lease", daemon=True)
        self._thread.start()
        return None

    def acquire(self, on_wait=None, poll_s: float = 2.0) -> None:
        """Wait for the lease; ``on_wait(owner)`` is called once, when another live run holds it."""
        told = False
        while (owner := self.try_acquire()) is not None:
            if on_wait and not told:
                on_wait(owner)
                told = True
            time.sleep(poll_s)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._guard():
            with contextlib.suppress(OSError, ValueError):
                owner = json.loads(self.path.read_text())
                if (owner.get("pid"), owner.get("host")) == (os.getpid(), socket.gethostname()):
                    self.path.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
