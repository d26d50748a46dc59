"""sglang-overlay's fork layer: SGLang's forward pass in-process, and MeZO on it.

This sglang carries the sglang-overlay patch set: on top of an unmodified
upstream release it adds opt-in reuse of an existing distributed setup
(SGLANG_ALLOW_REUSE_DISTRIBUTED) and a native OPT model that matches
HuggingFace, and this package, which upstream does not have:

- ``RunnerConfig`` / ``StandaloneRunner`` (``sglang.overlay.runner``): build a
  ModelRunner in-process, score, generate, close;
- ``MeZO`` / ``MeZOConfig`` (``sglang.overlay.mezo``): zeroth-order fine-tuning
  with forward passes only; ``python -m sglang.overlay.mezo`` is its CLI.

``python -m sglang.overlay`` prints which upstream release this is and the
overlay version; ``UPSTREAM_RELEASE`` and ``OVERLAY_VERSION`` say the same in
code. The public names are imported on first use, so importing this package
costs nothing.
"""

from __future__ import annotations

from typing import Any

OVERLAY_VERSION = "1"

_PUBLIC = {
    "RunnerConfig": "sglang.overlay.config",
    "StandaloneRunner": "sglang.overlay.runner",
    "MeZO": "sglang.overlay.mezo",
    "MeZOConfig": "sglang.overlay.mezo",
}

__all__ = ["OVERLAY_VERSION", "UPSTREAM_RELEASE", "describe", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name == "UPSTREAM_RELEASE":
        from sglang.version import __version__

        return __version__
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sglang.overlay' has no attribute {name!r}")


def describe() -> str:
    from sglang.version import __version__

    return f"sglang {__version__} patched by sglang-overlay {OVERLAY_VERSION}"
