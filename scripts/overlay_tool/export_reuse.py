"""The distributed-reuse files of ``export-pr``, specialised to the target tag.

This repository's ``srt/distributed/reuse.py`` runs on every supported release (0.4.9 on), so it
carries code that a single upstream tag does not need: blocks marked

    # overlay-only: begin
    ... this repository's code (release fallbacks, the fork's allow_reuse()) ...
    # overlay-only: upstream
    # ... what the exported file has instead, commented out ...
    # overlay-only: end

``exported_reuse`` drops each block's own lines and un-comments its "upstream" lines, so the exported
file reads the variable as upstream declares it (``envs.SGLANG_ALLOW_REUSE_DISTRIBUTED``, added to
``srt/environ.py`` by the variant's hook patch) and has no branch for another release.
``docs_with_env_row`` adds the variable's row to the tag's environment-variables page.
"""

from __future__ import annotations

import re
from typing import Optional

from .errors import OverlayError

REUSE_PATH = "python/sglang/srt/distributed/reuse.py"
ENVIRON_PATH = "python/sglang/srt/environ.py"
ENV_NAME = "SGLANG_ALLOW_REUSE_DISTRIBUTED"
ENV_DESCRIPTION = (
    "Let a process that already has a torch.distributed world and model-parallel groups build another "
    "<code>ModelRunner</code> (e.g. <code>sglang.benchmark.one_batch.load_model</code> called twice): "
    "<code>init_distributed_environment</code> and <code>initialize_model_parallel</code> reuse what "
    "exists when every argument matches the call that built it, and raise <code>ValueError</code> "
    "naming each difference otherwise."
)
# The environment-variables page, newest layout first, and the section the row goes in.
ENV_DOCS = ("docs/docs/references/environment_variables.mdx", "docs/references/environment_variables.md")
ENV_DOCS_SECTION = "## Distributed Computing"

BEGIN, UPSTREAM, END = "# overlay-only: begin", "# overlay-only: upstream", "# overlay-only: end"


def exported_reuse(text: str, name: str = REUSE_PATH) -> str:
    """``text`` (this repository's reuse.py) as it ships upstream: every overlay-only block replaced by
    its "upstream" lines, un-commented."""
    out: list[str] = []
    state = "out"
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        marker = line.strip()
        if marker.startswith("# overlay-only:"):
            expected = {"out": BEGIN, "own": UPSTREAM, "upstream": END}[state]
            if marker != expected:
                raise OverlayError(f"{name}:{number}: {marker!r} where {expected!r} was expected")
            state = {"out": "own", "own": "upstream", "upstream": "out"}[state]
            continue
        if state == "out":
            out.append(line)
        elif state == "upstream":
            indent = line[: len(line) - len(line.lstrip())]
            body = line.lstrip()
            if not body.startswith("#"):
                raise OverlayError(f"{name}:{number}: an overlay-only upstream line must be commented out")
            body = body[1:]
            out.append(indent + (body[1:] if body.startswith(" ") else body.lstrip("\n") or "\n"))
    if state != "out":
        raise OverlayError(f"{name}: an overlay-only block is not closed with {END!r}")
    result = "".join(out)
    if "overlay-only" in result:
        raise OverlayError(f"{name}: a stray overlay-only marker is left in the exported file")
    return result


def declares_env(environ_text: str) -> bool:
    return re.search(rf"^\s+{ENV_NAME} = EnvBool\(", environ_text, re.M) is not None


def docs_with_env_row(text: str, path: str) -> Optional[str]:
    """The environment-variables page ``text`` with the variable's row at the end of its distributed
    section's table, or None when the page has no such section (the caller says so)."""
    start = text.find(ENV_DOCS_SECTION + "\n")
    if start < 0 or ENV_NAME in text:
        return None
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    if path.endswith(".mdx"):
        close = section.rfind("  </tbody>")
        rows = re.findall(r"    <tr>\n(?:.*\n)*?    </tr>\n", section)
        if close < 0 or not rows:
            return None
        cells = re.findall(r"<td style=\{\{[^}]*\}\}>", rows[-1])
        if len(cells) != 3:
            return None
        row = (
            "    <tr>\n"
            f"      {cells[0]}<code>{ENV_NAME}</code></td>\n"
            f"      {cells[1]}{ENV_DESCRIPTION}</td>\n"
            f"      {cells[2]}<code>false</code></td>\n"
            "    </tr>\n"
        )
        at = start + close
    else:
        lines = [m for m in re.finditer(r"^\|.*\|\n", section, re.M)]
        if len(lines) < 2:
            return None
        plain = re.sub(r"</?code>", "`", ENV_DESCRIPTION)
        row = f"| `{ENV_NAME}` | {plain} | `false` |\n"
        at = start + lines[-1].end()
    return text[:at] + row + text[at:]
