"""Running commands and git (project-agnostic helpers)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import OverlayError


def run(
    cmd: Sequence[str], cwd: Optional[Path] = None, env: Optional[dict] = None, check: bool = True, capture: bool = True
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (text mode); with ``check``, a non-zero exit raises OverlayError with its stderr.

    Without ``capture`` the command's output goes to this process's stderr, both streams: stdout carries
    only the verbs' results (``PY=$(overlay.py venv X DIR)`` gets the path and nothing of pip's)."""
    sys.stderr.flush()
    proc = subprocess.run(
        list(cmd),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        stdout=subprocess.PIPE if capture else sys.stderr.fileno(),
        stderr=subprocess.PIPE if capture else None,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip() if capture else ""
        raise OverlayError(f"`{' '.join(cmd)}` failed (exit {proc.returncode})" + (f":\n{detail}" if detail else ""))
    return proc


def git(*args: str, cwd: Path, env: Optional[dict] = None, check: bool = True) -> str:
    """``git ARGS`` in ``cwd``; its stdout."""
    return run(["git", *args], cwd=cwd, env=env, check=check).stdout


def git_ok(*args: str, cwd: Optional[Path], env: Optional[dict] = None) -> bool:
    """Whether ``git ARGS`` exits 0 (its output is discarded)."""
    return run(["git", *args], cwd=cwd, env=env, check=False).returncode == 0


def sha256(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else hashlib.sha256(data).hexdigest()


def read_bytes(path: Path) -> Optional[bytes]:
    """The file's bytes, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def log(msg: str) -> None:
    """Progress for the user, on stderr (stdout carries the verbs' results)."""
    print(msg, file=sys.stderr, flush=True)
