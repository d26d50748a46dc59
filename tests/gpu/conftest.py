"""tests/gpu: tests that need an NVIDIA GPU and a (patched) SGLang importable.

CI has no GPU: every test under this directory is marked ``gpu`` and skipped, with the reason,
when torch cannot be imported or ``torch.cuda.is_available()`` is false. Where there is a GPU, a
failed ``import sglang`` fails the run (a broken stage must not pass as all-skipped). On the device
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
        raise pytest.UsageError(
            f"a GPU is here but `import sglang` fails ({type(e).__name__}: {e}): stage it (scripts/device/stage.py)"
        ) from e
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
