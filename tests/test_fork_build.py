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
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": release, "SGLANG_OVERLAY_UPSTREAM": str(Cache().wheel(release))}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], env=env, check=True)
    (wheel,) = dist.glob("sglang-*.whl")
    return wheel


def test_pip_wheel_builds_the_patched_release(fork_wheel: Path, tmp_path: Path) -> None:
    release = _release()
    assert fork_wheel.name.startswith(f"sglang-{release}+overlay.")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(fork_wheel)],
                   check=True)
    metadata = next(target.glob("sglang-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert f"Version: {release}+overlay." in text
    assert "Requires-Dist: torch==" in text, "the fork must keep upstream's dependencies"
    state, report = status(target / "sglang", Overlay.load(REPO), Cache())
    assert state == "applied", report

    out = subprocess.run([sys.executable, "-m", "sglang.overlay"], env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(f"sglang {release} patched by sglang-overlay ")


def test_the_wheel_holds_every_module_of_the_fork_package(fork_wheel: Path) -> None:
    names = set(zipfile.ZipFile(fork_wheel).namelist())
    package = REPO / "python" / "sglang" / "overlay"
    expected = {f"sglang/overlay/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
                if "__pycache__" not in p.parts}
    assert "sglang/overlay/__init__.py" in expected
    assert sorted(expected - names) == []


def test_an_unsupported_release_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": "0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "0.0.1 is not a supported release" in proc.stdout + proc.stderr
