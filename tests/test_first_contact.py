"""What a new user meets first: venv / demo of a release that does not run on CPU, a pipe closed
early, and matrix's progress lines. CPU-only, no sglang and no network needed; each test takes
well under a second or two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from overlay_tool.errors import NotOnCPU  # noqa: E402
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
    args = {"venv": ["venv", version, str(work / "venv")],
            "demo": ["demo", version, "--venvs", str(work / "venvs")]}[verb]
    env = {**os.environ, "SGLANG_OVERLAY_CACHE": str(work / "cache")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(OVERLAY_PY), *args], capture_output=True, text=True, env=env,
                          timeout=60)
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
    assert real.cpu_ranges() == "0.5.13 to 0.5.23"  # README, Supported releases
