"""What ``export-pr`` ships: the upstream layer, split into logical changes (one PR commit each).

The repository has three layers:

- upstream layer (exported): new files at upstream's paths under ``python/sglang/srt/`` (the
  distributed reuse module, the native OPT model and its layer ops) and the hook patches;
- fork layer (never exported): ``python/sglang/overlay/`` (the in-process runner, its config,
  the scoring engine, MeZO, the version marker), and files on their way there (FORK_LAYER);
- the overlay's tests: they build runners through ``sglang.overlay``, so they cannot run
  upstream as they are; none is exported (upstream-style tests are a later change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .releases import PACKAGE_PREFIX


@dataclass(frozen=True)
class Change:
    """One commit of the PR: the overlay files under ``files`` + the hook patches it claims."""

    key: str
    title: str
    description: str
    files: tuple[str, ...]  # path prefixes (upstream paths) of the overlay files of this change
    hooks: tuple[str, ...] = ()  # path prefixes of upstream files whose patches belong here
    keywords: tuple[str, ...] = ()  # words in a patch subject that claim it first


# In commit order. A patch goes to the first change with a keyword in its subject,
# else to the first change whose hook prefixes cover a file it touches, else it
# becomes a commit of its own (its own author and message). An exported file that
# no change covers is an error: add it here (or to FORK_LAYER, if it is the fork's).
CHANGES: tuple[Change, ...] = (
    Change(
        "distributed-teardown",
        "distributed: destroy the self-PP group in destroy_model_parallel()",
        "destroy_model_parallel() left the self-PP group (and its process group, store and port)\n"
        "alive, so the distributed setup could not be destroyed and rebuilt in one process.",
        files=(),
        keywords=("self-pp",),
    ),
    Change(
        "distributed-reuse",
        "distributed: opt-in reuse of an existing torch.distributed / model-parallel setup",
        "With SGLANG_ALLOW_REUSE_DISTRIBUTED=1, a ModelRunner created in a process that already has\n"
        "torch.distributed and SGLang's model-parallel groups reuses them when world size, TP and PP\n"
        "match, and raises a ValueError naming both sides when they do not. Several ModelRunners can\n"
        "then live in one process (e.g. zeroth-order fine-tuning with forward passes only). Unset,\n"
        "behaviour is unchanged.",
        files=("python/sglang/srt/distributed/",),
        hooks=("python/sglang/srt/distributed/", "python/sglang/srt/model_executor/",
               "python/sglang/srt/runtime_context"),
        keywords=("reuse",),
    ),
    Change(
        "expert-location",
        "eplb: allow replacing expert-location metadata when reusing distributed",
        "With SGLANG_ALLOW_REUSE_DISTRIBUTED set, a second ModelRunner in the same process sets its own\n"
        "expert-location metadata instead of tripping the once-per-process assertion.",
        files=("python/sglang/srt/eplb/",),
        hooks=("python/sglang/srt/eplb/",),
        keywords=("expert", "eplb"),
    ),
    Change(
        "opt-model",
        "models: native OPT with HF weight names and no silent weight skips",
        "The native OPT implementation loads both `decoder.*` and `model.decoder.*` checkpoint names,\n"
        "fails on unexpected or missing weights instead of skipping them, and matches HuggingFace's\n"
        "logits on the same weights. Its layer ops (e.g. the fused residual add + LayerNorm) live\n"
        "under srt/layers/.",
        files=("python/sglang/srt/models/", "python/sglang/srt/layers/"),
        hooks=("python/sglang/srt/models/", "python/sglang/srt/configs/", "python/sglang/srt/layers/"),
        keywords=("opt",),
    ),
)

# The fork layer: path prefixes of overlay files that are never exported. python/sglang/overlay/
# is the fork package; the two srt/ files are moving into it (issue 17) and are listed here until
# they are gone from srt/, so that an export in between ships neither.
FORK_LAYER = ("python/sglang/overlay/", "python/sglang/srt/standalone.py",
              "python/sglang/srt/layers/target_logprobs.py")
# The overlay's tests of the exported changes. They are not exported; --run-tests runs them at
# the tip (its python/ tree, with the fork layer added), as the overlay runs them.
TIP_TESTS = ("tests/test_opt.py", "tests/test_reuse_distributed.py")
TESTS_NOT_EXPORTED = ("not exported: the overlay's tests build their runners through sglang.overlay (the "
                      "fork layer, which stays out of upstream); upstream-style tests are a later change")
UPSTREAM_REPO = "sgl-project/sglang"
# How each change reads in the PR title (joined with commas).
PR_TITLE_PARTS = {
    "distributed-reuse": "opt-in reuse of an existing distributed setup",
    "expert-location": "expert-location reset",
    "distributed-teardown": "self-PP group teardown",
    "opt-model": "native OPT fixes",
}
# What an exported file may not contain: a reference to the fork package.
FORK_REFERENCE = re.compile(r"\bsglang\.overlay\b|\bfrom\s+sglang\s+import\s+[^\n]*\boverlay\b")


def is_fork_layer(rel: str) -> bool:
    return rel.startswith(FORK_LAYER)


def exported_files(paths: Iterable[str]) -> list[str]:
    """The repository paths that belong to the upstream layer: python/sglang/ minus the fork layer."""
    return sorted(p for p in paths if p.startswith(PACKAGE_PREFIX) and not is_fork_layer(p))


def fork_layer_leaks(changes: Iterable[tuple[str, str]]) -> list[str]:
    """(path, added text) pairs of the branch -> what ships fork-layer code (empty when nothing)."""
    problems = []
    for path, added in changes:
        if "sglang/overlay/" in f"/{path}" or is_fork_layer(path):
            problems.append(f"{path}: a fork-layer file")
        elif FORK_REFERENCE.search(added):
            line = next(ln for ln in added.splitlines() if FORK_REFERENCE.search(ln))
            problems.append(f"{path}: refers to the fork layer: {line.strip()}")
    return problems
