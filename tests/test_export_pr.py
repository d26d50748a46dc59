"""`overlay.py export-pr`: the overlay as an upstream PR branch, against a synthetic upstream.

The upstream is a clone of the cached 0.5.23 release tree (tag v0.5.23, no network).
The overlay is a fixture repository: two hook patches for the 0.5.23 variant (made
with checkout + refresh, like test_overlay_tool.py) and overlay files committed by
three authors, plus a tiny test that checks the exported files at the tip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import export_pr as ex  # noqa: E402
import overlay as tool  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VERSION = "0.5.23"
TAG = f"v{VERSION}"
REUSE = "python/sglang/srt/distributed/reuse.py"
OPT = "python/sglang/srt/models/opt.py"
HOOK_DIST = "python/sglang/srt/distributed/parallel_state.py"
HOOK_EPLB = "python/sglang/srt/eplb/expert_location.py"
DEST = "test/srt/overlay/"
# The logical changes the fixture overlay has content for (one PR commit each).
FIXTURE_CHANGES = ("distributed-reuse", "expert-location", "opt-model", "tests")
ALICE = ("Alice Maintainer", "alice@example.invalid")
BOB = ("Bob Contributor", "bob@example.invalid")
CAROL = ("Carol Tester", "carol@example.invalid")
DAVE = ("Dave Eplb", "dave@example.invalid")


TIP_TEST = '''"""Checks the exported files at the tip of the PR branch (no sglang import: no torch here)."""
import sys
from pathlib import Path

from tests.support.helpers import MARKER


def locate(rel):
    for entry in sys.path:
        path = Path(entry) / rel
        if path.is_file():
            return path
    raise AssertionError(f"{rel} not on sys.path")


def test_reuse_module_is_the_overlay_one():
    text = locate("sglang/srt/distributed/reuse.py").read_text()
    assert MARKER in text and "VERSION = 2" in text


def test_hook_is_in_parallel_state():
    assert "fixture reuse hook" in locate("sglang/srt/distributed/parallel_state.py").read_text()
'''


def commit(repo: Path, who: tuple[str, str], date: str, message: str) -> str:
    tool.git("add", "-A", cwd=repo)
    tool.git("commit", "-q", "--no-verify", "-m", message, cwd=repo, env={
        "GIT_AUTHOR_NAME": who[0], "GIT_AUTHOR_EMAIL": who[1], "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": who[0], "GIT_COMMITTER_EMAIL": who[1], "GIT_COMMITTER_DATE": date,
    })
    return tool.git("rev-parse", "HEAD", cwd=repo).strip()


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


# The files of the real release that the synthetic upstream keeps (the whole tree is
# ~6k files; one test uses all of it, the others this subset to stay fast).
SUBSET = ("python/sglang/version.py", "python/sglang/_version.py", "python/sglang/__init__.py",
          "python/sglang/srt/distributed/", "python/sglang/srt/eplb/", OPT)


@pytest.fixture(scope="session")
def real_tree() -> Path:
    return tool.Cache().release_tree(VERSION)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory, real_tree: Path) -> tool.Cache:
    """A release cache whose 0.5.23 is a subset of the real one (same bytes, same tag, same layout)."""
    cache = tool.Cache(tmp_path_factory.mktemp("cache"))
    tree = cache.root / "releases" / VERSION
    tree.mkdir(parents=True)
    for rel in tool.git("ls-files", "--", *SUBSET, cwd=real_tree).splitlines():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real_tree / rel, tree / rel)
    tool.git("init", "-q", "-b", "main", cwd=tree)
    tool.git("add", "-A", cwd=tree)
    tool.git("commit", "-q", "-m", f"sglang {VERSION} (subset)", cwd=tree, env=tool.GIT_IDENTITY)
    tool.git("tag", TAG, cwd=tree)
    return cache


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory, cache: tool.Cache) -> dict:
    """The fixture overlay repository; returns its root and the hashes of its commits."""
    root = tmp_path_factory.mktemp("overlay-src")
    tool.git("init", "-q", "-b", "main", cwd=root)
    write(root, "patches/releases.toml", (REPO / "patches" / "releases.toml").read_text())
    write(root, "tests/test_overlay_tool.py", "def test_tool():\n    pass\n")
    write(root, "python/sglang/overlay.py", 'OVERLAY_VERSION = "1"\n')
    shas = {"setup": commit(root, ALICE, "2024-01-01T10:00:00Z", "overlay: scaffolding")}
    write(root, REUSE, '"""Fixture: opt-in reuse of distributed state."""\nMARKER = "overlay-reuse"\nVERSION = 1\n')
    write(root, "tests/support/__init__.py", "")
    write(root, "tests/support/helpers.py", 'MARKER = "overlay-reuse"\n')
    shas["alice"] = commit(root, ALICE, "2024-01-02T10:00:00Z", "distributed: reuse module")
    write(root, REUSE, '"""Fixture: opt-in reuse of distributed state."""\nMARKER = "overlay-reuse"\nVERSION = 2\n')
    write(root, OPT, '"""Fixture: the native OPT model."""\n\nclass OPTForCausalLM:\n    pass\n\n\n'
          'EntryClass = OPTForCausalLM\n')
    shas["bob"] = commit(root, BOB, "2024-02-03T10:00:00Z", "reuse: check TP/PP widths; native OPT model")
    write(root, "tests/test_reuse_fixture.py", TIP_TEST)
    shas["carol"] = commit(root, CAROL, "2024-03-04T10:00:00Z", "tests: reuse fixture test")
    write(root, "tests/test_overlay_tool.py", "def test_tool():\n    assert True\n")
    shas["tool"] = commit(root, ALICE, "2024-03-05T10:00:00Z", "tool tests only")

    release = tool.Overlay.load(root).release(VERSION)
    work = tool.checkout(VERSION, tmp_path_factory.mktemp("co") / "c", tool.Overlay.load(root), cache)
    for rel, line, who, subject in (
            (HOOK_DIST, "from sglang.srt.distributed import reuse as _reuse  # fixture reuse hook\n", ALICE,
             "distributed: hook the reuse module into parallel_state"),
            (HOOK_EPLB, "FIXTURE_RESET_HOOK = True\n", DAVE, "eplb: reset expert location metadata")):
        with open(work / rel, "a") as f:
            f.write(line)
        commit(work, who, "2024-01-05T10:00:00Z", f"{subject}\n\nWhy: fixture.\n\nUpstream-Status: Pending")
    written = tool.export_patches(work, tool.Overlay.load(root))
    assert len(written) == 2 and all(p.parent.name == release.variant for p in written)
    shas["patches"] = commit(root, ALICE, "2024-03-06T10:00:00Z", "patches: fixture hooks")
    return {"root": root, "shas": shas}


def clone_upstream(tree: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "sglang"
    tool.git("clone", "-q", str(tree), str(repo), cwd=tmp_path)
    tool.git("config", "user.name", "PR Submitter", cwd=repo)
    tool.git("config", "user.email", "submitter@example.invalid", cwd=repo)
    return repo


@pytest.fixture
def upstream(tmp_path: Path, cache: tool.Cache) -> Path:
    return clone_upstream(cache.release_tree(VERSION), tmp_path)


@pytest.fixture
def full_upstream(tmp_path: Path, real_tree: Path) -> Path:
    """A clone of the whole cached release: what a real SGLang checkout at the tag holds."""
    return clone_upstream(real_tree, tmp_path)


def export(upstream: Path, source: dict, branch: str = "overlay-pr", base: str = TAG, **kw) -> str:
    root = kw.pop("source_root", source["root"])
    return ex.export_pr(upstream, base, branch, force=kw.pop("force", False), overlay=tool.Overlay.load(root),
                        cache=tool.Cache(root.parent / "unused-cache"), source_repo=root, **kw)


def branch_commits(repo: Path, branch: str = "overlay-pr") -> list[str]:
    return tool.git("rev-list", "--reverse", f"{TAG}..{branch}", cwd=repo).split()


def show(repo: Path, fmt: str, sha: str) -> str:
    return tool.git("log", "-1", f"--format={fmt}", sha, cwd=repo).strip()


def test_one_commit_per_change_with_authorship_kept(full_upstream: Path, source: dict) -> None:
    upstream = full_upstream
    head_before = tool.git("rev-parse", "HEAD", cwd=upstream)
    out = export(upstream, source)
    commits = branch_commits(upstream)
    assert tool.git("merge-base", TAG, "overlay-pr", cwd=upstream) == tool.git("rev-parse", TAG, cwd=upstream)
    titles = [show(upstream, "%s", c) for c in commits]
    assert titles == [c.title for c in ex.CHANGES if c.key in FIXTURE_CHANGES]
    authors = [show(upstream, "%an <%ae>", c) for c in commits]
    assert authors == [f"{ALICE[0]} <{ALICE[1]}>", f"{DAVE[0]} <{DAVE[1]}>", f"{BOB[0]} <{BOB[1]}>",
                       f"{ALICE[0]} <{ALICE[1]}>"]
    assert show(upstream, "%aI", commits[0]).startswith("2024-01-02T10:00:00")  # the earliest overlay commit
    assert all(show(upstream, "%cn", c) == "PR Submitter" for c in commits)

    dist, eplb, opt, tests = (show(upstream, "%B", c) for c in commits)
    shas = source["shas"]
    assert f"Co-authored-by: {BOB[0]} <{BOB[1]}>" in dist
    for key in ("alice", "bob"):
        assert shas[key][:12] in dist
    assert "hook the reuse module into parallel_state" in dist and "Upstream-Status" not in dist
    assert "reset expert location metadata" in eplb and "Co-authored-by" not in eplb
    assert shas["bob"][:12] in opt and "Co-authored-by" not in opt
    assert f"Co-authored-by: {CAROL[0]} <{CAROL[1]}>" in tests and shas["carol"][:12] in tests
    assert shas["tool"][:12] not in tests
    assert "python/sglang/overlay.py" not in tool.git("ls-tree", "-r", "--name-only", "overlay-pr", cwd=upstream)

    files = [set(tool.git("diff", "--name-only", f"{c}^", c, cwd=upstream).split()) for c in commits]
    assert files[0] == {REUSE, HOOK_DIST} and files[1] == {HOOK_EPLB} and files[2] == {OPT}
    assert files[3] == {f"{DEST}test_reuse_fixture.py", f"{DEST}overlay_support/__init__.py",
                        f"{DEST}overlay_support/helpers.py"}
    tip_test = tool.git("show", f"overlay-pr:{DEST}test_reuse_fixture.py", cwd=upstream)
    assert "from overlay_support.helpers import MARKER" in tip_test

    # UPSTREAM's checkout is untouched, no worktree is left, nothing is pushed.
    assert tool.git("rev-parse", "HEAD", cwd=upstream) == head_before
    assert tool.git("status", "--porcelain", cwd=upstream) == ""
    assert len(tool.git("worktree", "list", cwd=upstream).splitlines()) == 1
    assert f"git -C {upstream} push <your-fork-remote> overlay-pr" in out
    assert "gh pr create --repo sgl-project/sglang --base main --head <your-github-user>:overlay-pr" in out
    body = Path(out.split("--body-file ")[1].split()[0])
    assert body.is_file() and "## Commits" in body.read_text()


def test_each_commit_applies_on_its_own_and_compiles(upstream: Path, source: dict, tmp_path: Path) -> None:
    out = export(upstream, source)
    commits = branch_commits(upstream)
    # Replay the branch commit by commit onto the bare tag, as a reviewer would: format-patch | am.
    replay = tmp_path / "replay"
    tool.git("clone", "-q", str(upstream), str(replay), cwd=tmp_path)
    tool.git("checkout", "-q", "-b", "replay", TAG, cwd=replay)
    for sha in commits:
        patch = tool.git("format-patch", "-1", "--stdout", sha, cwd=replay)
        (tmp_path / "c.patch").write_text(patch)
        tool.run(["git", "am", "-q", str(tmp_path / "c.patch")], cwd=replay, env=tool.COMMITTER_IDENTITY)
        assert tool.git("rev-parse", "HEAD^{tree}", cwd=replay) == tool.git("rev-parse", f"{sha}^{{tree}}",
                                                                             cwd=replay)
        changed = [f for f in tool.git("diff", "--name-only", "HEAD^", "HEAD", cwd=replay).split()
                   if f.endswith(".py")]
        proc = subprocess.run([sys.executable, "-m", "compileall", "-q", *changed], cwd=replay,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # Textually every commit also applies to the bare tag (new files, disjoint hooks).
    assert out.count(f"applies to {TAG} alone: yes") == 4


def test_exported_tests_pass_at_the_tip(upstream: Path, source: dict, tmp_path: Path) -> None:
    out = export(upstream, source, test_python=Path(sys.executable))
    assert "passed at the tip" in out and "2 passed" in out
    tip = tmp_path / "tip"
    tool.git("clone", "-q", "-b", "overlay-pr", str(upstream), str(tip), cwd=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", DEST], cwd=tip,
                          env={**os.environ, "PYTHONPATH": str(tip / "python")}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_failing_tests_at_the_tip_write_no_branch(upstream: Path, source: dict, tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho '1 failed'\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(tool.OverlayError, match="exported tests fail at the tip"):
        export(upstream, source, test_python=fake)
    assert not tool.git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_refuses_a_dirty_upstream(upstream: Path, source: dict) -> None:
    (upstream / "notes.txt").write_text("wip\n")
    with pytest.raises(tool.OverlayError, match="uncommitted changes or untracked files"):
        export(upstream, source)
    assert not tool.git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_refuses_an_existing_branch_unless_forced(upstream: Path, source: dict) -> None:
    tool.git("branch", "overlay-pr", TAG, cwd=upstream)
    with pytest.raises(tool.OverlayError, match="already exists.*--force"):
        export(upstream, source)
    assert branch_commits(upstream) == []
    export(upstream, source, force=True)
    assert len(branch_commits(upstream)) == len(FIXTURE_CHANGES)


@pytest.mark.parametrize("base", ["v0.0.1", "0.5.23", "main"])
def test_refuses_an_unsupported_base_with_exit_2(upstream: Path, source: dict, base: str) -> None:
    with pytest.raises(tool.UnsupportedRelease) as err:
        export(upstream, source, base=base)
    assert err.value.exit_code == 2
    for version in tool.Overlay.load(REPO).versions():
        assert version in str(err.value)


def test_refuses_a_base_tag_missing_from_upstream(upstream: Path, source: dict) -> None:
    other = next(v for v in tool.Overlay.load(REPO).versions() if v != VERSION)
    with pytest.raises(tool.OverlayError, match=f"no tag v{other}"):
        export(upstream, source, base=f"v{other}")


def test_missing_filter_repo_says_how_to_install(upstream: Path, source: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    with pytest.raises(tool.OverlayError, match="pip install git-filter-repo"):
        export(upstream, source)
    assert not tool.git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_refuses_uncommitted_overlay_changes_and_unmapped_files(upstream: Path, source: dict,
                                                                tmp_path: Path) -> None:
    root = tmp_path / "src"
    tool.git("clone", "-q", str(source["root"]), str(root), cwd=tmp_path)
    write(root, "python/sglang/srt/somewhere_else.py", "X = 1\n")
    with pytest.raises(tool.OverlayError, match="uncommitted changes to the overlay"):
        export(upstream, source, source_root=root)
    commit(root, CAROL, "2024-04-01T10:00:00Z", "a file no change claims")
    with pytest.raises(tool.OverlayError, match="python/sglang/srt/somewhere_else.py"):
        export(upstream, source, source_root=root)
    assert not tool.git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_cli_verb_exits_2_on_an_unsupported_base(upstream: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "overlay.py"), "export-pr", str(upstream),
                           "--base", "v0.0.1", "--branch", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a supported release" in proc.stderr
