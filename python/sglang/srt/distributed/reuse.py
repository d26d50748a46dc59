"""Opt-in reuse of an existing torch.distributed world and model-parallel groups.

SGLang builds torch.distributed and its model-parallel groups once per process,
so building a second ``ModelRunner`` in the same process (for instance
``sglang.benchmark.one_batch.load_model`` called twice) fails with an assertion.
With ``SGLANG_ALLOW_REUSE_DISTRIBUTED`` true, what exists is checked against
what is requested and reused:

* ``init_distributed_environment`` compares the requested world with the
  existing default process group (world size, rank, backend) and, where this
  module saw the call that built it, with every other argument of that call;
* ``initialize_model_parallel`` compares every argument that shapes the groups
  with those of the call that built them, and returns without building.

A difference raises ``ValueError`` naming each differing argument with both
values. Every call that builds records its arguments, with reuse on or off, so
that a later call with reuse on can be compared. With reuse off nothing else
changes.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, Optional

import torch
import torch.distributed

# overlay-only: begin
# The overlay applies this file to every SGLang release from 0.4.9 on. Releases
# before 0.5.3 have no srt/environ.py, and the variants of 0.4.9 - 0.5.3.post1
# declare no SGLANG_ALLOW_REUSE_DISTRIBUTED there; allow_reuse() is the
# in-process switch of this repository's runner. export-pr ships the
# "upstream" lines of each such block instead (scripts/overlay_tool/export_reuse.py).
import contextlib
import os
from typing import Iterator

try:
    from sglang.srt.environ import envs
except ImportError:  # releases before 0.5.3
    envs = None

_ALLOWED_BLOCKS = 0


@contextlib.contextmanager
def allow_reuse() -> Iterator[None]:
    """Allow reuse within this block, as SGLANG_ALLOW_REUSE_DISTRIBUTED=1 does,
    without touching the environment."""
    global _ALLOWED_BLOCKS
    _ALLOWED_BLOCKS += 1
    try:
        yield
    finally:
        _ALLOWED_BLOCKS -= 1


def _env_enabled() -> bool:
    if envs is not None and hasattr(type(envs), "SGLANG_ALLOW_REUSE_DISTRIBUTED"):
        return envs.SGLANG_ALLOW_REUSE_DISTRIBUTED.get()
    return os.environ.get("SGLANG_ALLOW_REUSE_DISTRIBUTED", "false").lower() in (
        "true",
        "1",
        "yes",
        "y",
    )


def reuse_distributed_enabled() -> bool:
    """Whether reuse is on: inside ``allow_reuse()``, or the variable is true."""
    return _ALLOWED_BLOCKS > 0 or _env_enabled()


def _enabled_by() -> str:
    if _ALLOWED_BLOCKS > 0:
        return "reuse is allowed (allow_reuse())"
    return "SGLANG_ALLOW_REUSE_DISTRIBUTED is true"


# overlay-only: upstream
# from sglang.srt.environ import envs
#
#
# def reuse_distributed_enabled() -> bool:
#     """Whether SGLANG_ALLOW_REUSE_DISTRIBUTED is true."""
#     return envs.SGLANG_ALLOW_REUSE_DISTRIBUTED.get()
#
#
# def _enabled_by() -> str:
#     return "SGLANG_ALLOW_REUSE_DISTRIBUTED is true"
#
# overlay-only: end

logger = logging.getLogger(__name__)

# The arguments of the init_distributed_environment() call that built the
# current default process group, and that group (a weak reference).
_WORLD_ARGS: Optional[Dict[str, Any]] = None
_WORLD_GROUP: Optional[weakref.ref] = None
# The arguments of the initialize_model_parallel() call that built the
# current groups (the last call that found no groups).
_GROUP_ARGS: Optional[Dict[str, Any]] = None
# The reuse messages logged in this process ("world", "model_parallel").
_LOGGED: set = set()

# init_distributed_environment() arguments that only a recorded call can be
# compared against, each with what it changes in the world it builds, and that
# effect for the defaults: a world built outside SGLang (your own
# init_process_group) is reused only with the defaults' effect.
_WORLD_EFFECTS = {
    "timeout": (lambda value: value, None),
    "moe_a2a_backend": (lambda value: value == "nixl", False),  # NIXL's TCP store
    "recovered_rank": (bool, False),
    "max_world_size": (lambda value: value, None),
}


def _mismatch_error(what: str, differing: Dict[str, tuple], undo: str) -> ValueError:
    details = "; ".join(
        f"{name}: existing {existing!r}, requested {requested!r}"
        for name, (existing, requested) in differing.items()
    )
    return ValueError(
        f"{_enabled_by()}, but the existing {what} was built with other arguments, "
        f"so it cannot be reused: {details}. Destroy it first ({undo}) or request "
        "what exists."
    )


def _log_once(key: str, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(msg, *args)


def _backend_matches(existing: str, requested: str) -> bool:
    """``requested`` names the backend of ``existing`` (e.g. "gloo" and
    "cpu:gloo,cuda:nccl")."""
    names = [existing.lower()] + [p.split(":")[-1] for p in existing.lower().split(",")]
    return requested.lower() in names


def check_reusable_world(**requested: Any) -> None:
    """Called first in ``init_distributed_environment`` with all its arguments.

    Records the arguments when no default process group exists (this call
    builds it). When one exists and reuse is on, raises ``ValueError`` unless
    it matches: world size, rank and backend are read from torch.distributed,
    the local rank from the world group; the other arguments by what they
    change in the world (``moe_a2a_backend``: "nixl" or not) with the recorded
    call, or, for a world built outside SGLang, must change nothing. Negative
    world size, rank and local rank (upstream's "take it from the environment")
    and the rendezvous address (``distributed_init_method``) are not compared.
    """
    global _WORLD_ARGS, _WORLD_GROUP
    if not torch.distributed.is_initialized():
        _WORLD_ARGS, _WORLD_GROUP = dict(requested), None
        return
    group = torch.distributed.group.WORLD
    if _WORLD_ARGS is not None and _WORLD_GROUP is None:
        _WORLD_GROUP = weakref.ref(group)  # the recorded call built this group
    if not reuse_distributed_enabled():
        return
    recorded = (
        _WORLD_ARGS if _WORLD_GROUP is not None and _WORLD_GROUP() is group else None
    )

    from sglang.srt.distributed import parallel_state

    existing: Dict[str, Any] = {
        "world_size": torch.distributed.get_world_size(),
        "rank": torch.distributed.get_rank(),
    }
    world = getattr(parallel_state, "_WORLD", None)
    if world is not None:
        existing["local_rank"] = world.local_rank
    differing: Dict[str, tuple] = {}
    for name, value in requested.items():
        if name == "distributed_init_method" or value is None and name == "backend":
            continue
        if (
            name in ("world_size", "rank", "local_rank")
            and value is not None
            and value < 0
        ):
            continue
        if name == "backend":
            current = str(torch.distributed.get_backend())
            if not _backend_matches(current, str(value)):
                differing[name] = (current, value)
        elif name in existing:
            if existing[name] != value:
                differing[name] = (existing[name], value)
        elif name in _WORLD_EFFECTS:
            effect, neutral = _WORLD_EFFECTS[name]
            if recorded is None:
                if effect(value) != neutral:
                    differing[name] = ("unknown (not built by SGLang)", value)
            elif name in recorded and effect(recorded[name]) != effect(value):
                differing[name] = (recorded[name], value)
    if differing:
        raise _mismatch_error(
            "torch.distributed world",
            differing,
            "destroy_model_parallel() and destroy_distributed_environment()",
        )
    _log_once(
        "world",
        "Reusing the existing torch.distributed world (world_size=%d, rank=%d) "
        "because %s.",
        existing["world_size"],
        existing["rank"],
        _enabled_by(),
    )


def reuse_model_parallel_if_allowed(**requested: Any) -> bool:
    """Called first in ``initialize_model_parallel`` with every argument that
    shapes the groups; True means "keep the existing groups, build nothing".

    With no groups (this call builds them) records the arguments and returns
    False. With groups and reuse off returns False (upstream asserts). With
    reuse on compares the arguments with those of the call that built the
    groups: equal returns True, different raises ``ValueError`` naming each one.
    ``backend=None`` stands for the world's backend, as upstream resolves it.
    """
    global _GROUP_ARGS
    from sglang.srt.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        _GROUP_ARGS = dict(requested)
        return False
    if not reuse_distributed_enabled():
        return False
    if _GROUP_ARGS is None:
        raise ValueError(
            f"{_enabled_by()}, but the existing model-parallel groups were not built "
            "by initialize_model_parallel() after this process imported "
            f"{__name__}, so the requested arguments cannot be compared with them. "
            "Destroy them first (destroy_model_parallel())."
        )
    differing = {
        name: (_resolved(name, _GROUP_ARGS.get(name)), _resolved(name, value))
        for name, value in requested.items()
        if _resolved(name, _GROUP_ARGS.get(name)) != _resolved(name, value)
    }
    if differing:
        raise _mismatch_error(
            "model-parallel layout", differing, "destroy_model_parallel()"
        )
    _log_once(
        "model_parallel",
        "Reusing the existing model-parallel groups because %s.",
        _enabled_by(),
    )
    return True


def _resolved(name: str, value: Any) -> Any:
    if name == "backend" and value is None:
        return str(torch.distributed.get_backend())
    return value
