"""Cache entries that several runs may build at once (project-agnostic): one builder per entry, and
readers that only ever see a whole entry.

``entry_lock(entry, what)`` holds an exclusive ``flock`` on ``.<name>.lock`` beside the entry while a
run builds it. A second run that needs the same entry says on stderr that it waits ("waiting for
another overlay.py (pid N) building X"), then looks again once it holds the lock and reuses what the
first one built. The kernel drops a lock when its holder exits, killed or not, so a lock never
outlives its run; the lock file stays (empty) and is never deleted: a waiter and a newcomer would
then lock two different files.

Readers take no lock. An entry is whole once its last step is done, and that step is atomic: a
rename into place (a wheel, a release tree) or a marker written last with ``write_atomic`` (a venv,
built in place: its console scripts' shebangs and ``pyvenv.cfg`` hold its absolute path, so a venv
renamed into place runs ``bin/python`` but not ``bin/pip``). A builder removes an incomplete entry
(a killed run's) only while it holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .gitutil import log

_HELD: set[str] = set()  # the lock files this process holds (a nested entry_lock of the same entry passes)


def lock_file(entry: Path) -> Path:
    """Where the lock of ``entry`` lives: ``.<name>.lock`` in the same folder."""
    return entry.parent / f".{entry.name}.lock"


@contextmanager
def entry_lock(entry: Path, what: str) -> Iterator[None]:
    """Build ``entry`` (described as ``what`` to a waiting run) while no other process does."""
    path = lock_file(entry)
    key = os.path.abspath(path)
    if key in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip()
            log(f"waiting for another overlay.py{f' ({holder})' if holder else ''} building {what}; lock file {path}")
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"waited {time.monotonic() - started:.0f} s for {what}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that a reader sees the old content or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
