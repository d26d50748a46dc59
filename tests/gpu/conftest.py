"""tests/gpu: tests that need an NVIDIA GPU and a (patched) SGLang importable.

CI has no GPU: every test under this directory is marked ``gpu`` and skipped, with the reason,
when ``torch.cuda.is_available()`` is false (or torch / sglang cannot be imported). On the device
they run through ``bash scripts/device/run_gpu.sh`` (see scripts/device/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _why_not() -> "str | None":
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run here"
        return f"needs torch with CUDA (torch import failed: {e})"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (torch.cuda.is_available() is False): run `bash scripts/device/run_gpu.sh` on the device"
    try:
        import sglang  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"needs sglang importable (staged by scripts/device/stage.py): {e}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; skipped without CUDA (tests/gpu)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    reason = _why_not()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
