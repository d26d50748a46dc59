"""``export-pr --check``: upstream's own checks on a branch tip, as upstream's CI runs them.

- the pre-commit hooks of the tag's ``.pre-commit-config.yaml`` that PyPI packages implement
  (isort, ruff, black, codespell, pre-commit-hooks' checks, at the pinned revisions, with the
  hooks' args / files / exclude and the repository's own config files) and its local
  ``python3 ...`` hooks, on the files the branch changes; a fixer that changes a file fails. A hook
  that fails is run on the base's versions of those files too; when it fails there as well and
  every finding on the branch is one it makes at the base, it is reported and not held against the
  branch (upstream's own code at these pins, e.g. a stand-in's newer sources under an older tag's pins);
- test collection as ``test/run_suite.py`` does it: every file under ``test/registered/``,
  ``collect_tests(sanity_check=True)`` and ``validate_all_suites``;
- the branch's own tests (files it adds under ``test/registered/``), ``python3 FILE`` from the root;
- upstream's CPU unit tests that touch the changed files: those that sweep the source tree
  (``rglob``) and those that name a changed module. One that fails at the tip is run at the base
  too; failing there as well, it is reported and not held against the branch.

Two venvs, both cached: the lint venv (the pinned tools + PyYAML to read the config) and the test
venv (matrix's base + transformers layer, plus what upstream's test utilities import).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .envs import _digest, make_deps_env, site_packages, venv_python
from .gitutil import git, run
from .locks import entry_lock

# pre-commit repo (owner/name) -> (PyPI package, how the rev maps to its version)
PYPI_HOOK_REPOS = {
    "PyCQA/isort": "isort",
    "astral-sh/ruff-pre-commit": "ruff",
    "psf/black": "black",
    "codespell-project/codespell": "codespell",
    "pre-commit/pre-commit-hooks": "pre-commit-hooks",
}
# hook id -> command (pre-commit passes the file names after the hook's args)
HOOK_COMMANDS = {
    "isort": ["isort"],
    "ruff": ["ruff", "check", "--force-exclude"],
    "black": ["black"],
    "black-jupyter": ["black"],
    "codespell": ["codespell"],
    "check-ast": ["check-ast"],
    "trailing-whitespace": ["trailing-whitespace-fixer"],
    "end-of-file-fixer": ["end-of-file-fixer"],
    "debug-statements": ["debug-statement-hook"],
    "check-merge-conflict": ["check-merge-conflict"],
    "check-toml": ["check-toml"],
    "detect-private-key": ["detect-private-key"],
}
# The file types a hook's own manifest (`types:` in its repository's .pre-commit-hooks.yaml) limits it
# to; hooks not listed take every text file.
HOOK_SUFFIXES = {hid: (".py", ".pyi") for hid in ("isort", "ruff", "black", "check-ast", "debug-statements")}
HOOK_SUFFIXES.update({"black-jupyter": (".py", ".pyi", ".ipynb"), "check-toml": (".toml",)})
TEST_EXTRAS = ("datasets", "tabulate")  # imported by sglang.test.test_utils / test/run_suite.py
TEST_TIMEOUT = 600

READ_CONFIG = r"""
import json, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
print(json.dumps(cfg))
"""

COLLECT = r"""
import glob, os, sys
sys.path[:0] = [os.path.abspath("test"), os.path.abspath("python")]
import run_suite
from sglang.test.ci.ci_register import collect_tests
files = [f for f in glob.glob(os.path.join("test", "registered", "**", "*.py"), recursive=True)
         if os.path.basename(f) not in ("conftest.py", "__init__.py")]
tests = collect_tests(files, sanity_check=True)
run_suite.validate_all_suites(tests)
print(f"collect_tests(sanity_check=True): {len(tests)} registrations in {len(files)} files, suites valid")
"""


@dataclass
class CheckResult:
    name: str
    ok: bool
    output: str  # the last lines that say what happened
    note: str = ""
    # exported tests: test id -> (outcome at the tip, outcome at the base), outcomes "ok" / "FAIL" /
    # "ERROR" / "skipped ..." as unittest -v prints them
    outcomes: dict = field(default_factory=dict)

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return f"  [{status}] {self.name}" + (f" ({self.note})" if self.note else "")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def precommit_config(root: Path, lint_python: Path) -> dict:
    path = root / ".pre-commit-config.yaml"
    if not path.is_file():
        return {"repos": []}
    out = run([str(lint_python), "-c", READ_CONFIG, str(path)]).stdout
    return json.loads(out)


def lint_pins(config: dict) -> list[str]:
    """``pkg==version`` for each PyPI-implemented hook repo of the config."""
    pins = []
    for repo in config.get("repos", []):
        name = "/".join(str(repo.get("repo", "")).rstrip("/").split("/")[-2:]).removesuffix(".git")
        if name in PYPI_HOOK_REPOS:
            pins.append(f"{PYPI_HOOK_REPOS[name]}=={str(repo['rev']).removeprefix('v')}")
    return pins


def make_lint_env(root: Path, envs: Path) -> Path:
    """A venv with the tag's pinned linters (read from its .pre-commit-config.yaml) and PyYAML."""
    boot = envs / "lint-bootstrap"
    if not venv_python(boot).exists():
        run([sys.executable, "-m", "venv", str(boot)])
        run([str(venv_python(boot)), "-m", "pip", "install", "-q", "pyyaml"])
    pins = lint_pins(precommit_config(root, venv_python(boot)))
    directory = envs / f"lint-{_digest(pins)}"
    python = venv_python(directory)
    if not (directory / "ready").exists():
        run([sys.executable, "-m", "venv", str(directory)])
        run([str(python), "-m", "pip", "install", "-q", "pyyaml", *pins])
        (directory / "ready").write_text("\n".join(pins) + "\n")
    return python


def make_test_env(transformers: str, overlay, envs: Path) -> Path:  # overlay: releases.Overlay
    """matrix's base venv + transformers layer, plus what upstream's test utilities import."""
    deps_python = make_deps_env(transformers, overlay, envs)
    directory = envs / f"upstream-tests-{transformers}-{_digest([str(deps_python), *TEST_EXTRAS])}"
    python = venv_python(directory)
    with entry_lock(directory, f"the upstream test venv {directory}"):  # matrix rows may ask at once
        if not (directory / "ready").exists():
            run([sys.executable, "-m", "venv", "--clear", str(directory)])
            (site_packages(python) / "zz_upstream_tests_layer.pth").write_text(
                f"import site; site.addsitedir({str(site_packages(deps_python))!r})\n"
            )
            constraints = directory / "constraints.txt"
            torch = run([str(python), "-c", "import torch; print(torch.__version__.split('+')[0])"]).stdout.strip()
            constraints.write_text(f"torch=={torch}\ntransformers=={transformers}\n")
            run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *TEST_EXTRAS])
            (directory / "ready").write_text("ok\n")
    return python


def changed_files(work: Path, base_rev: str) -> list[str]:
    return [p for p in git("diff", "--name-only", "--diff-filter=AM", base_rev, "HEAD", cwd=work).split() if p]


def _matches(pattern: Optional[str], rel: str) -> bool:
    return bool(pattern) and re.search(pattern, rel) is not None


def _run_hook(root: Path, argv: list[str], env: dict) -> tuple[bool, str, str]:
    """Run one hook in ``root``: (passed, its output, the diff of what it changed); ``root`` is restored."""
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    diff = ""
    if git("status", "--porcelain", cwd=root).strip():
        diff = git("diff", "-U0", cwd=root)
        git("checkout", "--", ".", cwd=root)
    return proc.returncode == 0 and not diff, proc.stdout + proc.stderr, diff


def _findings(output: str, diff: str) -> list[str]:
    """A hook's findings, comparable between two trees: each hunk of what it changed (the lines it
    removes and adds, not where), else each output line with line and column numbers dropped."""
    if diff:
        hunks = re.split(r"^@@[^\n]*\n", diff, flags=re.M)[1:]
        return [re.sub(r"^diff --git.*", "", h, flags=re.M | re.S).strip() for h in hunks]
    return [re.sub(r":\d+(:\d+)?\b", "", ln).strip() for ln in output.splitlines() if ln.strip()]


def run_hooks(work: Path, files: list[str], lint_python: Path, base: "BaseTree") -> list[CheckResult]:
    """The configured hooks on ``files``. A failing hook is run on the base's versions of the files too;
    when every finding on the branch is also at the base (upstream's own code at these pins: in a
    stand-in, the tag's pins against a newer release's sources), it is reported and not held against
    the branch."""
    config = precommit_config(work, lint_python)
    bin_dir = lint_python.parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    results = []
    for repo in config.get("repos", []):
        for hook in repo.get("hooks", []):
            hid = hook["id"]
            stages = hook.get("stages")
            if stages and not {"pre-commit", "commit"} & set(stages):
                continue
            if repo.get("repo") == "local":
                entry = str(hook.get("entry", ""))
                if hook.get("language") != "system" or not entry.startswith("python3 "):
                    continue
                command = [str(lint_python), *entry.split()[1:]]
            elif hid in HOOK_COMMANDS:
                command = [*HOOK_COMMANDS[hid]]
            else:
                continue
            chosen = [
                f
                for f in files
                if (not hook.get("files") or _matches(hook["files"], f))
                and not _matches(hook.get("exclude"), f)
                and not _matches(config.get("exclude"), f)
                and (hid not in HOOK_SUFFIXES or f.endswith(HOOK_SUFFIXES[hid]))
            ]
            if not chosen:
                continue
            args = [a for a in hook.get("args", []) if a != "--fix" or hid != "ruff"]
            names = [] if hook.get("pass_filenames") is False else chosen
            ok, output, diff = _run_hook(work, [*command, *args, *names], env)
            note = f"{len(chosen)} file(s)"
            if not ok:
                root = base.path()
                at_base = [f for f in names if (root / f).is_file()] if names else []
                if at_base or not names:
                    base_ok, base_output, base_diff = _run_hook(root, [*command, *args, *at_base], env)
                    new = list(_findings(output, diff))
                    for finding in _findings(base_output, base_diff):
                        if finding in new:
                            new.remove(finding)
                    if not base_ok and not new:
                        ok = True
                        note += "; every finding is also at the base, not caused by the branch"
            text = _tail(output) + (f"\nchanged files:\n{_tail(diff, 40)}" if diff else "")
            version = next((p for p in lint_pins({"repos": [repo]})), "local hook")
            results.append(CheckResult(f"pre-commit {hid} ({version})", ok, text, note))
    return results


def run_collection(work: Path, test_python: Path) -> CheckResult:
    if not (work / "test" / "run_suite.py").is_file():
        return CheckResult("test/run_suite.py collection", False, "test/run_suite.py is missing")
    proc = subprocess.run(
        [str(test_python), "-c", COLLECT], cwd=work, capture_output=True, text=True, timeout=TEST_TIMEOUT
    )
    return CheckResult(
        "test/run_suite.py collection",
        proc.returncode == 0,
        _tail(proc.stdout + proc.stderr),
        _tail(proc.stdout, 1) if proc.returncode == 0 else "",
    )


ENVIRONMENT = r"""
import os, platform, sys
import torch, transformers
print(f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, no GPU used; Python "
      f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
"""


def test_environment(test_python: Path) -> str:
    """Where the tests of --check run, in one line."""
    proc = subprocess.run([str(test_python), "-c", ENVIRONMENT], capture_output=True, text=True)
    return proc.stdout.strip() or f"(could not be read: {_tail(proc.stderr, 1)})"


OUTCOME = re.compile(r"(?:^|\.\.\. )(ok|FAIL|ERROR|skipped\b.*|expected failure|unexpected success)$")
TEST_HEADER = re.compile(r"^(test\w*) \(([\w.]+)\)")


def test_outcomes(output: str) -> dict[str, str]:
    """``unittest -v`` output -> {"test_x (Class)": "ok" | "FAIL" | "ERROR" | "skipped ..."}: each test's
    header line, then the first outcome after it (on that line after " ... ", or on a line of its own
    when the test printed in between, as CustomTestCase does)."""
    found: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        header = TEST_HEADER.match(line)
        if header:
            parts = header.group(2).split(".")
            if parts[-1] == header.group(1):  # Python 3.11+: module.Class.test
                parts = parts[:-1]
            current = f"{header.group(1)} ({parts[-1]})"
        if current is None:
            continue
        outcome = OUTCOME.search(line.strip())
        if outcome:
            found[current] = outcome.group(1)
            current = None
    return found


def run_test_file(root: Path, rel: str, test_python: Path, verbose: bool = False) -> tuple[bool, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "python"), str(root / "test")]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("SGLANG_ALLOW_REUSE_DISTRIBUTED", None)
    try:
        proc = subprocess.run(
            [str(test_python), rel, *(["-v"] if verbose else [])],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=TEST_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {TEST_TIMEOUT} s"
    output = proc.stdout + proc.stderr
    return proc.returncode == 0, output if verbose else _tail(output, 25)


def _summary(output: str) -> str:
    ran = [ln for ln in output.splitlines() if re.match(r"^(Ran \d+ tests?|OK|FAILED)", ln)]
    return ", ".join(ran[-2:])


def related_unit_tests(root: Path, files: list[str], own: set[str]) -> list[str]:
    """Upstream's CPU unit tests that sweep the tree or name a module of ``files``."""
    modules = []
    for rel in files:
        if rel.startswith("python/") and rel.endswith(".py"):
            dotted = rel[len("python/") : -3].replace("/", ".")
            package, _, stem = dotted.rpartition(".")
            modules.append(
                re.compile(
                    rf"\b{re.escape(dotted)}\b|from\s+{re.escape(package)}\s+import\s+"
                    rf"(\([^)]*\b{stem}\b|[^\n]*\b{stem}\b)"
                )
            )
    chosen = []
    for path in sorted((root / "test" / "registered" / "unit").rglob("test_*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(errors="replace")
        if rel in own or "register_cpu_ci(" not in text or re.search(r"register_cpu_ci\([^)]*disabled=", text):
            continue
        if "rglob(" in text or any(m.search(text) for m in modules):
            chosen.append(rel)
    return chosen


class BaseTree:
    """A worktree of the base revision, made on first use; ``close`` removes it."""

    def __init__(self, work: Path, base_rev: str):
        self.work, self.base_rev, self._path = work, base_rev, None

    def path(self) -> Path:
        if self._path is None:
            self._path = self.work.parent / f"{self.work.name}-base"
            git("worktree", "add", "-q", "--detach", str(self._path), self.base_rev, cwd=self.work)
        return self._path

    def close(self) -> None:
        if self._path is not None:
            git("worktree", "remove", "--force", str(self._path), cwd=self.work, check=False)
            self._path = None


def run_checks(work: Path, base_rev: str, lint_python: Path, test_python: Path) -> list[CheckResult]:
    """Every check on the branch checked out in ``work`` (clean); ``work`` is left as it was."""
    files = changed_files(work, base_rev)
    base = BaseTree(work, base_rev)
    try:
        results = run_hooks(work, files, lint_python, base)
        results.append(run_collection(work, test_python))
        own = [f for f in files if f.startswith("test/registered/") and Path(f).name.startswith("test_")]
        for rel in own:
            ok, out = run_test_file(work, rel, test_python, verbose=True)
            result = CheckResult(f"exported test {rel}", ok, _tail(out, 25), _summary(out))
            # The same file on the base: which tests fail there, i.e. guard something the branch changes.
            target = base.path() / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text((work / rel).read_text())
            _, base_out = run_test_file(base.path(), rel, test_python, verbose=True)
            target.unlink()
            at_base = test_outcomes(base_out)
            result.outcomes = {t: (o, at_base.get(t, "not run")) for t, o in test_outcomes(out).items()}
            guarded = sum(1 for tip, b in result.outcomes.values() if tip == "ok" and b != "ok")
            result.note += f"; {guarded} of {len(result.outcomes)} fail at the base"
            results.append(result)
        for rel in related_unit_tests(work, files, set(own)):
            ok, out = run_test_file(work, rel, test_python)
            note = _summary(out)
            if not ok and not run_test_file(base.path(), rel, test_python)[0]:
                ok, note = True, f"fails at the base too, not caused by the branch: {note}"
            results.append(CheckResult(f"upstream unit test {rel}", ok, out, note))
    finally:
        base.close()
    return results
