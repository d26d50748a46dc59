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
code, and ``__version__`` is the fork's distribution version,
``<UPSTREAM_RELEASE>+overlay.<OVERLAY_VERSION>`` (``0.5.23+overlay.1``). Those
need only the standard library: in the fork wheel, ``import sglang`` without
sglang's runtime installed defers upstream's names instead of failing (the
wheel's ``sglang/__init__.py``, fork/sglang_init.py in the repository). The
public names are imported on first use, so importing this package costs
nothing.
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

__all__ = ["OVERLAY_VERSION", "UPSTREAM_RELEASE", "__version__", "describe", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name == "UPSTREAM_RELEASE":
        from sglang.version import __version__

        return __version__
    if name == "__version__":
        from sglang.version import __version__

        return f"{__version__}+overlay.{OVERLAY_VERSION}"
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sglang.overlay' has no attribute {name!r}")


def describe() -> str:
    """``sglang 0.5.23 patched by sglang-overlay 1``; a second line when sglang's runtime is missing."""
    import sglang
    from sglang.version import __version__

    text = f"sglang {__version__} patched by sglang-overlay {OVERLAY_VERSION}"
    missing = vars(sglang).get("_overlay_runtime_error")
    if missing is not None:
        text += (
            f"\nsglang's runtime is not installed here ({missing}): the runner, MeZO and upstream's API "
            'need it (README, "Installing the patched fork with pip")'
        )
    return text
