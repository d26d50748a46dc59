"""`overlay.py export-pr`: per-change upstream branches and `--check` (upstream's own checks).

The check test builds a tiny git repository standing in for upstream (a pinned
.pre-commit-config.yaml with black / isort / ruff and a local registered-tests hook, the
real ci_register.py of the cached default release, a run_suite.py that collects like
upstream's) and runs the real checks on a good and a bad branch (no mocks).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from overlay_tool import export_body, export_changes, export_check, export_opt_fixes, export_pr, export_reuse  # noqa: E402
from overlay_tool.cache import GIT_IDENTITY, Cache  # noqa: E402
from overlay_tool.errors import OverlayError  # noqa: E402
from overlay_tool.gitutil import git  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRECOMMIT = """repos:
  - repo: https://github.com/PyCQA/isort
    rev: 7.0.0
    hooks:
      - id: isort
  - repo: https://github.com/astral-sh/ruff-pre-commit
    rev: v0.15.1
    hooks:
      - id: ruff
        args:
          - --select=F401,F821,UP037
          - --fix
        files: ^(python/sglang/|test/)
  - repo: https://github.com/psf/black
    rev: 26.1.0
    hooks:
      - id: black-jupyter
  - repo: https://github.com/pre-commit/pre-commit-hooks
    rev: v6.0.0
    hooks:
      - id: check-ast
      - id: check-toml
  - repo: local
    hooks:
      - id: check-registered-tests
        name: validate registered test CI registries
        entry: python3 scripts/lint/check_registered_tests.py
        language: system
        files: ^test/registered/.*\\.py$
        pass_filenames: false
"""
CHECK_REGISTERED = """import glob, sys
bad = [f for f in glob.glob("test/registered/**/*.py", recursive=True) if "register_cpu_ci(" not in open(f).read()]
print("\\n".join(f"No CI registry found in {f}" for f in bad))
sys.exit(1 if bad else 0)
"""
RUN_SUITE = """def validate_all_suites(tests):
    for t in tests:
        assert t.suite == "base-a-test-cpu", t
"""
GOOD_SOURCE = """def double(x: int) -> int:
    return 2 * x
"""
GOOD_TEST = '''"""Unit tests for sglang.srt.fixture."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=1, suite="base-a-test-cpu")

import unittest

from sglang.srt.fixture import double


class TestDouble(unittest.TestCase):
    def test_double(self):
        self.assertEqual(double(2), 4)


if __name__ == "__main__":
    unittest.main()
'''
LEGACY = "SIZES = [1,2]\n"
BAD_SOURCE = "import os\ndef double(x:int)->'int':\n    return 2*x\n"


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


@pytest.fixture(scope="module")
def fixture_upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Cache()
    tree = cache.release_tree("0.5.23")
    root = tmp_path_factory.mktemp("upstream") / "sglang"
    root.mkdir()
    write(root, ".pre-commit-config.yaml", PRECOMMIT)
    write(root, ".isort.cfg", "[settings]\nprofile=black\nknown_first_party=sglang\n")
    write(root, "scripts/lint/check_registered_tests.py", CHECK_REGISTERED)
    write(root, "test/run_suite.py", RUN_SUITE)
    write(root, "python/sglang/__init__.py", "")
    write(root, "python/sglang/srt/__init__.py", "")
    write(root, "python/sglang/srt/legacy.py", LEGACY)  # black at the pin would reformat its own code
    for rel in ("test/__init__.py", "test/ci/__init__.py", "test/ci/ci_register.py"):
        target = tree / "python" / "sglang" / rel
        write(root, f"python/sglang/{rel}", target.read_text() if target.is_file() else "")
    git("init", "-q", "-b", "main", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "fixture upstream", cwd=root, env=GIT_IDENTITY)
    git("tag", "v0.0.1", cwd=root)
    return root


def branch(root: Path, name: str, files: dict[str, str]) -> Path:
    work = root.parent / name
    git("worktree", "add", "-q", "-b", name, str(work), "v0.0.1", cwd=root)
    for rel, text in files.items():
        write(work, rel, text)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", name, cwd=work, env=GIT_IDENTITY)
    return work


def test_check_passes_a_good_branch_and_fails_a_bad_one(fixture_upstream: Path) -> None:
    envs = Cache().root / "venvs"
    lint = export_check.make_lint_env(fixture_upstream, envs)
    base = git("rev-parse", "v0.0.1", cwd=fixture_upstream).strip()
    good = branch(
        fixture_upstream,
        "good",
        {"python/sglang/srt/fixture.py": GOOD_SOURCE, "test/registered/unit/test_fixture.py": GOOD_TEST},
    )
    results = export_check.run_checks(good, base, lint, Path(sys.executable))
    assert all(r.ok for r in results), "\n".join(r.line() + "\n" + r.output for r in results)
    names = {r.name.split(" (")[0] for r in results}
    assert {
        "pre-commit isort",
        "pre-commit ruff",
        "pre-commit black-jupyter",
        "pre-commit check-registered-tests",
        "pre-commit check-ast",
        "test/run_suite.py collection",
        "exported test test/registered/unit/test_fixture.py",
    } <= names
    assert "pre-commit check-toml" not in names  # its manifest limits it to .toml files: none here

    bad = branch(
        fixture_upstream,
        "bad",
        {
            "python/sglang/srt/fixture.py": BAD_SOURCE,
            "test/registered/unit/test_fixture.py": GOOD_TEST.replace(
                "assertEqual(double(2), 4)", "assertEqual(double(2), 5)"
            ),
            "test/registered/unit/test_unregistered.py": "import unittest\n",
        },
    )
    failed = {r.name.split(" (")[0] for r in export_check.run_checks(bad, base, lint, Path(sys.executable)) if not r.ok}
    assert failed == {
        "pre-commit isort",
        "pre-commit ruff",
        "pre-commit black-jupyter",
        "pre-commit check-registered-tests",
        "test/run_suite.py collection",
        "exported test test/registered/unit/test_fixture.py",
    }
    assert not git("status", "--porcelain", cwd=bad).strip()  # fixers' changes are undone


def test_findings_in_the_bases_own_code_are_not_held_against_the_branch(fixture_upstream: Path) -> None:
    lint = export_check.make_lint_env(fixture_upstream, Cache().root / "venvs")
    base = export_check.BaseTree(
        branch(
            fixture_upstream,
            "touch",
            {"python/sglang/srt/legacy.py": LEGACY + "\n\ndef total() -> int:\n    return sum(SIZES)\n"},
        ),
        "v0.0.1",
    )
    try:
        black = next(
            r
            for r in export_check.run_hooks(base.work, ["python/sglang/srt/legacy.py"], lint, base)
            if "black" in r.name
        )
        assert black.ok and "also at the base" in black.note, black.output
    finally:
        base.close()
    base = export_check.BaseTree(
        branch(
            fixture_upstream,
            "touch-bad",
            {"python/sglang/srt/legacy.py": LEGACY + "\n\ndef total()->int:\n    return sum(SIZES)\n"},
        ),
        "v0.0.1",
    )
    try:
        black = next(
            r
            for r in export_check.run_hooks(base.work, ["python/sglang/srt/legacy.py"], lint, base)
            if "black" in r.name
        )
        assert not black.ok and "def total() -> int:" in black.output
    finally:
        base.close()


def test_exported_tests_are_rewritten_for_the_variants_api() -> None:
    text = (REPO / export_changes.TESTS_DIR / "test/registered/unit/distributed/test_reuse.py").read_text()
    assert export_changes.exported_test_text(text, "bootstrap") == text
    new = export_changes.exported_test_text(text, "runtime-context", "test_reuse.py")
    assert "publish_build_topology(world_rank=rank, tp_size=tp_size, pp_size=pp_size)" in new
    assert "tensor_model_parallel_size=tp_size" not in new
    assert 'publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))' in new
    # Edits for one file leave the others alone (test_opt.py builds no ModelRunner).
    opt = (REPO / export_changes.TESTS_DIR / "test/registered/unit/models/test_opt.py").read_text()
    assert "SpawnRanks" not in export_changes.exported_test_text(opt, "runtime-context", "test_opt.py")
    with pytest.raises(OverlayError, match="_initialize_model_parallel"):
        export_changes.exported_test_text(
            text.replace("parallel_state.initialize_model_parallel(", "build("), "self-pp"
        )


@pytest.mark.parametrize("version", ["0.5.18", "0.5.23"])
def test_opt_fixes_apply_to_upstreams_file(version: str) -> None:
    opt = Cache().root / "releases" / version / export_opt_fixes.OPT_PATH
    if not opt.is_file():
        pytest.skip(f"sglang {version} is not in the release cache")
    text = opt.read_text()
    fixed = export_opt_fixes.fixed_opt(text, f"v{version}")
    assert "return nn.Identity()" not in fixed and "self.model.embed_tokens" not in fixed
    assert 'hasattr(self.model, "start_layer")' not in fixed
    assert "loaded_params" not in fixed  # strict loading is its own branch
    strict = export_opt_fixes.fixed_opt(fixed, f"v{version}", export_opt_fixes.STRICT)
    assert "_skip_weight_check" in strict and "def post_load_weights" in strict
    if version == "0.5.23":  # upstream's own newer code is kept
        assert 'resolve_linear_parallel_group("tp")' in strict

    def changed(a: str, b: str) -> int:
        diff = difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="")
        return sum(1 for ln in diff if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))

    assert 20 < changed(text, fixed) < 60
    assert 20 < changed(fixed, strict) < 60


def test_opt_fix_whose_code_is_gone_names_it() -> None:
    with pytest.raises(OverlayError, match="upstream changed it there"):
        export_opt_fixes.fixed_opt("# an opt.py without the defects\n", "v9.9.9")


def test_placeholder_author_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OverlayError, match="placeholder"):
        export_pr._author(tmp_path, "sglang-overlay <overlay@sglang-overlay.invalid>")
    assert export_pr._author(tmp_path, "Ada L <ada@example.com>") == ("Ada L", "ada@example.com")


def test_exported_files_never_name_this_repository() -> None:
    assert export_changes.fork_layer_leaks([("python/sglang/srt/x.py", "from sglang.overlay import a\n")])
    assert export_changes.fork_layer_leaks([("python/sglang/overlay/x.py", "")])
    assert not export_changes.fork_layer_leaks([("python/sglang/srt/x.py", "import sglang.overlayish\n")])
    for change in export_changes.CHANGES:
        for rel in change.tests:
            assert (REPO / export_changes.TESTS_DIR / rel).is_file()
    reuse = (REPO / "python/sglang/srt/distributed/reuse.py").read_text()
    assert not export_changes.fork_layer_leaks([("python/sglang/srt/distributed/reuse.py", reuse)])


def test_rebase_says_when_the_main_is_older_than_the_base(tmp_path: Path) -> None:
    repo = tmp_path / "up"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)

    def commit(rel: str, text: str) -> str:
        write(repo, rel, text)
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", rel, cwd=repo, env=GIT_IDENTITY)
        return git("rev-parse", "HEAD", cwd=repo).strip()

    old = commit("a.py", "a = 1\n")
    base = commit("b.py", "b = 1\n")
    newer = commit("c.py", "c = 1\n")
    git("checkout", "-q", "--detach", base, cwd=repo)
    change = commit("d.py", "d = 1\n")
    forward = export_pr._try_rebase(repo, change, base, newer, tmp_path / "scratch1")
    assert forward.startswith("rebases cleanly") and "NOTE" not in forward
    back = export_pr._try_rebase(repo, change, base, old, tmp_path / "scratch2")
    assert back.startswith("rebases cleanly") and "ancestor of the base" in back


REUSE_SOURCE = """import os

# overlay-only: begin
def enabled():
    return os.environ.get("X") == "1"


# overlay-only: upstream
# from sglang.srt.environ import envs
#
#
# def enabled():
#     return envs.X.get()
#
# overlay-only: end

VALUE = 1
"""


def test_exported_reuse_keeps_only_the_upstream_lines() -> None:
    out = export_reuse.exported_reuse(REUSE_SOURCE)
    assert out == (
        "import os\n\nfrom sglang.srt.environ import envs\n\n\ndef enabled():\n    return envs.X.get()\n\n\nVALUE = 1\n"
    )
    for broken in (
        REUSE_SOURCE.replace("# overlay-only: end\n", ""),
        REUSE_SOURCE.replace("# overlay-only: upstream\n", ""),
        REUSE_SOURCE.replace("# def enabled():", "def enabled():"),
    ):
        with pytest.raises(OverlayError, match="overlay-only"):
            export_reuse.exported_reuse(broken)
    # This repository's file: no fallback, no allow_reuse(), the declared variable.
    real = export_reuse.exported_reuse((REPO / export_reuse.REUSE_PATH).read_text())
    assert "envs.SGLANG_ALLOW_REUSE_DISTRIBUTED.get()" in real
    for gone in ("allow_reuse", "ImportError", "_ALLOWED_BLOCKS", "os.environ", "overlay"):
        assert gone not in real, gone
    compile(real, "reuse.py", "exec")


def test_env_docs_row_lands_in_the_distributed_table() -> None:
    page = (
        "## General Configuration\n\n| Environment Variable | Description | Default Value |\n|---|---|---|\n"
        "| `A` | a | `1` |\n\n## Distributed Computing\n\n| Environment Variable | Description | Default Value |\n"
        "|---|---|---|\n| `B` | b | `2` |\n\n## Other\n"
    )
    out = export_reuse.docs_with_env_row(page, "docs/references/environment_variables.md")
    assert out is not None
    rows = out.split("## Distributed Computing")[1].split("## Other")[0]
    assert "| `SGLANG_ALLOW_REUSE_DISTRIBUTED` |" in rows and rows.index("`B`") < rows.index("SGLANG_ALLOW")
    assert export_reuse.docs_with_env_row(out, "x.md") is None  # already there
    assert export_reuse.docs_with_env_row("## General Configuration\n", "x.md") is None


def test_unittest_outcomes_are_parsed_per_test() -> None:
    output = (
        "test_a (__main__.TestX.test_a) ... ok\n"
        "test_b (__main__.TestX.test_b)\nGuards: b. ... FAIL\n"
        "test_c (test_opt.TestY.test_c) ... ERROR\n"
        "test_d (__main__.TestX.test_d) ... skipped 'no GPU'\n"
        "test_e (__main__.TestX.test_e)\nGuards: e. ... [CI Test Method] TestX.test_e\nsome output\nok\n"
    )
    assert export_check.test_outcomes(output) == {
        "test_a (TestX)": "ok",
        "test_b (TestX)": "FAIL",
        "test_c (TestY)": "ERROR",
        "test_d (TestX)": "skipped 'no GPU'",
        "test_e (TestX)": "ok",  # CustomTestCase prints its marker before the outcome
    }


TEMPLATE = """<!-- Thank you -->

## Motivation

<!-- Describe the purpose. -->

## Modifications

<!-- Detail the changes. -->

## Accuracy Tests

<!-- accuracy -->

## Speed Tests and Profiling

<!-- speed -->

## Checklist

- [ ] Format your code according to the [Format code with pre-commit](https://x).
- [ ] Add unit tests according to the [Run and add unit tests](https://x).
- [ ] Update documentation according to [Write documentations](https://x).
- [ ] Provide accuracy and speed benchmark results according to [Test the accuracy](https://x).
- [ ] Follow the SGLang code style [guidance](https://x).

## Review and Merge Process

1. Ping Merge Oncalls.
"""


def test_pr_body_is_the_template_filled_with_what_ran(tmp_path: Path) -> None:
    change = next(c for c in export_changes.CHANGES if c.key == "distributed-reuse")
    rel = change.tests[0]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text((REPO / export_changes.TESTS_DIR / rel).read_text())
    item = export_body.Built(change, "0" * 40)
    item.checks = [
        export_check.CheckResult("pre-commit black (black==26.1.0)", True, "", "1 file(s)"),
        export_check.CheckResult(
            f"exported test {rel}",
            True,
            "",
            "Ran 2 tests, OK; 1 of 2 fail at the base",
            {
                "test_matching_world_and_groups_are_reused (TestReuseDistributed)": ("ok", "ERROR"),
                "test_second_initialize_fails_without_opt_in (TestReuseDistributed)": ("ok", "ok"),
            },
        ),
    ]
    body = export_body.pr_message(change, "v0.5.18", item, TEMPLATE, "Linux x86_64", "pr", tmp_path)
    for line in TEMPLATE.splitlines():  # the template is kept whole, its boxes aside
        assert line.replace("- [ ]", "- [x]") in body or line in body, line
    assert "- [x] Format your code" in body and "- [x] Add unit tests" in body
    assert "- [x] Update documentation" in body  # the variable's docs row
    assert "- [ ] Provide accuracy and speed benchmark results" in body
    assert "- [ ] Follow the SGLang code style" in body
    assert "fails on `v0.5.18` (ERROR)" in body and "passes on `v0.5.18` too" in body
    assert "Guards: the opt-in" in body
    assert body.index("## Review and Merge Process") > body.index("## Checklist")
    unmeasured = export_body.pr_message(
        change, "v0.5.18", export_body.Built(change, "0" * 40), TEMPLATE, "", "pr", tmp_path
    )
    assert "- [x]" not in unmeasured.replace("- [x] Update documentation", "")
    assert "not run by this export" in unmeasured
