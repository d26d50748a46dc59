"""This sglang carries the sglang-overlay patch set.

sglang-overlay adds, on top of an unmodified upstream SGLang release:
- opt-in reuse of an existing distributed setup (SGLANG_ALLOW_REUSE_DISTRIBUTED),
  so that several ModelRunners can live in one process;
- a native OPT model (sglang/srt/models/opt.py) that matches HuggingFace.

``python -m sglang.overlay`` prints which upstream release this is and the overlay
version; ``UPSTREAM_RELEASE`` and ``OVERLAY_VERSION`` say the same in code.
"""

from sglang.version import __version__ as UPSTREAM_RELEASE

OVERLAY_VERSION = "1"


def describe() -> str:
    return f"sglang {UPSTREAM_RELEASE} patched by sglang-overlay {OVERLAY_VERSION}"


if __name__ == "__main__":
    print(describe())
