"""Opt-in reuse of an already initialized distributed setup.

By default SGLang builds torch.distributed and its model-parallel groups once
per process: building a second ModelRunner (or calling
``initialize_model_parallel`` again) fails with an assertion. Setting
``SGLANG_ALLOW_REUSE_DISTRIBUTED=1`` lets the process keep what exists when it
matches what is requested:

* ``init_distributed_environment`` checks an existing default process group
  against the requested world size, rank and backend, and reuses it;
* ``initialize_model_parallel`` checks the existing groups' widths (TP, PP,
  MoE EP/DP, attention DP/CP, DCP, shared-expert TP where the release has it)
  against the requested ones, and returns without building anything;
* the bootstrap's once-per-process guard and the expert-location metadata
  guard let a later runner through.

A mismatch raises ``ValueError`` naming the existing and the requested values.
With the variable unset or false nothing here changes upstream behaviour.
In-process callers that build a ModelRunner can ask for the same without
touching the environment: ``with allow_reuse(): ModelRunner(...)``.

This module has no import-time dependency on ``parallel_state`` so that
``parallel_state`` can import it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, List, Optional, Set

import torch
import torch.distributed

try:
    from sglang.srt.utils.common import get_bool_env_var
except ImportError:  # releases up to 0.5.2: sglang/srt/utils.py is a module
    from sglang.srt.utils import get_bool_env_var

logger = logging.getLogger(__name__)

REUSE_DISTRIBUTED_ENV = "SGLANG_ALLOW_REUSE_DISTRIBUTED"

# Which reuse messages this process has logged already ("world", "model_parallel").
_LOGGED: Set[str] = set()
# How many allow_reuse() blocks are open.
_ALLOWED_BLOCKS = 0


def reuse_distributed_enabled() -> bool:
    """Whether reuse is allowed: inside ``allow_reuse()``, or
    ``SGLANG_ALLOW_REUSE_DISTRIBUTED`` is true (get_bool_env_var spellings)."""
    return _ALLOWED_BLOCKS > 0 or get_bool_env_var(REUSE_DISTRIBUTED_ENV)


@contextlib.contextmanager
def allow_reuse() -> Iterator[None]:
    """Allow reuse within this block, as SGLANG_ALLOW_REUSE_DISTRIBUTED=1 does."""
    global _ALLOWED_BLOCKS
    _ALLOWED_BLOCKS += 1
    try:
        yield
    finally:
        _ALLOWED_BLOCKS -= 1


def _log_once(key: str, msg: str, *args) -> None:
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.info(msg, *args)


def _format(values: Dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _mismatch_error(
    what: str, existing: Dict[str, object], requested: Dict[str, object]
) -> ValueError:
    differing = [k for k in requested if existing.get(k) != requested[k]]
    details = "; ".join(
        f"{k}: existing {existing.get(k)!r}, requested {requested[k]!r}"
        for k in differing
    )
    return ValueError(
        f"{REUSE_DISTRIBUTED_ENV} is set, but the requested {what} differs from the "
        f"existing one, which cannot be reused: {details}. Existing: {_format(existing)}. "
        f"Requested: {_format(requested)}. Destroy it first (destroy_model_parallel() "
        f"and destroy_distributed_environment()) or request the existing layout."
    )


def _backend_names(backend: str) -> List[str]:
    """``"cpu:gloo,cuda:nccl"`` -> ``["cpu:gloo,cuda:nccl", "gloo", "nccl"]``."""
    backend = str(backend).lower()
    return [backend] + [part.split(":")[-1] for part in backend.split(",")]


def check_reusable_world(*, world_size: int, rank: int, backend: Optional[str]) -> None:
    """Validate an existing default process group before it is reused.

    A no-op unless reuse is enabled and torch.distributed is initialized.
    Negative ``world_size``/``rank`` (taken from the environment by torch) are not
    compared. Raises ``ValueError`` on a mismatch; on a match the caller goes on
    with the existing group, as upstream does.
    """
    if not reuse_distributed_enabled() or not torch.distributed.is_initialized():
        return
    existing_backend = str(torch.distributed.get_backend())
    existing = dict(
        world_size=torch.distributed.get_world_size(),
        rank=torch.distributed.get_rank(),
        backend=existing_backend,
    )
    requested: Dict[str, object] = {}
    if world_size is not None and world_size >= 0:
        requested["world_size"] = world_size
    if rank is not None and rank >= 0:
        requested["rank"] = rank
    if backend is not None:
        requested["backend"] = str(backend)
    mismatched = {
        k: v for k, v in requested.items() if k != "backend" and existing[k] != v
    }
    if "backend" in requested and str(
        requested["backend"]
    ).lower() not in _backend_names(existing_backend):
        mismatched["backend"] = requested["backend"]
    if mismatched:
        raise _mismatch_error("torch.distributed world", existing, requested)
    _log_once(
        "world",
        "Reusing the existing torch.distributed process group (%s) because %s is set.",
        _format(existing),
        REUSE_DISTRIBUTED_ENV,
    )


def existing_model_parallel_widths() -> Optional[Dict[str, int]]:
    """Widths of the model-parallel groups that exist in this process, or None.

    Derived from the GroupCoordinators the same way ``initialize_model_parallel``
    builds them (attn_tp = tp // attn_cp // attn_dp, moe_tp = tp // ep // moe_dp).
    Groups a release does not have are left out.
    """
    from sglang.srt.distributed import parallel_state as ps

    if getattr(ps, "_TP", None) is None or getattr(ps, "_PP", None) is None:
        return None

    def width(name: str, default: int = 1) -> int:
        group = getattr(ps, name, None)
        return group.world_size if group is not None else default

    tp = width("_TP")
    attn_cp = width("_ATTN_CP")
    attn_tp = width("_ATTN_TP", tp)
    ep = width("_MOE_EP")
    moe_tp = width("_MOE_TP", tp)
    widths = dict(
        tp=tp,
        pp=width("_PP"),
        ep=ep,
        attn_dp=tp // max(attn_cp * attn_tp, 1),
        attn_cp=attn_cp,
        moe_dp=tp // max(ep * moe_tp, 1),
        dcp=width("_DCP"),
    )
    if hasattr(ps, "_SHARED_EXPERTS_TP"):
        widths["shared_experts_tp"] = width("_SHARED_EXPERTS_TP")
    return widths


def _restamp_groups() -> None:
    """Publish the reused groups to the runtime context, as a fresh build does.

    Releases whose ``initialize_model_parallel`` stamps the groups into
    ``runtime_context.get_parallel()`` (0.5.21+) lose that stamp on
    ``clear_stamp``/``reset_context``; write it again. No-op on older releases.
    """
    from sglang.srt.distributed import parallel_state as ps

    try:
        from sglang.srt.runtime_context import get_parallel
    except ImportError:  # releases before 0.5.14 have no runtime context
        return
    parallel = get_parallel()
    if not hasattr(parallel, "override_permanently"):
        return
    built = {
        "tp_group": ps._TP,
        "pp_group": ps._PP,
        "moe_ep_group": getattr(ps, "_MOE_EP", None),
        "moe_dp_group": getattr(ps, "_MOE_DP", None),
        "moe_tp_group": getattr(ps, "_MOE_TP", None),
        "attn_tp_group": getattr(ps, "_ATTN_TP", None),
        "attn_cp_group": getattr(ps, "_ATTN_CP", None),
        "shared_experts_tp_group": getattr(ps, "_SHARED_EXPERTS_TP", None),
        "dcp_group": getattr(ps, "_DCP", None),
    }
    parallel.override_permanently(
        **{name: group for name, group in built.items() if group is not None}
    )


def reuse_model_parallel_if_allowed(
    *,
    tp: int,
    pp: int,
    ep: int = 1,
    attn_dp: int = 1,
    attn_cp: int = 1,
    moe_dp: int = 1,
    dcp: int = 1,
    shared_experts_tp: Optional[int] = None,
) -> bool:
    """Return True when ``initialize_model_parallel`` should keep the existing groups.

    False (build as upstream does) unless reuse is enabled, torch.distributed is
    initialized and the TP and PP groups exist. Raises ``ValueError`` when the
    existing widths differ from the requested ones.
    """
    if not reuse_distributed_enabled() or not torch.distributed.is_initialized():
        return False
    existing = existing_model_parallel_widths()
    if existing is None:
        return False
    requested = dict(
        tp=tp, pp=pp, ep=ep, attn_dp=attn_dp, attn_cp=attn_cp, moe_dp=moe_dp, dcp=dcp
    )
    if "shared_experts_tp" in existing:
        requested["shared_experts_tp"] = (
            shared_experts_tp if shared_experts_tp and shared_experts_tp > 1 else 1
        )
    if any(existing.get(k) != v for k, v in requested.items()):
        raise _mismatch_error("model-parallel layout", existing, requested)
    _restamp_groups()
    _log_once(
        "model_parallel",
        "Reusing the existing model-parallel groups (%s) because %s is set.",
        _format(existing),
        REUSE_DISTRIBUTED_ENV,
    )
    return True
