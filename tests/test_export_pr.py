"""`overlay.py export-pr`: the upstream layer as an upstream PR branch, against a synthetic upstream.

The upstream is a clone of the cached 0.5.23 release tree (tag v0.5.23, no network).
The overlay is a fixture repository: two hook patches for the 0.5.23 variant (made
with checkout + refresh, like test_overlay_tool.py), upstream-layer files committed by
three authors, fork-layer files (python/sglang/overlay/) and tests that must not ship,
and a tiny tests/test_reuse_distributed.py that checks the tip's tree (--run-tests).
One test exports this repository itself (its committed history) onto the real release.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from overlay_tool import export_changes, export_pr  # noqa: E402
from overlay_tool.cache import COMMITTER_IDENTITY, GIT_IDENTITY, Cache  # noqa: E402
from overlay_tool.errors import OverlayError, UnsupportedRelease  # noqa: E402
from overlay_tool.gitutil import git, run  # noqa: E402
from overlay_tool.patches import checkout, export_patches  # noqa: E402
from overlay_tool.releases import Overlay  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VERSION = "0.5.23"
TAG = f"v{VERSION}"
REUSE = "python/sglang/srt/distributed/reuse.py"
OPT = "python/sglang/srt/models/opt.py"
HOOK_DIST = "python/sglang/srt/distributed/parallel_state.py"
HOOK_EPLB = "python/sglang/srt/eplb/expert_location.py"
FORK_INIT = "python/sglang/overlay/__init__.py"
FORK_RUNNER = "python/sglang/overlay/runner.py"
# The logical changes the fixture overlay has content for (one PR commit each).
FIXTURE_CHANGES = ("distributed-reuse", "expert-location", "opt-model")
ALICE = ("Alice Maintainer", "alice@example.invalid")
BOB = ("Bob Contributor", "bob@example.invalid")
CAROL = ("Carol Tester", "carol@example.invalid")
DAVE = ("Dave Eplb", "dave@example.invalid")


TIP_TEST = '''"""The fixture's test of the reuse change: run at the tip of the PR branch, with the fork layer
added (no sglang import: no torch here)."""
import sys
from pathlib import Path


def locate(rel):
    for entry in sys.path:
        path = Path(entry) / rel
        if path.is_file():
            return path
    raise AssertionError(f"{rel} not on sys.path")


def test_reuse_module_is_the_overlay_one():
    text = locate("sglang/srt/distributed/reuse.py").read_text()
    assert "overlay-reuse" in text and "VERSION = 2" in text


def test_hook_is_in_parallel_state():
    assert "fixture reuse hook" in locate("sglang/srt/distributed/parallel_state.py").read_text()


def test_the_fork_layer_is_added_beside_the_tip():
    runner = locate("sglang/overlay/runner.py")
    assert runner.parent.parent == locate("sglang/srt/distributed/reuse.py").parents[2]
'''


def commit(repo: Path, who: tuple[str, str], date: str, message: str) -> str:
    git("add", "-A", cwd=repo)
    git("commit", "-q", "--no-verify", "-m", message, cwd=repo, env={
        "GIT_AUTHOR_NAME": who[0], "GIT_AUTHOR_EMAIL": who[1], "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": who[0], "GIT_COMMITTER_EMAIL": who[1], "GIT_COMMITTER_DATE": date,
    })
    return git("rev-parse", "HEAD", cwd=repo).strip()


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


# The files of the real release that the synthetic upstream keeps (the whole tree is
# ~6k files; one test uses all of it, the others this subset to stay fast).
SUBSET = ("python/sglang/version.py", "python/sglang/_version.py", "python/sglang/__init__.py",
          "python/sglang/srt/distributed/", "python/sglang/srt/eplb/", OPT)


@pytest.fixture(scope="session")
def real_tree() -> Path:
    return Cache().release_tree(VERSION)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory, real_tree: Path) -> Cache:
    """A release cache whose 0.5.23 is a subset of the real one (same bytes, same tag, same layout)."""
    cache = Cache(tmp_path_factory.mktemp("cache"))
    tree = cache.root / "releases" / VERSION
    tree.mkdir(parents=True)
    for rel in git("ls-files", "--", *SUBSET, cwd=real_tree).splitlines():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real_tree / rel, tree / rel)
    git("init", "-q", "-b", "main", cwd=tree)
    git("add", "-A", cwd=tree)
    git("commit", "-q", "-m", f"sglang {VERSION} (subset)", cwd=tree, env=GIT_IDENTITY)
    git("tag", TAG, cwd=tree)
    return cache


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory, cache: Cache) -> dict:
    """The fixture overlay repository; returns its root and the hashes of its commits."""
    root = tmp_path_factory.mktemp("overlay-src")
    git("init", "-q", "-b", "main", cwd=root)
    write(root, "patches/releases.toml", (REPO / "patches" / "releases.toml").read_text())
    write(root, "tests/test_overlay_tool.py", "def test_tool():\n    pass\n")
    write(root, FORK_INIT, 'OVERLAY_VERSION = "1"\n')
    shas = {"setup": commit(root, ALICE, "2024-01-01T10:00:00Z", "overlay: scaffolding")}
    write(root, REUSE, '"""Fixture: opt-in reuse of distributed state."""\nMARKER = "overlay-reuse"\nVERSION = 1\n')
    write(root, "tests/support/__init__.py", "")
    write(root, "tests/support/helpers.py", 'MARKER = "overlay-reuse"\n')
    write(root, FORK_RUNNER, '"""Fixture: the in-process runner of the fork."""\nfrom sglang.srt.distributed import reuse\n')
    shas["alice"] = commit(root, ALICE, "2024-01-02T10:00:00Z", "distributed: reuse module")
    write(root, REUSE, '"""Fixture: opt-in reuse of distributed state."""\nMARKER = "overlay-reuse"\nVERSION = 2\n')
    write(root, OPT, '"""Fixture: the native OPT model."""\n\nclass OPTForCausalLM:\n    pass\n\n\n'
          'EntryClass = OPTForCausalLM\n')
    shas["bob"] = commit(root, BOB, "2024-02-03T10:00:00Z", "reuse: check TP/PP widths; native OPT model")
    write(root, "tests/test_reuse_distributed.py", TIP_TEST)
    write(root, FORK_RUNNER, '"""Fixture: the in-process runner of the fork."""\nimport sglang.overlay\n')
    shas["carol"] = commit(root, CAROL, "2024-03-04T10:00:00Z", "tests: reuse fixture test; runner")
    write(root, "tests/test_overlay_tool.py", "def test_tool():\n    assert True\n")
    shas["tool"] = commit(root, ALICE, "2024-03-05T10:00:00Z", "tool tests only")

    release = Overlay.load(root).release(VERSION)
    work = checkout(VERSION, tmp_path_factory.mktemp("co") / "c", Overlay.load(root), cache)
    for rel, line, who, subject in (
            (HOOK_DIST, "from sglang.srt.distributed import reuse as _reuse  # fixture reuse hook\n", ALICE,
             "distributed: hook the reuse module into parallel_state"),
            (HOOK_EPLB, "FIXTURE_RESET_HOOK = True\n", DAVE, "eplb: reset expert location metadata")):
        with open(work / rel, "a") as f:
            f.write(line)
        commit(work, who, "2024-01-05T10:00:00Z", f"{subject}\n\nWhy: fixture.\n\nUpstream-Status: Pending")
    written = export_patches(work, Overlay.load(root))
    assert len(written) == 2 and all(p.parent.name == release.variant for p in written)
    shas["patches"] = commit(root, ALICE, "2024-03-06T10:00:00Z", "patches: fixture hooks")
    return {"root": root, "shas": shas}


def clone_upstream(tree: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "sglang"
    git("clone", "-q", str(tree), str(repo), cwd=tmp_path)
    git("config", "user.name", "PR Submitter", cwd=repo)
    git("config", "user.email", "submitter@example.invalid", cwd=repo)
    return repo


@pytest.fixture
def upstream(tmp_path: Path, cache: Cache) -> Path:
    return clone_upstream(cache.release_tree(VERSION), tmp_path)


@pytest.fixture
def full_upstream(tmp_path: Path, real_tree: Path) -> Path:
    """A clone of the whole cached release: what a real SGLang checkout at the tag holds."""
    return clone_upstream(real_tree, tmp_path)


def export(upstream: Path, source: dict, branch: str = "overlay-pr", base: str = TAG, **kw) -> str:
    root = kw.pop("source_root", source["root"])
    return export_pr.export_pr(upstream, base, branch, force=kw.pop("force", False), overlay=Overlay.load(root),
                                cache=Cache(root.parent / "unused-cache"), source_repo=root, **kw)


def branch_commits(repo: Path, branch: str = "overlay-pr") -> list[str]:
    return git("rev-list", "--reverse", f"{TAG}..{branch}", cwd=repo).split()


def show(repo: Path, fmt: str, sha: str) -> str:
    return git("log", "-1", f"--format={fmt}", sha, cwd=repo).strip()


def test_one_commit_per_change_with_authorship_kept(full_upstream: Path, source: dict) -> None:
    upstream = full_upstream
    head_before = git("rev-parse", "HEAD", cwd=upstream)
    out = export(upstream, source)
    commits = branch_commits(upstream)
    assert git("merge-base", TAG, "overlay-pr", cwd=upstream) == git("rev-parse", TAG, cwd=upstream)
    titles = [show(upstream, "%s", c) for c in commits]
    assert titles == [c.title for c in export_changes.CHANGES if c.key in FIXTURE_CHANGES]
    authors = [show(upstream, "%an <%ae>", c) for c in commits]
    assert authors == [f"{ALICE[0]} <{ALICE[1]}>", f"{DAVE[0]} <{DAVE[1]}>", f"{BOB[0]} <{BOB[1]}>"]
    assert show(upstream, "%aI", commits[0]).startswith("2024-01-02T10:00:00")  # the earliest overlay commit
    assert all(show(upstream, "%cn", c) == "PR Submitter" for c in commits)

    dist, eplb, opt = (show(upstream, "%B", c) for c in commits)
    shas = source["shas"]
    assert f"Co-authored-by: {BOB[0]} <{BOB[1]}>" in dist
    for key in ("alice", "bob"):
        assert shas[key][:12] in dist
    assert "hook the reuse module into parallel_state" in dist and "Upstream-Status" not in dist
    assert "reset expert location metadata" in eplb and "Co-authored-by" not in eplb
    assert shas["bob"][:12] in opt and "Co-authored-by" not in opt
    # Only the upstream layer ships: no fork-layer file, no test, and no trace of their commits.
    for message in (dist, eplb, opt):
        assert shas["carol"][:12] not in message and shas["tool"][:12] not in message
        assert CAROL[0] not in message
    branch_files = git("diff", "--name-only", TAG, "overlay-pr", cwd=upstream).split()
    assert sorted(branch_files) == sorted({REUSE, HOOK_DIST, HOOK_EPLB, OPT})
    assert not any("sglang/overlay" in f or f.startswith(("test/", "tests/")) for f in branch_files)

    files = [set(git("diff", "--name-only", f"{c}^", c, cwd=upstream).split()) for c in commits]
    assert files[0] == {REUSE, HOOK_DIST} and files[1] == {HOOK_EPLB} and files[2] == {OPT}
    assert "Tests: not exported: the overlay's tests build their runners through sglang.overlay" in out

    # UPSTREAM's checkout is untouched, no worktree is left, nothing is pushed.
    assert git("rev-parse", "HEAD", cwd=upstream) == head_before
    assert git("status", "--porcelain", cwd=upstream) == ""
    assert len(git("worktree", "list", cwd=upstream).splitlines()) == 1
    assert f"git -C {upstream} push <your-fork-remote> overlay-pr" in out
    assert "gh pr create --repo sgl-project/sglang --base main --head <your-github-user>:overlay-pr" in out
    body = Path(out.split("--body-file ")[1].split()[0])
    assert body.is_file() and "## Commits" in body.read_text()


def test_each_commit_applies_on_its_own_and_compiles(upstream: Path, source: dict, tmp_path: Path) -> None:
    out = export(upstream, source)
    commits = branch_commits(upstream)
    # Replay the branch commit by commit onto the bare tag, as a reviewer would: format-patch | am.
    replay = tmp_path / "replay"
    git("clone", "-q", str(upstream), str(replay), cwd=tmp_path)
    git("checkout", "-q", "-b", "replay", TAG, cwd=replay)
    for sha in commits:
        patch = git("format-patch", "-1", "--stdout", sha, cwd=replay)
        (tmp_path / "c.patch").write_text(patch)
        run(["git", "am", "-q", str(tmp_path / "c.patch")], cwd=replay, env=COMMITTER_IDENTITY)
        assert git("rev-parse", "HEAD^{tree}", cwd=replay) == git("rev-parse", f"{sha}^{{tree}}",
                                                                             cwd=replay)
        changed = [f for f in git("diff", "--name-only", "HEAD^", "HEAD", cwd=replay).split()
                   if f.endswith(".py")]
        proc = subprocess.run([sys.executable, "-m", "compileall", "-q", *changed], cwd=replay,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # Textually every commit also applies to the bare tag (new files, disjoint hooks).
    assert out.count(f"applies to {TAG} alone: yes") == len(FIXTURE_CHANGES)


def test_the_overlay_tests_run_at_the_tip_with_the_fork_layer(upstream: Path, source: dict) -> None:
    out = export(upstream, source, test_python=Path(sys.executable))
    assert "tests/test_reuse_distributed.py passed at the tip with the fork layer added" in out
    assert "3 passed" in out
    # The fork layer was added beside the tip for the run only: the branch does not hold it.
    assert not any("sglang/overlay" in f for f in git("ls-tree", "-r", "--name-only", "overlay-pr",
                                                      cwd=upstream).split())
    assert git("status", "--porcelain", cwd=upstream) == ""
    assert git("status", "--porcelain", cwd=source["root"]) == ""


def test_failing_tests_at_the_tip_write_no_branch(upstream: Path, source: dict, tmp_path: Path) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho '1 failed'\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(OverlayError, match="tests fail at the tip"):
        export(upstream, source, test_python=fake)
    assert not git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_refuses_a_dirty_upstream(upstream: Path, source: dict) -> None:
    (upstream / "notes.txt").write_text("wip\n")
    with pytest.raises(OverlayError, match="uncommitted changes or untracked files"):
        export(upstream, source)
    assert not git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_refuses_an_existing_branch_unless_forced(upstream: Path, source: dict) -> None:
    git("branch", "overlay-pr", TAG, cwd=upstream)
    with pytest.raises(OverlayError, match="already exists.*--force"):
        export(upstream, source)
    assert branch_commits(upstream) == []
    export(upstream, source, force=True)
    assert len(branch_commits(upstream)) == len(FIXTURE_CHANGES)


@pytest.mark.parametrize("base", ["v0.0.1", "0.5.23", "main"])
def test_refuses_an_unsupported_base_with_exit_2(upstream: Path, source: dict, base: str) -> None:
    with pytest.raises(UnsupportedRelease) as err:
        export(upstream, source, base=base)
    assert err.value.exit_code == 2
    for version in Overlay.load(REPO).versions():
        assert version in str(err.value)


def test_refuses_a_base_tag_missing_from_upstream(upstream: Path, source: dict) -> None:
    other = next(v for v in Overlay.load(REPO).versions() if v != VERSION)
    with pytest.raises(OverlayError, match=f"no tag v{other}"):
        export(upstream, source, base=f"v{other}")


def test_missing_filter_repo_says_how_to_install(upstream: Path, source: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    with pytest.raises(OverlayError, match="pip install git-filter-repo"):
        export(upstream, source)
    assert not git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_refuses_uncommitted_overlay_changes_and_unmapped_files(upstream: Path, source: dict,
                                                                tmp_path: Path) -> None:
    root = tmp_path / "src"
    git("clone", "-q", str(source["root"]), str(root), cwd=tmp_path)
    write(root, "python/sglang/srt/somewhere_else.py", "X = 1\n")
    with pytest.raises(OverlayError, match="uncommitted changes to the overlay"):
        export(upstream, source, source_root=root)
    commit(root, CAROL, "2024-04-01T10:00:00Z", "a file no change claims")
    with pytest.raises(OverlayError, match="python/sglang/srt/somewhere_else.py"):
        export(upstream, source, source_root=root)
    assert not git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_cli_verb_exits_2_on_an_unsupported_base(upstream: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "overlay.py"), "export-pr", str(upstream),
                           "--base", "v0.0.1", "--branch", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a supported release" in proc.stderr


@pytest.mark.parametrize("line", ["from sglang.overlay.runner import Runner\n",
                                  "from sglang import overlay\n", "CONFIG = 'sglang.overlay.config'\n"])
def test_an_exported_file_that_refers_to_the_fork_layer_writes_no_branch(upstream: Path, source: dict,
                                                                          tmp_path: Path, line: str) -> None:
    root = tmp_path / "src"
    git("clone", "-q", str(source["root"]), str(root), cwd=tmp_path)
    with open(root / OPT, "a") as f:
        f.write(line)
    commit(root, BOB, "2024-04-01T10:00:00Z", "opt: use the fork's runner")
    with pytest.raises(OverlayError, match=f"would ship fork-layer code(.|\n)*{OPT}: refers to the fork layer"):
        export(upstream, source, source_root=root)
    assert not git("branch", "--list", "overlay-pr", cwd=upstream).strip()


def test_a_fork_layer_file_is_refused_wherever_a_change_would_take_it() -> None:
    assert export_changes.fork_layer_leaks([("python/sglang/overlay/runner.py", "")]) == [
        "python/sglang/overlay/runner.py: a fork-layer file"]
    assert export_changes.fork_layer_leaks([("python/sglang/srt/models/sglang/overlay/x.py", "")])
    assert export_changes.fork_layer_leaks([(OPT, "import sglang.overlay_fixture\nX = 1\n")]) == []
    assert export_changes.exported_files([OPT, REUSE, "python/sglang/overlay/mezo.py", "tests/test_opt.py",
                                          "python/sglang/srt/layers/add_layernorm.py"]) == [
        "python/sglang/srt/distributed/reuse.py", "python/sglang/srt/layers/add_layernorm.py", OPT]


def test_this_repository_exports_only_its_upstream_layer(full_upstream: Path, tmp_path: Path) -> None:
    """The acceptance check of issue 17: this repository's committed history, exported onto the
    real cached release, gives a branch with no file under sglang/overlay/ and no test."""
    root = tmp_path / "this-repo"
    git("clone", "-q", str(REPO), str(root), cwd=tmp_path)
    out = export_pr.export_pr(full_upstream, TAG, "overlay-pr", force=False, overlay=Overlay.load(root),
                              cache=Cache(tmp_path / "unused-cache"), source_repo=root)
    branch_files = git("diff", "--name-only", TAG, "overlay-pr", cwd=full_upstream).split()
    assert OPT in branch_files and REUSE in branch_files
    assert not [f for f in branch_files if "sglang/overlay" in f or not f.startswith("python/sglang/srt/")]
    for rel in branch_files:
        assert "sglang.overlay" not in git("show", f"overlay-pr:{rel}", cwd=full_upstream), rel
    assert "Tests: not exported" in out
