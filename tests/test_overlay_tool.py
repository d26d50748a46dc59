"""The overlay tool against a real fetched upstream release, with fixture patches of its own.

The release under test is $SGLANG_OVERLAY_RELEASE (set by `overlay.py matrix`),
else the default release of patches/releases.toml; its tree comes from the
release cache (downloaded once from PyPI).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import overlay as tool  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOOKED = "python/sglang/srt/distributed/parallel_state.py"
SECOND = "python/sglang/srt/eplb/expert_location.py"
NEW_FILE = "python/sglang/srt/overlay_fixture.py"


@pytest.fixture(scope="session")
def cache() -> tool.Cache:
    return tool.Cache()


@pytest.fixture(scope="session")
def release() -> tool.Release:
    real = tool.Overlay.load(REPO)
    return real.release(os.environ.get("SGLANG_OVERLAY_RELEASE") or real.default)


@pytest.fixture(scope="session")
def upstream(cache: tool.Cache, release: tool.Release) -> Path:
    return cache.release_tree(release.version)


def commit_all(repo: Path, message: str) -> None:
    tool.git("add", "-A", cwd=repo)
    tool.git("commit", "-q", "-m", message, cwd=repo, env={
        "GIT_AUTHOR_NAME": "Fixture Author", "GIT_AUTHOR_EMAIL": "fixture@example.invalid",
        "GIT_COMMITTER_NAME": "Fixture Author", "GIT_COMMITTER_EMAIL": "fixture@example.invalid",
    })


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory, cache: tool.Cache, release: tool.Release,
                 upstream: Path) -> Path:
    """An overlay root whose variant has two fixture patches and one new file, made with refresh."""
    root = tmp_path_factory.mktemp("fixture-overlay")
    (root / "patches" / release.variant).mkdir(parents=True)
    shutil.copyfile(REPO / "patches" / "releases.toml", root / "patches" / "releases.toml")
    (root / NEW_FILE).parent.mkdir(parents=True)
    (root / NEW_FILE).write_text('"""A new file of the fixture overlay."""\nHOOKED = True\n')
    empty = tool.Overlay.load(root)
    work = tool.checkout(release.version, tmp_path_factory.mktemp("co") / "c", empty, cache)
    for rel, line in ((HOOKED, "from sglang.srt import overlay_fixture  # fixture hook\n"),
                      (SECOND, "FIXTURE_SECOND_HOOK = True\n")):
        with open(work / rel, "a") as f:
            f.write(line)
        commit_all(work, f"fixture: hook {Path(rel).name}\n\nUpstream-Status: Inappropriate [test fixture]")
    written = tool.export_patches(work, tool.Overlay.load(root))
    assert [p.name for p in written] == ["0001-fixture-hook-parallel-state-py.patch",
                                         "0002-fixture-hook-expert-location-py.patch"]
    return root


@pytest.fixture
def overlay(fixture_root: Path, tmp_path: Path) -> tool.Overlay:
    root = tmp_path / "overlay"
    shutil.copytree(fixture_root, root)
    return tool.Overlay.load(root)


@pytest.fixture
def checkout_target(upstream: Path, tmp_path: Path) -> Path:
    target = tmp_path / "upstream"
    shutil.copytree(upstream / "python", target / "python")
    return target


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_releases_lists_every_supported_release() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "overlay.py"), "releases"],
                         capture_output=True, text=True, check=True).stdout
    for version, r in tool.Overlay.load(REPO).releases.items():
        assert version in out and r.variant in out


def test_unsupported_release_is_refused_with_exit_2(checkout_target: Path) -> None:
    version_file = checkout_target / "python" / "sglang" / "_version.py"
    if version_file.exists():
        text = version_file.read_text()
        version_file.write_text(text.replace(tool.Target.resolve(checkout_target).version(), "0.0.1"))
    else:
        (checkout_target / "python" / "sglang" / "version.py").write_text('__version__ = "0.0.1"\n')
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "overlay.py"), "apply", str(checkout_target)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "0.0.1 is not a supported release" in proc.stderr
    for version in tool.Overlay.load(REPO).releases:
        assert version in proc.stderr


def test_apply_then_status_then_revert_restores_exact_bytes(overlay, cache, upstream, checkout_target) -> None:
    before = tree_digest(checkout_target)
    assert tool.status(checkout_target, overlay, cache)[0] == "not applied"
    assert "overlay applied (3 file(s)" in tool.apply(checkout_target, overlay, cache)
    assert (checkout_target / NEW_FILE).is_file()
    assert (checkout_target / HOOKED).read_text().endswith("# fixture hook\n")
    assert tool.status(checkout_target, overlay, cache)[0] == "applied"
    tool.revert(checkout_target, overlay, cache)
    for rel in (HOOKED, SECOND):
        assert hashlib.sha256((checkout_target / rel).read_bytes()).digest() == \
            hashlib.sha256((upstream / rel).read_bytes()).digest()
    assert not (checkout_target / NEW_FILE).exists()
    assert tree_digest(checkout_target) == before


def test_second_apply_is_a_noop_that_says_so(overlay, cache, checkout_target) -> None:
    tool.apply(checkout_target, overlay, cache)
    applied = tree_digest(checkout_target)
    assert "already applied" in tool.apply(checkout_target, overlay, cache)
    assert tree_digest(checkout_target) == applied


def test_apply_check_writes_nothing(overlay, cache, checkout_target) -> None:
    before = tree_digest(checkout_target)
    assert "applies cleanly" in tool.apply(checkout_target, overlay, cache, check_only=True)
    assert tree_digest(checkout_target) == before


def test_a_patch_that_does_not_apply_leaves_every_file_byte_identical(overlay, cache, checkout_target,
                                                                      release) -> None:
    second = overlay.patches(release)[1]
    text = second.read_text()
    context = next(line for line in text.splitlines() if line.startswith(" ") and line.strip())
    second.write_text(text.replace(context + "\n", " this line is not upstream's\n", 1))
    before = tree_digest(checkout_target)
    with pytest.raises(tool.OverlayError, match="does not apply"):
        tool.apply(checkout_target, overlay, cache)
    assert tree_digest(checkout_target) == before


def test_local_edits_where_a_patch_lands_are_refused(overlay, cache, checkout_target) -> None:
    edited = checkout_target / SECOND
    edited.write_bytes(edited.read_bytes() + b"# my local edit\n")
    before = tree_digest(checkout_target)
    with pytest.raises(tool.OverlayError, match="local edits") as err:
        tool.apply(checkout_target, overlay, cache)
    assert SECOND in str(err.value)
    assert tree_digest(checkout_target) == before
    assert tool.status(checkout_target, overlay, cache)[0] == "modified"


def test_partly_applied_status_names_the_files(overlay, cache, upstream, checkout_target) -> None:
    tool.apply(checkout_target, overlay, cache)
    shutil.copyfile(upstream / SECOND, checkout_target / SECOND)
    state, report = tool.status(checkout_target, overlay, cache)
    assert state == "partly applied"
    assert f"upstream  {SECOND}" in report and f"applied   {HOOKED}" in report
    assert "overlay applied (1 file(s)" in tool.apply(checkout_target, overlay, cache)


def test_installed_package_directory_is_a_target(overlay, cache, upstream, tmp_path) -> None:
    site = tmp_path / "site-packages"
    shutil.copytree(upstream / "python" / "sglang", site / "sglang")
    before = tree_digest(site)
    tool.apply(site / "sglang", overlay, cache)
    assert (site / "sglang" / "srt" / "overlay_fixture.py").is_file()
    assert tool.status(site / "sglang", overlay, cache)[0] == "applied"
    tool.revert(site / "sglang", overlay, cache)
    assert tree_digest(site) == before


def test_refresh_is_stable_and_check_passes_on_fresh_patches(overlay, cache, release, tmp_path) -> None:
    assert tool.check([release.version], overlay, cache) == []
    work = tool.checkout(release.version, tmp_path / "co", overlay, cache)
    first = [p.read_bytes() for p in overlay.patches(release)]
    tool.export_patches(work, overlay)
    assert [p.read_bytes() for p in overlay.patches(release)] == first
    assert all(b"Date: " not in text for text in first)


def test_check_detects_a_patch_that_applies_only_with_an_offset(overlay, cache, release) -> None:
    first = overlay.patches(release)[0]
    text = first.read_text()
    header = next(line for line in text.splitlines() if line.startswith("@@ "))
    old_start = int(header.split()[1].split(",")[0][1:])
    shifted = header.replace(f"-{old_start},", f"-{old_start - 3},", 1)
    first.write_text(text.replace(header, shifted, 1))
    problems = tool.check([release.version], overlay, cache)
    assert len(problems) == 1 and "is stale" in problems[0]


def test_refresh_refuses_edits_to_overlay_files_in_the_checkout(overlay, cache, release, tmp_path) -> None:
    work = tool.checkout(release.version, tmp_path / "co", overlay, cache)
    (work / NEW_FILE).write_text("HOOKED = False\n")
    commit_all(work, "edit the overlay file in the checkout")
    with pytest.raises(tool.OverlayError, match="overlay files are edited in the overlay repository"):
        tool.export_patches(work, overlay)


def test_refresh_refuses_uncommitted_changes(overlay, cache, release, tmp_path) -> None:
    work = tool.checkout(release.version, tmp_path / "co", overlay, cache)
    with open(work / HOOKED, "a") as f:
        f.write("# not committed\n")
    with pytest.raises(tool.OverlayError, match="uncommitted changes"):
        tool.export_patches(work, overlay)


def test_the_repository_patches_are_up_to_date(cache, release) -> None:
    assert tool.check([release.version], tool.Overlay.load(REPO), cache) == []
