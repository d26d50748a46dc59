"""The message of an exported PR branch: upstream's PR template at the tag kept whole, each section filled
from the change (export_changes) and from what the export's checks measured (export_check), the checklist's
boxes ticked only for what ran."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from .export_changes import Change
from .export_check import CheckResult
from .export_opt_fixes import FIXES, STRICT


@dataclass
class Built:
    change: Change
    sha: str
    files: int = 0
    added: int = 0
    deleted: int = 0
    checks: list[CheckResult] = field(default_factory=list)
    rebase: str = ""
    base_sha: str = ""  # what the branch starts from: the tag, or the branch it is stacked on
    notes: list[str] = field(default_factory=list)  # what was left out and why


SECTIONS = ("Motivation", "Modifications", "Accuracy Tests", "Speed Tests and Profiling", "Checklist")


def _guards(test_text: str) -> dict[str, str]:
    """test method name -> the first paragraph of its docstring, on one line (what it guards; a docstring
    wrapped at upstream's 88 columns would otherwise stop mid-sentence)."""
    found = {}
    for node in ast.walk(ast.parse(test_text)):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            doc = (ast.get_docstring(node) or "").strip()
            found[node.name] = " ".join(doc.split("\n\n")[0].split()) if doc else "(no docstring)"
    return found


def _tests_block(change: Change, tag: str, item: Built, environment: str, prefix: str, work: Path) -> str:
    base = f"`{tag}`" if not change.depends_on else f"`{prefix}/{change.depends_on}`"
    lines = []
    own = [c for c in item.checks if c.name.startswith("exported test ")]
    if not own:
        lines.append(
            "**Tests** ("
            + ", ".join(f"`{t}`" for t in change.tests)
            + ", CPU, `register_cpu_ci`): not run by this export (it ran without `--check`)."
        )
        return "\n".join(lines)
    lines.append(f"**Tests**, run by the export at the branch tip and on {base} ({environment}):")
    for check in own:
        rel = check.name.removeprefix("exported test ")
        guards = _guards((work / rel).read_text()) if (work / rel).is_file() else {}
        lines.append(f"- `python3 {rel}` (CPU, `register_cpu_ci`): {check.note}")
        for test, (tip, at_base) in check.outcomes.items():
            method = test.split(" ")[0]
            verdict = f"fails on {base} ({at_base})" if at_base != "ok" else f"passes on {base} too"
            lines.append(f"  - `{test}`: {tip} here, {verdict}. {guards.get(method, '')}")
    related = [c for c in item.checks if c.name.startswith("upstream unit test ")]
    if related:
        lines.append(
            "- upstream's CPU unit tests that sweep the tree or name a changed module, at the tip: "
            + "; ".join(f"`{c.name.removeprefix('upstream unit test ')}` {c.note or 'passed'}" for c in related)
        )
    collection = next((c for c in item.checks if c.name.startswith("test/run_suite")), None)
    if collection:
        lines.append(f"- `test/run_suite.py` collection: {collection.note or ('ok' if collection.ok else 'FAILED')}")
    return "\n".join(lines)


def _checklist_ticks(change: Change, item: Built) -> dict[str, str]:
    """Checklist item keyword -> what ran for it; only items whose check ran and passed are ticked."""
    hooks = [c for c in item.checks if c.name.startswith("pre-commit ")]
    tests = [c for c in item.checks if c.name.startswith("exported test ")]
    ticks = {}
    if hooks and all(c.ok for c in hooks):
        ticks["Format your code"] = "ran at the tip: " + ", ".join(c.name.removeprefix("pre-commit ") for c in hooks)
    if tests and all(c.ok for c in tests):
        ticks["Add unit tests"] = "ran at the tip: " + ", ".join(
            f"`{c.name.removeprefix('exported test ')}` ({c.note})" for c in tests
        )
    if change.env_docs and not any(n.startswith("docs:") for n in item.notes):
        ticks["Update documentation"] = "the environment-variables page gains the variable's row"
    return ticks


def pr_message(
    change: Change,
    tag: str,
    item: Built,
    template: str,
    environment: str,
    prefix: str,
    work: Path,
) -> str:
    fixes = FIXES if change.opt == "fixes" else STRICT
    modifications = change.modifications or "\n".join(f"- {fix.what}." for fix in fixes)
    body = {
        "Motivation": change.motivation,
        "Modifications": modifications + "\n\n" + _tests_block(change, tag, item, environment, prefix, work),
        "Accuracy Tests": change.accuracy,
        "Speed Tests and Profiling": change.speed,
    }
    ticks = _checklist_ticks(change, item)
    if not template.strip():
        template = "".join(f"## {name}\n\n" for name in SECTIONS)
    out: list[str] = []
    lines = template.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        out.append(line)
        index += 1
        name = line[3:].strip() if line.startswith("## ") else ""
        if name in body:
            while index < len(lines) and (not lines[index].strip() or lines[index].lstrip().startswith("<!--")):
                out.append(lines[index])
                index += 1
            if out[-1].strip():
                out.append("")
            out += [body[name], ""]
        elif line.lstrip().startswith("- [ ]"):
            key = next((k for k in ticks if k.lower() in line.lower()), None)
            if key:
                out[-1] = line.replace("- [ ]", "- [x]", 1)
                out.append(f"  - {ticks[key]}")
    return change.title + "\n\n" + "\n".join(out).rstrip() + "\n"
