"""Scenarios for SGLANG_ALLOW_REUSE_DISTRIBUTED, one per process.

Distributed state (torch.distributed, SGLang's groups, the bootstrap guard) is
process-global, so tests/test_reuse_distributed.py runs each scenario in a fresh
interpreter:

    python -m tests.support.reuse_scenarios SCENARIO [ARGS...]

Each scenario prints one line ``RESULT <json>`` that the test parses. Run from
the repository root with the release's venv python and PYTHONPATH pointing at
the (patched) checkout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List

import torch

from tests.support.runtime import build_runner, destroy_distributed, extend, free_port, is_runtime_context_era

ENV = "SGLANG_ALLOW_REUSE_DISTRIBUTED"
SEQS = [[2, 5, 7, 9, 11, 13], [2, 100, 200, 300]]


def _result(**values: Any) -> None:
    print("RESULT " + json.dumps(values), flush=True)


@contextmanager
def _env(value: "str | None"):
    old = os.environ.get(ENV)
    if value is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def _error(fn) -> Dict[str, Any]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the scenario reports any error
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": None}


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _count_reuse_logs() -> _Counter:
    handler = _Counter()
    log = logging.getLogger("sglang.srt.distributed.reuse")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _init_method(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _publish_widths(model: Path, world_rank: int = 0, **widths: int) -> None:
    """runtime-context era: publish ServerArgs with these widths (what get_parallel() reads)."""
    from sglang.srt.runtime_context import SpawnRanks, publish
    from tests.support.runtime import server_args

    sa = server_args(model, **widths)
    sa.resolve_once()
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=world_rank, gpu_id=0))


# initialize_model_parallel() argument -> the ServerArgs fields that publish it (runtime-context era,
# where the widths are read from the published configuration instead of being arguments).
PUBLISHED_WIDTHS = {
    "tensor_model_parallel_size": lambda n: dict(tp_size=n),
    "pipeline_model_parallel_size": lambda n: dict(pp_size=n),
    "expert_model_parallel_size": lambda n: dict(ep_size=n),
    "attention_data_parallel_size": lambda n: dict(dp_size=n, enable_dp_attention=n > 1),
    "attention_context_model_parallel_size": lambda n: dict(attn_cp_size=n),
    "moe_data_model_parallel_size": lambda n: dict(moe_dp_size=n),
    "decode_context_parallel_size": lambda n: dict(dcp_size=n),
}
# Widths that split the TP group: at TP 1 upstream's own checks refuse them before the reuse check
# (runtime-context era: the published topology must satisfy tp = ep * moe_dp * moe_tp), so tp2() asks.
SHARDED_WIDTHS = (
    "expert_model_parallel_size",
    "attention_data_parallel_size",
    "attention_context_model_parallel_size",
    "moe_data_model_parallel_size",
)
# Widths the published configuration accepts only together with another one.
PUBLISHED_TOGETHER = {"moe_data_model_parallel_size": {"attention_context_model_parallel_size": 2}}
# What each mismatch case requests instead of what exists (every width 1, the defaults).
MISMATCHES = {
    "tensor_model_parallel_size": 2,
    "pipeline_model_parallel_size": 2,
    "expert_model_parallel_size": 2,
    "attention_data_parallel_size": 2,
    "attention_context_model_parallel_size": 2,
    "moe_data_model_parallel_size": 2,
    "decode_context_parallel_size": 2,
    "backend": "nccl",
    "duplicate_tp_group": True,
    "enable_symm_mem": True,
    "rank_offset": 1,
    "max_world_size": 4,
}


def _init_model_parallel(model: Path, tp: int = 1, pp: int = 1, world_rank: int = 0, **arguments: Any) -> None:
    """initialize_model_parallel with these widths (and arguments), the way each era takes them."""
    _request(model, world_rank, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **arguments)


def _request(model: Path, world_rank: int = 0, **requested: Any) -> None:
    """Call initialize_model_parallel with ``requested`` (its argument names); in the runtime-context era
    the widths are published first. A name the release does not take raises KeyError."""
    import inspect

    from sglang.srt.distributed import parallel_state as ps

    takes = set(inspect.signature(ps.initialize_model_parallel).parameters)
    if is_runtime_context_era():
        from sglang.srt.runtime_context import get_parallel

        fields: Dict[str, Any] = {}
        for name in [n for n in requested if n in PUBLISHED_WIDTHS]:
            fields.update(PUBLISHED_WIDTHS[name](requested.pop(name)))
        unknown = set(requested) - takes
        if unknown:
            raise KeyError(sorted(unknown))
        # Upstream publish() itself rejects widths that contradict the stamped
        # groups; drop the stamp so the request reaches initialize_model_parallel.
        get_parallel().clear_stamp()
        _publish_widths(model, world_rank=world_rank, **fields)
        get_parallel().override_permanently(world_group=ps._WORLD)  # as init_distributed_environment does
        ps.initialize_model_parallel(**requested)
    else:
        unknown = set(requested) - takes
        if unknown:
            raise KeyError(sorted(unknown))
        ps.initialize_model_parallel(**requested)


def _mismatches(model: Path, names, world_rank: int = 0, **existing: Any) -> Dict[str, Any]:
    """Each of ``names`` requested with the value of MISMATCHES, everything else as ``existing`` (what
    the groups were built with, where it is not the default): the error, or "absent" where the release
    has no such width or argument."""
    out: Dict[str, Any] = {}
    for name in names:
        # Runtime-context era: ServerArgs refuses moe_dp_size != attn_cp_size unless moe_dp_size is 1.
        also = dict(PUBLISHED_TOGETHER.get(name, {})) if is_runtime_context_era() else {}
        try:
            _request(model, world_rank, **{**existing, **also, name: MISMATCHES[name]})
        except KeyError:
            out[name] = "absent"
        except Exception as e:  # noqa: BLE001 - the scenario reports any error
            out[name] = {"type": type(e).__name__, "message": str(e), "also": sorted(also)}
        else:
            out[name] = {"type": None, "message": None, "also": sorted(also)}
    return out


def runners(model: Path, count: int) -> None:
    """Build ``count`` ModelRunners in one process; compare each one's logits with the first's."""
    logs = _count_reuse_logs()
    times, equal, reference = [], [], None
    for _ in range(count):
        tic = time.perf_counter()
        runner = build_runner(model)
        times.append(time.perf_counter() - tic)
        logits = extend(runner, SEQS).next_token_logits.clone()
        if reference is None:
            reference = logits
        else:
            equal.append(bool(torch.equal(reference, logits)))
    _result(times=times, equal=equal, reuse_logs=logs.messages)


def mismatch(model: Path) -> None:
    """Each requested value that differs from the existing setup raises ValueError."""
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.eplb import expert_location

    runner = build_runner(model)  # world_size=1, rank=0, gloo, all widths 1
    port = runner.dist_port

    def world(**kw):
        args = dict(world_size=1, rank=0, backend="gloo", local_rank=0, distributed_init_method=_init_method(port))
        args.update(kw)
        ps.init_distributed_environment(**args)

    out: Dict[str, Any] = {}
    with _env("1"):
        out["world_match"] = _error(world)
        out["world_size"] = _error(lambda: world(world_size=2))
        out["rank"] = _error(lambda: world(rank=1))
        out["backend"] = _error(lambda: world(backend="nccl"))
    with _env(None):
        out["unset_world_size"] = _error(lambda: world(world_size=2))  # upstream: silently reused

    class Meta:  # a stand-in; the setter only stores it
        pass

    with _env("0"):  # false spellings behave as unset
        out["unset_eplb"] = _error(
            lambda: [expert_location.set_global_expert_location_metadata(Meta()) for _ in range(2)]
        )
    with _env("1"):
        out["eplb"] = _error(lambda: [expert_location.set_global_expert_location_metadata(Meta()) for _ in range(2)])
    with _env("1"):  # reset it; every release's setter lets reuse overwrite
        expert_location.set_global_expert_location_metadata(None)

    with _env("1"):
        out["local_rank"] = _error(lambda: world(local_rank=1))
        # Widths a one-rank world can request (the others need two ranks: tp2()), and every argument.
        single = [n for n in MISMATCHES if n not in SHARDED_WIDTHS]
        out["groups"] = _mismatches(model, single)
        out["mp_match"] = _error(lambda: _init_model_parallel(model))
    with _env(None):
        out["unset_mp"] = _error(lambda: _init_model_parallel(model))
    _result(**out)


def upstream_second_runner(model: Path) -> None:
    """With the variable unset, the 2nd runner fails the way upstream does."""
    build_runner(model)
    era = "runtime-context" if is_runtime_context_era() else "bootstrap"
    _result(era=era, second=_error(lambda: build_runner(model)))


def _leftovers() -> Dict[str, Any]:
    import torch.distributed.distributed_c10d as c10d

    from sglang.srt.distributed import parallel_state as ps

    names = (
        "_WORLD",
        "_TP",
        "_PP",
        "_ATTN_TP",
        "_ATTN_CP",
        "_DCP",
        "_MOE_DP",
        "_MOE_EP",
        "_MOE_TP",
        "_SHARED_EXPERTS_TP",
        "_PDMUX_PREFILL_TP_GROUP",
        "_SELF_PP",
    )
    out: Dict[str, Any] = dict(
        initialized=torch.distributed.is_initialized(),
        sglang_groups=[n for n in names if getattr(ps, n, None) is not None],
        torch_groups=len(c10d._world.pg_map),
    )
    if is_runtime_context_era():
        from sglang.srt.distributed import bootstrap

        out["parallel_initialised"] = bootstrap._PARALLEL_INITIALISED
    return out


def destroy_recreate(model: Path) -> None:
    """Destroy everything, check it is gone and the port is free, then build (and reuse) again."""
    from sglang.srt.distributed import parallel_state as ps

    out: Dict[str, Any] = {}
    # 1. World and groups built directly (initialized twice: the 2nd reuses), on a port of ours.
    port = free_port()
    if is_runtime_context_era():
        _publish_widths(model)
    for _ in range(2):
        ps.init_distributed_environment(
            world_size=1, rank=0, backend="gloo", local_rank=0, distributed_init_method=_init_method(port)
        )
        ps.initialize_model_parallel()
    destroy_distributed()
    out["direct"] = dict(_leftovers(), port_free=_port_is_free(port))
    ps.init_distributed_environment(  # the same port again
        world_size=1, rank=0, backend="gloo", local_rank=0, distributed_init_method=_init_method(port)
    )
    out["direct"]["reinit_same_port"] = torch.distributed.is_initialized()
    destroy_distributed()

    # 2. ModelRunners: build, destroy, build two more (fresh, then reused).
    runner = build_runner(model)
    reference = extend(runner, SEQS).next_token_logits.clone()
    port = runner.dist_port
    del runner
    destroy_distributed()
    # Informational: the ModelRunner object outlives ``del`` (upstream reference
    # cycles), and the default group's TCPStore with it.
    out["runner"] = dict(_leftovers(), port_free=_port_is_free(port))
    out["equal"] = []
    for _ in range(2):
        runner = build_runner(model)
        out["equal"].append(bool(torch.equal(reference, extend(runner, SEQS).next_token_logits)))
    destroy_distributed()
    out["end"] = _leftovers()
    _result(**out)


def tp2(model: Path, rank: int, port: int) -> None:
    """One rank of a 2-process gloo world with tp_size=2; init twice (reuse), all-reduce, each width that
    splits the TP group requested otherwise (a ValueError naming it), destroy."""
    from sglang.srt.distributed import parallel_state as ps

    def init() -> None:
        ps.init_distributed_environment(
            world_size=2, rank=rank, backend="gloo", local_rank=rank, distributed_init_method=_init_method(port)
        )
        _request(model, rank, tensor_model_parallel_size=2)

    init()
    first_tp = ps.get_tp_group()
    init()  # the second time reuses (SGLANG_ALLOW_REUSE_DISTRIBUTED=1)
    same_group = ps.get_tp_group() is first_tp
    x = torch.full((4,), float(rank + 1))
    reduced = torch.empty_like(x)
    reduced.copy_(x)
    torch.distributed.all_reduce(reduced, group=ps.get_tp_group().device_group)
    mismatch = _error(
        lambda: ps.init_distributed_environment(
            world_size=2, rank=1 - rank, backend="gloo", local_rank=rank, distributed_init_method=_init_method(port)
        )
    )
    widths = _mismatches(model, SHARDED_WIDTHS, world_rank=rank, tensor_model_parallel_size=2)
    torch.distributed.barrier()
    destroy_distributed()
    _result(
        widths=widths,
        rank=rank,
        tp_size=first_tp.world_size,
        same_group=same_group,
        all_reduce=reduced.tolist(),
        rank_mismatch=mismatch,
        initialized_after_destroy=torch.distributed.is_initialized(),
    )


def main(argv: "List[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario", choices=["runners", "mismatch", "upstream_second_runner", "destroy_recreate", "tp2"]
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.scenario == "runners":
            runners(args.model, args.count)
        elif args.scenario == "tp2":
            tp2(args.model, args.rank, args.port)
        else:
            globals()[args.scenario](args.model)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
