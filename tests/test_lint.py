"""The project's own code passes its linter and formatter (pyproject.toml's [tool.ruff], ruff pinned in
scripts/overlay_tool/lint.py): CI's full row runs it; ``python3 scripts/overlay.py lint --fix`` mends it."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from overlay_tool.cache import Cache  # noqa: E402
from overlay_tool.lint import lint  # noqa: E402
from overlay_tool.releases import Overlay  # noqa: E402


def test_the_project_code_is_lint_clean_and_formatted() -> None:
    problems = lint(Overlay.load(REPO), Cache().root / "venvs")
    assert not problems, "\n\n".join(problems) + "\n\nrun `python3 scripts/overlay.py lint --fix`"
