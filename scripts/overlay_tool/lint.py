"""The project's own lint and format check: ruff, pinned here, over the files pyproject.toml's ``[tool.ruff]``
includes (the fork and tool layers, the tests, the benchmarks) with its rules. The upstream layer keeps
upstream's pinned formatters (``export-pr --check`` runs them)."""

from __future__ import annotations

from pathlib import Path

from .envs import venv_entry, venv_python
from .gitutil import run
from .releases import Overlay

RUFF = "ruff==0.17.6"


def ruff_env(envs: Path) -> Path:
    """A cached venv with the pinned ruff; its ruff executable."""
    directory = envs / f"lint-{RUFF.replace('==', '-')}"
    with venv_entry(directory, {"ruff": RUFF}, f"the project's linter ({RUFF})") as python:
        if python is not None:
            run([str(python), "-m", "pip", "install", "-q", RUFF], capture=False)
    return venv_python(directory).parent / "ruff"


def lint(overlay: Overlay, envs: Path, fix: bool = False) -> list[str]:
    """What ``ruff check`` and ``ruff format --check`` find in the project's own code (empty: clean);
    ``fix`` applies ruff's safe fixes and formats first."""
    ruff = str(ruff_env(envs))
    if fix:
        run([ruff, "check", "--fix", "-q", "."], cwd=overlay.root, check=False)
        run([ruff, "format", "-q", "."], cwd=overlay.root)
    problems = []
    for cmd in ([ruff, "check", "--output-format", "concise", "."], [ruff, "format", "--check", "."]):
        proc = run(cmd, cwd=overlay.root, check=False)
        if proc.returncode != 0:
            problems.append(f"`{' '.join(['ruff', *cmd[1:]])}`:\n{(proc.stdout + proc.stderr).strip()}")
    return problems
