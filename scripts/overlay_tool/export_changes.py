"""What ``export-pr`` ships: one upstream branch per change, each reviewable alone.

The repository has three layers; only the upstream layer is exported, as changes to upstream's
code at the base tag:

- ``distributed-reuse``: ``srt/distributed/reuse.py`` + the reuse and expert-location hook patches
  of the release's variant;
- ``opt-fixes``: upstream's own ``srt/models/opt.py`` at the tag with the fixes of
  export_opt_fixes (not this repository's opt.py, whose speed work and release compat stay here);
- ``self-pp-teardown``: the variant's patch that destroys the self-PP group, where it has one.

Each branch also adds its upstream-style unit tests, kept in ``upstream/test/registered/unit/``
(a mirror of upstream's ``test/registered/unit/``; never imported by this repository's tests).
The fork layer (``python/sglang/overlay/``), ``opt_compat.py`` and ``add_layernorm.py`` never ship.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .errors import OverlayError
from .releases import PACKAGE_PREFIX

UPSTREAM_REPO = "sgl-project/sglang"
# Where the upstream-style tests live in this repository (their upstream path is the rest).
TESTS_DIR = "upstream"


@dataclass(frozen=True)
class Change:
    """One upstream branch: files copied from this repository, hook patches, tests, PR text."""

    key: str  # the branch is <prefix>/<key>
    title: str
    motivation: str
    modifications: str
    files: tuple[str, ...] = ()  # repository paths copied as they are (upstream paths)
    patch_words: tuple[str, ...] = ()  # a variant patch whose subject has one of these words belongs here
    opt_fixes: bool = False  # generate upstream's opt.py with export_opt_fixes
    tests: tuple[str, ...] = ()  # upstream paths of the tests; their sources are under TESTS_DIR/


CHANGES: tuple[Change, ...] = (
    Change(
        "distributed-reuse",
        "[Distributed] Opt-in reuse of an existing torch.distributed / model-parallel setup",
        "SGLang builds torch.distributed and its model-parallel groups once per process, so a second\n"
        "`ModelRunner` in the same process fails (`AssertionError: tensor model parallel group is\n"
        "already initialized`). Test suites, notebooks, RL frameworks that rebuild a runner and tools\n"
        "that load a draft and a target model in one process need more than one.",
        "- New `python/sglang/srt/distributed/reuse.py`: with `SGLANG_ALLOW_REUSE_DISTRIBUTED` true (the\n"
        "  spellings of `get_bool_env_var`) or inside `with allow_reuse():`, an existing setup is\n"
        "  checked against the requested one and reused; a mismatch raises `ValueError` naming the\n"
        "  existing and the requested values.\n"
        "- `init_distributed_environment()` checks an initialized default process group (world size,\n"
        "  rank, backend) before reusing it; `initialize_model_parallel()` returns early when the\n"
        "  existing group widths (TP, PP, MoE EP/DP, attention DP/CP, DCP) equal the requested ones.\n"
        "- `set_global_expert_location_metadata()` lets a later runner replace the metadata when reuse\n"
        "  is enabled.\n"
        "- Unset or false, every code path, exception type and message is unchanged.",
        files=("python/sglang/srt/distributed/reuse.py",),
        patch_words=("reuse", "expert", "eplb"),
        tests=("test/registered/unit/distributed/test_reuse.py",),
    ),
    Change(
        "opt-fixes",
        "[Model] OPT: fix weight loading, embedding accessors and layer prefixes",
        "`python/sglang/srt/models/opt.py` has defects that make it fail or load a wrong model\n"
        "silently; they are listed under Modifications. The fixes are a minimal diff of the file;\n"
        "everything else in it is unchanged.",
        "",  # filled in from export_opt_fixes.FIXES
        opt_fixes=True,
        tests=("test/registered/unit/models/test_opt.py",),
    ),
    Change(
        "self-pp-teardown",
        "[Distributed] Destroy the self-PP group in destroy_model_parallel()",
        "`destroy_model_parallel()` destroys every model-parallel group but `_SELF_PP`, which\n"
        "`initialize_model_parallel()` builds. After a destroy the group keeps its process group (and so\n"
        "the store and its port) alive, and a later `initialize_model_parallel()` in the same process\n"
        "sees a group of the destroyed world.",
        "- `destroy_model_parallel()` destroys `_SELF_PP` and resets it to `None`, like the other groups.",
        patch_words=("self-pp",),
        tests=("test/registered/unit/distributed/test_destroy_model_parallel.py",),
    ),
)

# The exported tests build model-parallel groups in one helper, ``_initialize_model_parallel``, and
# import ``CustomTestCase`` in one line; both are written for upstream's sizes-as-arguments API. A
# variant whose upstream builds the groups another way gets these edits (text -> that era's text).
# self-pp (0.5.19, 0.5.20): the sizes are arguments, but layers read the TP width from the published
# config (get_parallel().tp_size): publish a test config first with the runtime context's
# override_server_args ("a temporary dummy config for tests").
# runtime-context (0.5.21+): initialize_model_parallel() reads the published widths; upstream's own
# tests publish them with sglang.test.test_utils.publish_build_topology (test/layer_ut_utils.py).
TEST_API_EDITS: dict[str, tuple[tuple[str, str], ...]] = {
    "self-pp": (
        (
            "from sglang.test.test_utils import CustomTestCase\n",
            "from sglang.srt.runtime_context import get_context\nfrom sglang.test.test_utils import CustomTestCase\n",
        ),
        (
            "    parallel_state.initialize_model_parallel(\n",
            "    get_context().override_server_args(tp_size=tp_size, pp_size=pp_size).install()\n"
            "    parallel_state.initialize_model_parallel(\n",
        ),
    ),
    "runtime-context": (
        (
            "from sglang.test.test_utils import CustomTestCase\n",
            "from sglang.test.test_utils import CustomTestCase, publish_build_topology\n",
        ),
        (
            "    parallel_state.initialize_model_parallel(\n"
            "        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size\n"
            "    )\n",
            "    publish_build_topology(tp_size=tp_size, pp_size=pp_size)\n"
            "    parallel_state.initialize_model_parallel()\n",
        ),
    ),
}


def exported_test_text(text: str, variant: str, name: str = "test") -> str:
    """An exported test's text as it ships onto a release of ``variant`` (see TEST_API_EDITS)."""
    for old, new in TEST_API_EDITS.get(variant, ()):
        if text.count(old) != 1:
            raise OverlayError(
                f"{name}: expected exactly one {old.strip().splitlines()[0]!r} to rewrite for the "
                f"{variant} API; keep the group setup in _initialize_model_parallel "
                "(export_changes.TEST_API_EDITS)"
            )
        text = text.replace(old, new)
    return text


# Never exported: the fork package, and upstream-layer files that only serve this repository
# (release compat for one opt.py across releases; the fused op of the speed work).
FORK_LAYER = ("python/sglang/overlay/",)
NOT_EXPORTED = (
    "python/sglang/srt/models/opt_compat.py",
    "python/sglang/srt/layers/add_layernorm.py",
    "python/sglang/srt/models/opt.py",
)
# What an exported file may not contain: a reference to the fork package or this repository.
FORK_REFERENCE = re.compile(
    r"\bsglang\.overlay\b|\bfrom\s+sglang\s+import\s+[^\n]*\boverlay\b|sglang-overlay|"
    r"SGLANG_OVERLAY|\bMeZO\b"
)


def is_fork_layer(rel: str) -> bool:
    return rel.startswith(FORK_LAYER)


def exported_files(paths: Iterable[str]) -> list[str]:
    """The repository paths that belong to the upstream layer: python/sglang/ minus the fork layer."""
    return sorted(p for p in paths if p.startswith(PACKAGE_PREFIX) and not is_fork_layer(p))


def owner_of(rel: str) -> str:
    """The change that exports repository file ``rel`` ("" when none, e.g. NOT_EXPORTED files)."""
    return next((c.key for c in CHANGES if rel in c.files), "")


def fork_layer_leaks(changes: Iterable[tuple[str, str]]) -> list[str]:
    """(path, added text) pairs of a branch -> what ships fork-layer code (empty when nothing)."""
    problems = []
    for path, added in changes:
        if "sglang/overlay/" in f"/{path}" or is_fork_layer(path):
            problems.append(f"{path}: a fork-layer file")
        elif FORK_REFERENCE.search(added):
            line = next(ln for ln in added.splitlines() if FORK_REFERENCE.search(ln))
            problems.append(f"{path}: refers to this repository: {line.strip()}")
    return problems
