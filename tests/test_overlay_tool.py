"""The overlay tool against a real fetched upstream release, with fixture patches of its own.

The release under test is $SGLANG_OVERLAY_RELEASE (set by `overlay.py matrix`),
else the default release of patches/releases.toml; its tree comes from the
release cache (downloaded once from PyPI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from overlay_tool.apply import Target, apply, revert, status  # noqa: E402
from overlay_tool.cache import Cache  # noqa: E402
from overlay_tool.errors import OverlayError  # noqa: E402
from overlay_tool.gitutil import git  # noqa: E402
from overlay_tool.matrix import dependency_groups, newest_release, require_newest_supported, test_level  # noqa: E402
from overlay_tool.patches import check, checkout, export_patches  # noqa: E402
from overlay_tool.releases import Overlay, Release  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOOKED = "python/sglang/srt/distributed/parallel_state.py"
SECOND = "python/sglang/srt/eplb/expert_location.py"
NEW_FILE = "python/sglang/srt/overlay_fixture.py"


@pytest.fixture(scope="session")
def cache() -> Cache:
    return Cache()


@pytest.fixture(scope="session")
def release() -> Release:
    real = Overlay.load(REPO)
    return real.release(os.environ.get("SGLANG_OVERLAY_RELEASE") or real.default)


@pytest.fixture(scope="session")
def upstream(cache: Cache, release: Release) -> Path:
    return cache.release_tree(release.version)


def commit_all(repo: Path, message: str) -> None:
    git("add", "-A", cwd=repo)
    git(
        "commit",
        "-q",
        "-m",
        message,
        cwd=repo,
        env={
            "GIT_AUTHOR_NAME": "Fixture Author",
            "GIT_AUTHOR_EMAIL": "fixture@example.invalid",
            "GIT_COMMITTER_NAME": "Fixture Author",
            "GIT_COMMITTER_EMAIL": "fixture@example.invalid",
        },
    )


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory, cache: Cache, release: Release, upstream: Path) -> Path:
    """An overlay root whose variant has two fixture patches and one new file, made with refresh."""
    root = tmp_path_factory.mktemp("fixture-overlay")
    (root / "patches" / release.variant).mkdir(parents=True)
    shutil.copyfile(REPO / "patches" / "releases.toml", root / "patches" / "releases.toml")
    (root / NEW_FILE).parent.mkdir(parents=True)
    (root / NEW_FILE).write_text('"""A new file of the fixture overlay."""\nHOOKED = True\n')
    empty = Overlay.load(root)
    work = checkout(release.version, tmp_path_factory.mktemp("co") / "c", empty, cache)
    for rel, line in (
        (HOOKED, "from sglang.srt import overlay_fixture  # fixture hook\n"),
        (SECOND, "FIXTURE_SECOND_HOOK = True\n"),
    ):
        with open(work / rel, "a") as f:
            f.write(line)
        commit_all(work, f"fixture: hook {Path(rel).name}\n\nUpstream-Status: Inappropriate [test fixture]")
    written = export_patches(work, Overlay.load(root))
    assert [p.name for p in written] == [
        "0001-fixture-hook-parallel-state-py.patch",
        "0002-fixture-hook-expert-location-py.patch",
    ]
    return root


@pytest.fixture
def overlay(fixture_root: Path, tmp_path: Path) -> Overlay:
    root = tmp_path / "overlay"
    shutil.copytree(fixture_root, root)
    return Overlay.load(root)


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
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "overlay.py"), "releases"], capture_output=True, text=True, check=True
    ).stdout
    for version, r in Overlay.load(REPO).releases.items():
        assert version in out and r.variant in out


def test_unsupported_release_is_refused_with_exit_2(checkout_target: Path) -> None:
    version_file = checkout_target / "python" / "sglang" / "_version.py"
    if version_file.exists():
        text = version_file.read_text()
        version_file.write_text(text.replace(Target.resolve(checkout_target).version(), "0.0.1"))
    else:
        (checkout_target / "python" / "sglang" / "version.py").write_text('__version__ = "0.0.1"\n')
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "overlay.py"), "apply", str(checkout_target)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "0.0.1 is not a supported release" in proc.stderr
    for version in Overlay.load(REPO).releases:
        assert version in proc.stderr


def test_apply_then_status_then_revert_restores_exact_bytes(overlay, cache, upstream, checkout_target) -> None:
    before = tree_digest(checkout_target)
    assert status(checkout_target, overlay, cache)[0] == "not applied"
    assert "overlay applied (3 file(s)" in apply(checkout_target, overlay, cache)
    assert (checkout_target / NEW_FILE).is_file()
    assert (checkout_target / HOOKED).read_text().endswith("# fixture hook\n")
    assert status(checkout_target, overlay, cache)[0] == "applied"
    revert(checkout_target, overlay, cache)
    for rel in (HOOKED, SECOND):
        assert (
            hashlib.sha256((checkout_target / rel).read_bytes()).digest()
            == hashlib.sha256((upstream / rel).read_bytes()).digest()
        )
    assert not (checkout_target / NEW_FILE).exists()
    assert tree_digest(checkout_target) == before


def test_second_apply_is_a_noop_that_says_so(overlay, cache, checkout_target) -> None:
    apply(checkout_target, overlay, cache)
    applied = tree_digest(checkout_target)
    assert "already applied" in apply(checkout_target, overlay, cache)
    assert tree_digest(checkout_target) == applied


def test_apply_check_writes_nothing(overlay, cache, checkout_target) -> None:
    before = tree_digest(checkout_target)
    assert "applies cleanly" in apply(checkout_target, overlay, cache, check_only=True)
    assert tree_digest(checkout_target) == before


def test_a_patch_that_does_not_apply_leaves_every_file_byte_identical(overlay, cache, checkout_target, release) -> None:
    second = overlay.patches(release)[1]
    text = second.read_text()
    context = next(line for line in text.splitlines() if line.startswith(" ") and line.strip())
    second.write_text(text.replace(context + "\n", " this line is not upstream's\n", 1))
    before = tree_digest(checkout_target)
    with pytest.raises(OverlayError, match="does not apply"):
        apply(checkout_target, overlay, cache)
    assert tree_digest(checkout_target) == before


def test_local_edits_where_a_patch_lands_are_refused(overlay, cache, checkout_target) -> None:
    edited = checkout_target / SECOND
    edited.write_bytes(edited.read_bytes() + b"# my local edit\n")
    before = tree_digest(checkout_target)
    with pytest.raises(OverlayError, match="local edits") as err:
        apply(checkout_target, overlay, cache)
    assert SECOND in str(err.value)
    assert tree_digest(checkout_target) == before
    assert status(checkout_target, overlay, cache)[0] == "modified"


def test_partly_applied_status_names_the_files(overlay, cache, upstream, checkout_target) -> None:
    apply(checkout_target, overlay, cache)
    shutil.copyfile(upstream / SECOND, checkout_target / SECOND)
    state, report = status(checkout_target, overlay, cache)
    assert state == "partly applied"
    assert f"upstream  {SECOND}" in report and f"applied   {HOOKED}" in report
    assert "overlay applied (1 file(s)" in apply(checkout_target, overlay, cache)


def test_installed_package_directory_is_a_target(overlay, cache, upstream, tmp_path) -> None:
    site = tmp_path / "site-packages"
    shutil.copytree(upstream / "python" / "sglang", site / "sglang")
    before = tree_digest(site)
    apply(site / "sglang", overlay, cache)
    assert (site / "sglang" / "srt" / "overlay_fixture.py").is_file()
    assert status(site / "sglang", overlay, cache)[0] == "applied"
    revert(site / "sglang", overlay, cache)
    assert tree_digest(site) == before


def test_refresh_is_stable_and_check_passes_on_fresh_patches(overlay, cache, release, tmp_path) -> None:
    assert check([release.version], overlay, cache) == []
    work = checkout(release.version, tmp_path / "co", overlay, cache)
    first = [p.read_bytes() for p in overlay.patches(release)]
    export_patches(work, overlay)
    assert [p.read_bytes() for p in overlay.patches(release)] == first
    assert all(b"Date: " not in text for text in first)


def test_check_detects_a_patch_that_applies_only_with_an_offset(overlay, cache, release) -> None:
    first = overlay.patches(release)[0]
    text = first.read_text()
    header = next(line for line in text.splitlines() if line.startswith("@@ "))
    old_start = int(header.split()[1].split(",")[0][1:])
    shifted = header.replace(f"-{old_start},", f"-{old_start - 3},", 1)
    first.write_text(text.replace(header, shifted, 1))
    problems = check([release.version], overlay, cache)
    assert len(problems) == 1 and "is stale" in problems[0]


def test_refresh_refuses_edits_to_overlay_files_in_the_checkout(overlay, cache, release, tmp_path) -> None:
    work = checkout(release.version, tmp_path / "co", overlay, cache)
    (work / NEW_FILE).write_text("HOOKED = False\n")
    commit_all(work, "edit the overlay file in the checkout")
    with pytest.raises(OverlayError, match="overlay files are edited in the overlay repository"):
        export_patches(work, overlay)


def test_refresh_refuses_uncommitted_changes(overlay, cache, release, tmp_path) -> None:
    work = checkout(release.version, tmp_path / "co", overlay, cache)
    with open(work / HOOKED, "a") as f:
        f.write("# not committed\n")
    with pytest.raises(OverlayError, match="uncommitted changes"):
        export_patches(work, overlay)


def test_the_repository_patches_are_up_to_date(cache, release) -> None:
    assert check([release.version], Overlay.load(REPO), cache) == []


# --------------------------------------------------------------------------- the supported set


def test_every_release_names_a_variant_with_patches_whose_base_is_its_own() -> None:
    real = Overlay.load(REPO)
    for version, r in real.releases.items():
        assert real.patches(r), f"{version}: patches/{r.variant}/ holds no patch"
        base = real.variants[r.variant].base
        assert real.releases[base].variant == r.variant, f"variant {r.variant}'s base {base} is in another variant"
        assert r.cpu or r.cpu_note, f"{version}: cpu = false needs a cpu_note saying why"
    # Each variant covers one contiguous run of releases (an API era).
    versions = real.versions()
    seen: list[str] = []
    for version in versions:
        variant = real.releases[version].variant
        if not seen or seen[-1] != variant:
            assert variant not in seen, f"variant {variant} is not contiguous at {version}"
            seen.append(variant)
    assert set(seen) == set(real.variants)


def fake_overlay(tmp_path: Path, releases: dict[str, dict], variants: dict[str, str], default: str) -> Overlay:
    lines = [
        f'default = "{default}"',
        "[runtime]",
        'torch = "2.13.0"',
        'torchvision = "0.28.0"',
        'packages = ["numpy"]',
    ]
    for name, base in variants.items():
        lines += [f"[variants.{name}]", f'base = "{base}"']
    for version, r in releases.items():
        lines += [f'[releases."{version}"]'] + [
            f"{k} = {v!r}".replace("True", "true").replace("False", "false") for k, v in r.items()
        ]
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "releases.toml").write_text("\n".join(lines) + "\n")
    (tmp_path / "scripts" / "venv_support").mkdir(parents=True)
    (tmp_path / "scripts" / "venv_support" / "sglang_overlay_torchvision.py").write_text("")
    return Overlay.load(tmp_path)


def test_levels_and_shared_dependency_groups(tmp_path: Path) -> None:
    overlay = fake_overlay(
        tmp_path,
        {
            "1.0": dict(variant="a", transformers="4.0", cpu=False, cpu_note="imports sgl_kernel"),
            "1.1": dict(variant="a", transformers="4.0", cpu=True),
            "1.2": dict(variant="a", transformers="5.0", cpu=True),
            "2.0": dict(variant="b", transformers="5.0", cpu=True),
            "2.1": dict(variant="b", transformers="5.0", cpu=True),
            "2.2": dict(variant="b", transformers="6.0", cpu=True),
            "3.0": dict(variant="c", transformers="6.0", cpu=True),
        },
        {"a": "1.1", "b": "2.0", "c": "3.0"},
        default="2.2",
    )
    levels = {v: test_level(overlay.releases[v], overlay) for v in overlay.versions()}
    assert levels == {
        "1.0": "compile",
        "1.1": "release",
        "1.2": "release",
        "2.0": "release",
        "2.1": "release",
        "2.2": "full",
        "3.0": "release",
    }
    # One environment per transformers pin, shared across variants; compile-only releases need none.
    assert dependency_groups(overlay.versions(), overlay) == {
        "4.0": ["1.1"],
        "5.0": ["1.2", "2.0", "2.1"],
        "6.0": ["2.2", "3.0"],
    }


def _pypi_answer(tmp_path: Path, version: str) -> str:
    answer = tmp_path / "pypi.json"
    answer.write_text(json.dumps({"info": {"name": "sglang", "version": version}}))
    return answer.as_uri()


def test_newest_unsupported_release_is_refused_naming_it(tmp_path: Path) -> None:
    env = {**os.environ, "SGLANG_OVERLAY_PYPI_JSON": _pypi_answer(tmp_path, "9.9.9")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "overlay.py"), "matrix", "--newest"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "sglang 9.9.9 is the newest release on PyPI but patches/releases.toml does not list it" in proc.stderr
    assert "refresh" in proc.stderr and "matrix 9.9.9" in proc.stderr
    assert "| release" not in proc.stdout, "nothing may run when the newest release is not supported"


def test_newest_supported_release_is_accepted(tmp_path: Path) -> None:
    real = Overlay.load(REPO)
    newest = real.versions()[-1]
    assert newest_release(_pypi_answer(tmp_path, newest)) == newest
    assert require_newest_supported(real, newest) == newest


def test_newest_without_an_answer_from_pypi_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(OverlayError, match="cannot ask PyPI for the newest sglang release"):
        newest_release((tmp_path / "missing.json").as_uri())


# --------------------------------------------------------------------------- the package and its entry point


def test_the_entry_point_turns_errors_into_messages_however_it_is_imported(tmp_path: Path, capsys) -> None:
    import scripts.overlay as entry  # the way tests and tools import it: as scripts.overlay

    assert entry.main(["export-pr", str(tmp_path), "--base", "v0.0.1"]) == 2
    assert "error: sglang 0.0.1 is not a supported release" in capsys.readouterr().err
    assert entry.main(["apply", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_every_module_is_small_and_imports_without_work(tmp_path: Path) -> None:
    package = REPO / "scripts" / "overlay_tool"
    modules = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    for path in package.glob("*.py"):
        assert len(path.read_text().splitlines()) < 500, f"{path.name} has grown past 500 lines: split it"
    # Importing every module (the build backend and setup.py too) from another directory writes
    # nothing and runs nothing: no cache, no build/ stage, no subprocess.
    code = (
        "import importlib, runpy, subprocess, sys\n"
        "subprocess.Popen = None\n"
        f"sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
        f"for m in {modules!r}: importlib.import_module('overlay_tool.' + m)\n"
        f"runpy.run_path({str(REPO / 'setup.py')!r}, run_name='setup')\n"
    )
    env = {**os.environ, "SGLANG_OVERLAY_CACHE": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    stage_before = (REPO / "build" / "sglang-overlay" / "build.json").exists()
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    assert not (tmp_path / "cache").exists() and list(tmp_path.iterdir()) == []
    assert (REPO / "build" / "sglang-overlay" / "build.json").exists() == stage_before
