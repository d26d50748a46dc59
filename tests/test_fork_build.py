"""`pip wheel .` builds the patched fork of the release under test, offline from the cached wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import overlay as tool  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.sglang


def test_pip_wheel_builds_the_patched_release(tmp_path: Path) -> None:
    release = os.environ["SGLANG_OVERLAY_RELEASE"]
    upstream_wheel = tool.Cache().wheel(release)
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": release, "SGLANG_OVERLAY_UPSTREAM": str(upstream_wheel)}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
                   env=env, check=True)
    (wheel,) = (tmp_path / "dist").glob("sglang-*.whl")
    assert wheel.name.startswith(f"sglang-{release}+overlay.")

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    metadata = next(target.glob("sglang-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert f"Version: {release}+overlay." in text
    assert "Requires-Dist: torch==" in text, "the fork must keep upstream's dependencies"
    state, report = tool.status(target / "sglang", tool.Overlay.load(REPO), tool.Cache())
    assert state == "applied", report

    out = subprocess.run([sys.executable, "-m", "sglang.overlay"], env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(f"sglang {release} patched by sglang-overlay ")


def test_an_unsupported_release_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": "0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "0.0.1 is not a supported release" in proc.stdout + proc.stderr
