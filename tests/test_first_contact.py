"""What a new user meets first: venv / demo of a release that does not run on CPU, a pipe closed
early, matrix's progress lines, what `check` will fetch, what git ignores. CPU-only, no sglang and no
network needed; each test takes well under a second or two.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from overlay_tool.cache import GIT_IDENTITY, Cache  # noqa: E402
from overlay_tool.errors import NotOnCPU  # noqa: E402
from overlay_tool.matrix import format_progress, matrix  # noqa: E402
from overlay_tool.releases import Overlay  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OVERLAY_PY = REPO / "scripts" / "overlay.py"


def _first_non_cpu(overlay: Overlay) -> str:
    return next(v for v in overlay.versions() if not overlay.releases[v].cpu)  # 0.4.9 today


@pytest.mark.parametrize("verb", ["venv", "demo"])
def test_a_release_that_does_not_run_on_cpu_is_refused_before_any_download(verb: str, tmp_path: Path) -> None:
    real = Overlay.load(REPO)
    version = _first_non_cpu(real)
    work = tmp_path / "work"
    work.mkdir()
    args = {"venv": ["venv", version, str(work / "venv")], "demo": ["demo", version, "--venvs", str(work / "venvs")]}[
        verb
    ]
    env = {**os.environ, "SGLANG_OVERLAY_CACHE": str(work / "cache")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(OVERLAY_PY), *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 20
    assert proc.stderr.startswith(f"error: sglang {version} does not run on CPU")
    assert real.releases[version].cpu_note in proc.stderr  # the measured reason, from releases.toml
    assert f"pick a release from {real.cpu_ranges()}" in proc.stderr
    assert "`overlay.py releases`" in proc.stderr and "pip install" in proc.stderr
    assert list(work.iterdir()) == [], "nothing may be downloaded or created"
    assert proc.stdout == ""


def test_every_release_that_does_not_run_on_cpu_is_refused_with_its_note() -> None:
    real = Overlay.load(REPO)
    for version, release in real.releases.items():
        if release.cpu:
            assert real.cpu_release(version, "venv") is release
        else:
            with pytest.raises(NotOnCPU, match="does not run on CPU") as info:
                real.cpu_release(version, "venv")
            assert info.value.exit_code == 2 and release.cpu_note in str(info.value)


@pytest.mark.parametrize("args", [["releases"], ["--help"], ["matrix", "--help"]])
def test_a_pipe_closed_early_ends_quietly(args: list[str]) -> None:
    # `overlay.py releases | head -1`: the reader is gone before the tool writes (closed before it
    # starts, so the broken pipe happens every time, not only when head wins the race).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, str(OVERLAY_PY), *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    # A verb's output: exit 1, its output was cut short. --help: argparse ignores the failed write, exit 0.
    assert proc.returncode == (0 if "--help" in args else 1)


def test_a_reader_that_takes_one_line_gets_it_and_no_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(OVERLAY_PY), "releases"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) in (0, 1)  # 0 when every line was written before the pipe closed
    assert first.startswith(Overlay.load(REPO).versions()[0] + " ")
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_progress_line_format() -> None:
    row = {
        "release": "0.5.17",
        "variant": "bootstrap",
        "level": "release",
        "apply": "ok",
        "compile": "ok",
        "tests": "ok",
        "seconds": 81.4,
    }
    assert format_progress(3, 52, row) == "[3/52] 0.5.17 ok 81 s"
    assert (
        format_progress(4, 52, {**row, "tests": "FAILED (pytest exit 1)", "seconds": 95.0})
        == "[4/52] 0.5.17 tests FAILED (pytest exit 1) 95 s"
    )
    assert (
        format_progress(
            1, 2, {**row, "release": "0.5.4", "apply": "FAILED", "compile": "-", "tests": "-", "seconds": 1.2}
        )
        == "[1/2] 0.5.4 apply FAILED 1 s"
    )
    assert (
        format_progress(
            2, 2, {**row, "release": "0.4.9", "level": "compile", "tests": "n/a: imports vllm", "seconds": 0.4}
        )
        == "[2/2] 0.4.9 ok (apply+compile only) 0 s"
    )


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY}, check=True, capture_output=True)


def _fake_release_tree(cache: Cache, version: str) -> None:
    """A release tree in the cache as ``Cache.release_tree`` leaves it (a git repository tagged vX)."""
    repo = cache.root / "releases" / version
    (repo / "python" / "sglang").mkdir(parents=True)
    (repo / "python" / "sglang" / "version.py").write_text(f'__version__ = "{version}"\n')
    _git("init", "-q", "-b", "main", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "--no-verify", "-m", f"sglang {version}", cwd=repo)
    _git("tag", f"v{version}", cwd=repo)


def test_matrix_prints_a_progress_line_per_row_as_it_finishes(tmp_path: Path, capsys) -> None:
    root = tmp_path / "overlay"
    (root / "patches" / "good").mkdir(parents=True)
    (root / "patches" / "bad").mkdir()
    (root / "patches" / "releases.toml").write_text(
        'default = "1.0"\n[runtime]\ntorch = "2.13.0"\ntorchvision = "0.28.0"\npackages = []\n'
        '[variants.good]\nbase = "1.0"\n[variants.bad]\nbase = "2.0"\n'
        '[releases."1.0"]\nvariant = "good"\ntransformers = "4.0"\ncpu = false\ncpu_note = "fixture: no CPU"\n'
        '[releases."2.0"]\nvariant = "bad"\ntransformers = "4.0"\ncpu = false\ncpu_note = "fixture: no CPU"\n'
    )
    (root / "python" / "sglang").mkdir(parents=True)
    (root / "python" / "sglang" / "overlay_fixture.py").write_text("HOOKED = True\n")
    (root / "patches" / "bad" / "0001-hook.patch").write_text(  # a context line upstream does not have
        "From: Fixture <fixture@example.invalid>\nSubject: [PATCH] hook\n\n---\n"
        "diff --git a/python/sglang/version.py b/python/sglang/version.py\n"
        "--- a/python/sglang/version.py\n+++ b/python/sglang/version.py\n"
        "@@ -1 +1,2 @@\n no such line in upstream\n+HOOK = True\n"
    )
    cache = Cache(tmp_path / "cache")
    for version in ("1.0", "2.0"):
        _fake_release_tree(cache, version)
    overlay = Overlay.load(root)
    assert matrix(["1.0", "2.0"], overlay, cache, tmp_path / "venvs", []) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1/2] 1.0 ok (apply+compile only) 0 s"
    assert out[1] == "[2/2] 2.0 apply FAILED 0 s"
    assert out[2].startswith("| release ")  # then the table, as before
    assert not (tmp_path / "venvs").exists()


def test_the_commands_the_tool_runs_write_to_stderr_so_stdout_is_the_result() -> None:
    """``PY=$(overlay.py venv 0.5.23 DIR)`` on a cold cache caught ~219 lines of pip's output in PY (exit 127):
    every command the tool runs without capturing it (pip, venv) writes to stderr, both of its streams."""
    child = "print('pip: Collecting torch'); import sys; print('pip: a warning', file=sys.stderr)"
    code = (
        "import sys; sys.path.insert(0, 'scripts'); from overlay_tool.gitutil import run; "
        f"run([sys.executable, '-c', {child!r}], capture=False); print('/the/venv/bin/python')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "/the/venv/bin/python\n"
    assert "pip: Collecting torch" in proc.stderr and "pip: a warning" in proc.stderr


def test_what_the_readme_commands_leave_in_a_clone_is_ignored_by_git() -> None:
    """README's install commands leave venvs, a wheel and the build stage in the clone (79-262 MB each);
    `git status` must not offer them for a commit, and no tracked file may match an ignore pattern."""
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    readme = "".join(re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S))  # its commands
    venvs = set(re.findall(r"python3 -m venv (\S+)", readme)) | set(
        re.findall(r"overlay\.py venv \S+ ([^\s)]+)", readme)
    )
    assert {".venv", ".venv-light", ".venvs/0.5.23"} <= venvs  # what README says today
    default = Overlay.load(REPO).default
    made = [
        *(f"{v}/bin/python" for v in venvs),
        f"sglang-{default}+overlay.1-cp311-cp311-linux_x86_64.whl",  # `pip wheel --no-deps .`
        "build/sglang-overlay/build.json",  # the build backend's stage (setup.py's STAGE)
        "build/lib/sglang/__init__.py",  # setuptools' own build folder
    ]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=REPO, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(made)
    tracked = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout == ""


def _fixture_overlay(root: Path) -> Overlay:
    """An overlay of two releases without patches, one variant whose base is 1.0."""
    (root / "patches" / "one").mkdir(parents=True)
    (root / "patches" / "releases.toml").write_text(
        'default = "1.0"\n[runtime]\ntorch = "2.13.0"\ntorchvision = "0.28.0"\npackages = []\n'
        '[variants.one]\nbase = "1.0"\n'
        '[releases."1.0"]\nvariant = "one"\ntransformers = "4.0"\ncpu = false\ncpu_note = "fixture: no CPU"\n'
        '[releases."2.0"]\nvariant = "one"\ntransformers = "4.0"\ncpu = false\ncpu_note = "fixture: no CPU"\n'
    )
    (root / "python" / "sglang").mkdir(parents=True)
    (root / "python" / "sglang" / "overlay_fixture.py").write_text("HOOKED = True\n")
    return Overlay.load(root)


def test_check_says_how_many_releases_it_will_fetch_before_it_does(tmp_path: Path) -> None:
    """`check` with no release fetched all 52 (3 min, 2.5 GB) without a word: it says how many releases are
    not in the cache yet and about how much fetching them costs, then checks as before."""
    _fixture_overlay(tmp_path / "overlay")
    cache = Cache(tmp_path / "cache")
    _fake_release_tree(cache, "1.0")
    (cache.root / "wheels").mkdir()
    with zipfile.ZipFile(cache.root / "wheels" / "sglang-2.0-py3-none-any.whl", "w") as zf:  # cached, not unpacked
        zf.writestr("sglang/version.py", '__version__ = "2.0"\n')
    argv = [sys.executable, str(OVERLAY_PY), "--overlay-root", str(tmp_path / "overlay"), "check"]
    env = {**os.environ, "SGLANG_OVERLAY_CACHE": str(cache.root)}
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines()[0] == (
        f"check: 1 of the 2 release(s) are not in the cache ({cache.root}) yet: fetching them takes about "
        "0.1 GB on disk and about 1 min on a quiet machine. `check X ...` works on the releases named only"
    )
    assert first.stdout == "patches are up to date and apply cleanly\n"
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, "")
    # A wheel to download too: said with its size (nothing is downloaded here).
    notice = cache.fetch_notice(["1.0", "2.0", "3.0"], "matrix")
    assert notice.startswith("matrix: 1 of the 3 release(s) are not in the cache")
    assert "downloads 1 wheel(s) from PyPI (about 7 MB)" in notice
