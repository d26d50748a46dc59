"""`pip wheel .` builds the patched fork of the release under test, offline from the cached wheel.

pyproject.toml's in-tree backend (scripts/overlay_tool/build_backend.py) stages the patched
release in its build hooks; setup.py only reads the stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from overlay_tool.apply import status  # noqa: E402
from overlay_tool.cache import Cache  # noqa: E402
from overlay_tool.releases import Overlay  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.sglang


def _release() -> str:
    return os.environ.get("SGLANG_OVERLAY_RELEASE") or Overlay.load(REPO).default


@pytest.fixture(scope="module")
def fork_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps .`` of this repository for the release under test, offline."""
    release = _release()
    dist = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "SGLANG_OVERLAY_BUILD_RELEASE": release,
        "SGLANG_OVERLAY_UPSTREAM": str(Cache().wheel(release)),
    }
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        env=env,
        check=True,
    )
    (wheel,) = dist.glob("sglang-*.whl")
    return wheel


@pytest.fixture(scope="module")
def fork_site(fork_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fork wheel installed with ``pip install --no-deps --target``: the README's CPU install."""
    target = tmp_path_factory.mktemp("fork") / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(fork_wheel)],
        check=True,
    )
    return target


def test_pip_wheel_builds_the_patched_release(fork_wheel: Path, fork_site: Path) -> None:
    release = _release()
    assert fork_wheel.name.startswith(f"sglang-{release}+overlay.")
    target = fork_site
    metadata = next(target.glob("sglang-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert f"Version: {release}+overlay." in text
    assert "Requires-Dist: torch==" in text, "the fork must keep upstream's dependencies"
    state, report = status(target / "sglang", Overlay.load(REPO), Cache())
    assert state == "applied", report

    out = subprocess.run(
        [sys.executable, "-m", "sglang.overlay"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().startswith(f"sglang {release} patched by sglang-overlay ")


def test_the_wheel_holds_every_module_of_the_fork_package(fork_wheel: Path) -> None:
    names = set(zipfile.ZipFile(fork_wheel).namelist())
    package = REPO / "python" / "sglang" / "overlay"
    expected = {
        f"sglang/overlay/{p.relative_to(package).as_posix()}"
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert "sglang/overlay/__init__.py" in expected
    assert sorted(expected - names) == []


def test_an_unsupported_release_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": "0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "0.0.1 is not a supported release" in proc.stdout + proc.stderr


def _bare(target: Path, code: str) -> subprocess.CompletedProcess:
    """``code`` in a bare interpreter: isolated (-I), no site-packages (-S), only ``target`` on the path."""
    boot = f"import sys; sys.path.insert(0, {str(target)!r}); " + code
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", boot],
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_sglang_overlay_needs_only_the_standard_library(fork_site: Path) -> None:
    release = _release()
    assert _bare(fork_site, "import numpy").returncode != 0, "the bare interpreter must not see numpy"
    proc = _bare(fork_site, "import runpy; runpy.run_module('sglang.overlay', run_name='__main__', alter_sys=True)")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"sglang {release} patched by sglang-overlay 1"
    assert "sglang's runtime is not installed here (No module named" in lines[1]
    proc = _bare(fork_site, "import sglang, sglang.overlay as o; print(o.__version__, sglang.__version__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"{release}+overlay.1", release]
    # An upstream name raises the original error on first use, with what to install.
    proc = _bare(fork_site, "import sglang; sglang.Engine")
    assert "ModuleNotFoundError: sglang.Engine needs sglang's runtime" in proc.stderr
    assert "pip install ." in proc.stderr and "overlay.py venv" in proc.stderr


def test_the_mezo_command_line_without_the_runtime_helps_and_says_what_to_install(fork_site: Path) -> None:
    """The light install (``pip install --no-deps .``): ``python -m sglang.overlay.mezo --help`` lists the flags
    (generated from the settings dataclasses, with their defaults); a run says what to install, in one line,
    where it used to end in a raw ``ModuleNotFoundError: No module named 'torch'`` traceback."""
    run = "import runpy, sys; sys.argv = {argv!r}; runpy.run_module('sglang.overlay.mezo', run_name='__main__', alter_sys=True)"
    proc = _bare(fork_site, run.format(argv=["mezo", "--help"]))
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--model",
        "--data",
        "--steps",
        "--out",
        "--lr",
        "--eps",
        "--lora-rank",
        "--eval-every",
        "--no-progress",
    ):
        assert flag in proc.stdout
    assert "learning rate (default: 1e-06)" in proc.stdout and "(default: 0.001)" in proc.stdout
    assert "Model families: OPT, GPT-2, Llama 2 / 3, Mistral, Qwen2 / Qwen2.5, Qwen3, Gemma" in " ".join(
        proc.stdout.split()
    )
    proc = _bare(
        fork_site, run.format(argv=["mezo", "--model", "m", "--data", "d.jsonl", "--steps", "1", "--out", "o"])
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: the MeZO trainer needs sglang's runtime, and 'torch' is not installed here")
    assert "overlay.py venv" in proc.stderr and "pip install ." in proc.stderr


def test_import_sglang_with_the_runtime_is_upstreams(fork_site: Path) -> None:
    """With the runtime installed, the fork's ``sglang`` has upstream's names and imports what it imports."""
    release = _release()
    pristine = Cache().release_tree(release) / "python"
    assert (fork_site / "sglang" / "_upstream_init.py").read_bytes() == (
        pristine / "sglang" / "__init__.py"
    ).read_bytes()
    probe = (
        "import sys, sglang; print(sorted(vars(sglang))); print(sorted(m for m in sys.modules if m.startswith('sglang')));"
        "print(sglang.gen.__module__, sglang.__version__)"
    )
    seen = []
    for path in (fork_site, pristine):
        proc = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, "PYTHONPATH": str(path)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen.append(proc.stdout.splitlines())
    fork, upstream = seen
    assert "_overlay_runtime_error" not in fork[0] and "gen" in fork[0]
    assert fork == upstream
