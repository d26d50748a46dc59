"""What ``export-pr`` ships: one upstream branch per change, each reviewable alone.

The repository has three layers; only the upstream layer is exported, as changes to upstream's
code at the base tag, specialised to it:

- ``distributed-reuse``: ``srt/distributed/reuse.py`` without its overlay-only blocks (export_reuse)
  + the reuse and expert-location hook patches of the release's variant (which declare the variable
  in ``srt/environ.py``) + the variable's row in the environment-variables docs page;
- ``opt-fixes``: upstream's own ``srt/models/opt.py`` at the tag with the defect fixes of
  export_opt_fixes.FIXES (not this repository's opt.py, whose speed work and release compat stay here);
- ``opt-strict-loading``: strict weight loading (export_opt_fixes.STRICT), stacked on ``opt-fixes``;
- ``gemma-gelu``: the variant's patch that gives Gemma's MLP the tanh GELU (HF's and the reference's);
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
    modifications: str  # "" for the OPT changes: their Fix list says what changes
    accuracy: str  # the Accuracy Tests section: what was (not) measured and why
    speed: str  # the Speed Tests and Profiling section
    files: tuple[str, ...] = ()  # repository paths shipped (reuse.py: specialised, export_reuse)
    patch_words: tuple[str, ...] = ()  # a variant patch whose subject has one of these words belongs here
    opt: str = ""  # "fixes" / "strict": generate upstream's opt.py with that export_opt_fixes list
    depends_on: str = ""  # the change whose branch this one is built on (a stacked PR)
    env_docs: bool = False  # add the variable's row to the environment-variables page
    tests: tuple[str, ...] = ()  # upstream paths of the tests; their sources are under TESTS_DIR/


REUSE_MOTIVATION = """\
SGLang builds torch.distributed and its model-parallel groups once per process. A process that builds
a second `ModelRunner` in-process fails: `sglang.benchmark.one_batch.load_model()` called twice (two
models, or the same model rebuilt with other server args) raises `AssertionError: tensor model parallel
group is already initialized` from `initialize_model_parallel()`. That is the flow of test suites that
build a runner per test class, notebooks, and research code that drives `ModelRunner` directly, e.g.
zeroth-order fine-tuning loops that score with several runners in one process. (A draft and a target
model in one process already work: the draft worker passes `is_draft_worker` and skips the
initialization; this PR is for runners that are not a draft of another.)

This PR lets such a process opt in to reusing what exists when it is what the new runner asks for, and
fail with a message naming every difference when it is not.

**Alternatives considered.**
- *Extending `ensure_model_parallel_initialized()`*, which already "initializes or checks sizes": it
  compares only TP, PP and DCP sizes, with `assert`, and nothing calls it on the runner's path
  (`bootstrap` calls `init_distributed_environment()` and `initialize_model_parallel()` directly).
  Making it the runner's entry would change what every launch path does by default; the opt-in here
  leaves the default path as it is. Its checks could later be rebased on the argument comparison of
  `reuse.py`, which covers every argument (`duplicate_tp_group`, `enable_symm_mem`, `rank_offset`,
  `max_world_size`, ...), not only the sizes.
- *An out-of-tree plugin* (`sglang.srt.plugins`, `HookRegistry` AROUND hooks on the two functions and
  the expert-location setter) needs no upstream change, but: general plugins are loaded by
  `Engine` / `launch_server` (`load_plugins()`), not in a process that builds a `ModelRunner` itself,
  which is exactly this flow; the check must know which arguments shape the groups and how a width is
  published, which changes between releases (sizes as arguments up to 0.5.20, the published topology
  since), so it belongs next to the code it checks, where upstream's own tests keep it in step; and a
  plugin would wrap `initialize_model_parallel()` by name, which a refactor silently unhooks.
  So this is an opt-in in the tree, declared the way upstream declares its variables (`EnvBool` in
  `srt/environ.py`, read with `envs.X.get()`, set in code with `envs.X.override(True)`)."""

REUSE_MODIFICATIONS = """\
- `srt/environ.py`: `SGLANG_ALLOW_REUSE_DISTRIBUTED = EnvBool(False)`; a row in the
  environment-variables page.
- New `srt/distributed/reuse.py`:
  - every call of `init_distributed_environment()` / `initialize_model_parallel()` that builds records
    its arguments (also with the variable off, so that a later call with it on can be compared);
  - with the variable true, a later `init_distributed_environment()` checks world size, rank and backend
    against the existing default process group, the local rank against the world group and the other
    arguments against the recorded call (for a world made outside SGLang, e.g. your own
    `init_process_group`, they must keep their defaults); `initialize_model_parallel()` compares every
    argument that shapes the groups with the call that built them and returns without building when
    they are equal;
  - a difference raises `ValueError` naming each differing argument with the existing and the
    requested value, and what to do (destroy first, or request what exists).
- `init_distributed_environment()` / `initialize_model_parallel()` pass their arguments to it first
  (`**locals()`: every argument, including ones added later).
- `set_global_expert_location_metadata()` lets a later runner replace the metadata when the variable
  is true (it asserted that none was set).
- With the variable unset or false, the only new work is recording the arguments; every code path,
  exception type and message is unchanged."""

CHANGES: tuple[Change, ...] = (
    Change(
        "distributed-reuse",
        "[Distributed] SGLANG_ALLOW_REUSE_DISTRIBUTED: reuse a matching torch.distributed world and model-parallel groups",
        REUSE_MOTIVATION,
        REUSE_MODIFICATIONS,
        accuracy="Not applicable: no model computation changes (the runners reuse process groups only; "
        "each keeps its own weights and KV pool).",
        speed="Not measured. With the variable unset the added work is one dict of the arguments per "
        "`init_distributed_environment()` / `initialize_model_parallel()` call, i.e. once per process.",
        files=("python/sglang/srt/distributed/reuse.py",),
        patch_words=("reuse", "expert", "eplb"),
        env_docs=True,
        tests=("test/registered/unit/distributed/test_reuse.py",),
    ),
    Change(
        "opt-fixes",
        "[Model] OPT: fix pipeline-parallel loading, embedding accessors, layer prefixes and unknown activations",
        "`python/sglang/srt/models/opt.py` has defects that fail at runtime (`AttributeError`, "
        "`KeyError`, `UnboundLocalError`)\nor build a wrong model silently (an unknown activation becomes "
        "the identity); they are listed\nunder Modifications. The fixes are a minimal diff of the file; "
        "everything else in it is unchanged.\nStrict weight loading is a separate PR on top of this one.",
        "",
        accuracy="No accuracy benchmark was run. For an unquantized single-rank model whose activation is "
        "supported, the loaded weights and the forward pass are unchanged; the tests compare the weights a "
        "pipeline rank loads with HF's `OPTForCausalLM` tensor by tensor.",
        speed="Not measured: the forward pass is unchanged.",
        opt="fixes",
        tests=("test/registered/unit/models/test_opt.py",),
    ),
    Change(
        "opt-strict-loading",
        "[Model] OPT: strict weight loading (unexpected and missing checkpoint tensors raise)",
        "`OPTForCausalLM.load_weights()` skips a checkpoint tensor it has no parameter for and never "
        "notices a\nparameter the checkpoint lacks, so a misnamed or truncated checkpoint loads as a "
        "partly random model\nwithout a word. This PR makes both errors, while keeping the flows that "
        "load a subset on purpose:\nweight updates (`update_weights_from_tensor`, the weight sync of RL "
        'trainers), `load_format="dummy"`\nfollowed by updates, quantization methods that create '
        "parameters no checkpoint has (online fp8 KV-cache\nscales, `_skip_weight_check`), and pipeline "
        "ranks (only this rank's layers).\n\nStacked on the OPT fixes PR (it uses the `start_layer` / "
        "`end_layer` fixed there); review that one first.",
        "",
        accuracy="No accuracy benchmark was run: a checkpoint that loads today loads the same weights; "
        "one that lacks or misnames tensors now raises instead of leaving parameters at their initial "
        "values.",
        speed="Not measured. The first `load_weights()` call also collects the loaded names and walks "
        "`named_parameters()` once; later calls only collect the names.",
        opt="strict",
        depends_on="opt-fixes",
        tests=("test/registered/unit/models/test_opt_strict_loading.py",),
    ),
    Change(
        "gemma-gelu",
        "[Model] Gemma: the MLP's GELU is the tanh approximation, as in HF and the reference",
        '`GemmaMLP` builds `GeluAndMul("none")`, the exact GELU. Gemma is defined with the tanh '
        "approximation:\nHF's `GemmaMLP` uses `gelu_pytorch_tanh` (its `GemmaConfig` maps even the legacy "
        '`hidden_act="gelu"` of the\nofficial checkpoints to it, as "meant to target the tanh approximation"), '
        "and so do vLLM's Gemma and\nGoogle's reference implementation. On a random tiny Gemma in fp32 the "
        "logits differ from HF's by\n3.6e-5 relative; with the tanh GELU they agree within 3e-7.",
        '- `GemmaMLP`: `GeluAndMul("tanh")` instead of `GeluAndMul("none")`.',
        accuracy="No accuracy benchmark was run. The model now computes the activation Gemma was trained "
        "with; the test compares the MLP with HF's on the same weights.",
        speed="Not measured: the same kernel family (`gelu_tanh_and_mul` instead of `gelu_and_mul`).",
        patch_words=("gemma",),
        tests=("test/registered/unit/models/test_gemma.py",),
    ),
    Change(
        "self-pp-teardown",
        "[Distributed] Destroy the self-PP group in destroy_model_parallel()",
        "`destroy_model_parallel()` destroys every model-parallel group but `_SELF_PP`, which\n"
        "`initialize_model_parallel()` builds. After a destroy the group keeps its process group (and so\n"
        "the store and its port) alive, and a later `initialize_model_parallel()` in the same process\n"
        "sees a group of the destroyed world.",
        "- `destroy_model_parallel()` destroys `_SELF_PP` and resets it to `None`, like the other groups.",
        accuracy="Not applicable: teardown only.",
        speed="Not measured: teardown only.",
        patch_words=("self-pp",),
        tests=("test/registered/unit/distributed/test_destroy_model_parallel.py",),
    ),
)

# The exported tests build model-parallel groups in one helper, ``_initialize_model_parallel``, import
# ``CustomTestCase`` in one line and (test_reuse.py) build ModelRunners in ``_load_model``; all are
# written for upstream's API up to 0.5.18 (sizes as arguments, ``load_model`` as the benchmark calls it).
# A variant whose upstream does it another way gets these edits: (text, that era's text, the test files
# it applies to; every exported test when empty).
# attn-dp (0.5.9 - 0.5.14): the one-batch benchmark is sglang/bench_one_batch.py.
# self-pp (0.5.19, 0.5.20): the sizes are arguments, but layers read the TP width from the published
# config (get_parallel().tp_size): publish a test config first with the runtime context's
# override_server_args ("a temporary dummy config for tests"); the benchmark's entry publishes its
# ServerArgs before load_model().
# runtime-context (0.5.21+): initialize_model_parallel() reads the published widths; upstream's own
# tests publish them with sglang.test.test_utils.publish_build_topology (test/layer_ut_utils.py); the
# benchmark's entry publishes its ServerArgs with this process's ranks before load_model().
_HELPER_CALL = (
    "    parallel_state.initialize_model_parallel(\n"
    "        tensor_model_parallel_size=tp_size,\n"
    "        pipeline_model_parallel_size=pp_size,\n"
    "        **kwargs,\n"
    "    )\n"
)
_CUSTOM = "from sglang.test.test_utils import CustomTestCase\n"
_PORT_ARGS = "    port_args = PortArgs.init_new(server_args)\n"
_SERVER_ARGS_IMPORT = "from sglang.srt.server_args import PortArgs, ServerArgs\n"
_LOAD_MODEL_IMPORT = "from sglang.benchmark.one_batch import load_model\n"
TEST_API_EDITS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    # up to 0.5.14 the one-batch benchmark is the module sglang/bench_one_batch.py
    "attn-dp": ((_LOAD_MODEL_IMPORT, "from sglang.bench_one_batch import load_model\n", ("test_reuse.py",)),),
    "self-pp": (
        (_CUSTOM, "from sglang.srt.runtime_context import get_context\n" + _CUSTOM, ()),
        (
            _HELPER_CALL,
            "    get_context().override_server_args(tp_size=tp_size, pp_size=pp_size).install()\n" + _HELPER_CALL,
            (),
        ),
        (
            _SERVER_ARGS_IMPORT,
            "from sglang.srt.runtime_context import publish\n" + _SERVER_ARGS_IMPORT,
            ("test_reuse.py",),
        ),
        (_PORT_ARGS, '    publish(server_args, role="scheduler")\n' + _PORT_ARGS, ("test_reuse.py",)),
    ),
    "runtime-context": (
        (_CUSTOM, "from sglang.test.test_utils import CustomTestCase, publish_build_topology\n", ()),
        (
            _HELPER_CALL,
            "    publish_build_topology(world_rank=rank, tp_size=tp_size, pp_size=pp_size)\n"
            "    parallel_state.initialize_model_parallel(**kwargs)\n",
            (),
        ),
        (
            _SERVER_ARGS_IMPORT,
            "from sglang.srt.runtime_context import SpawnRanks, publish\n" + _SERVER_ARGS_IMPORT,
            ("test_reuse.py",),
        ),
        (
            _PORT_ARGS,
            '    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))\n' + _PORT_ARGS,
            ("test_reuse.py",),
        ),
    ),
}


def exported_test_text(text: str, variant: str, name: str = "test") -> str:
    """An exported test's text as it ships onto a release of ``variant`` (see TEST_API_EDITS)."""
    basename = name.rsplit("/", 1)[-1]
    for old, new, files in TEST_API_EDITS.get(variant, ()):
        if files and basename not in files:
            continue
        if text.count(old) != 1:
            raise OverlayError(
                f"{name}: expected exactly one {old.strip().splitlines()[0]!r} to rewrite for the "
                f"{variant} API; keep the group setup in _initialize_model_parallel and the runner "
                "setup in _load_model (export_changes.TEST_API_EDITS)"
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
