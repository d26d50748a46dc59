"""SGLANG_ALLOW_REUSE_DISTRIBUTED: reuse a matching torch.distributed world and model-parallel groups.

The hooks are a patch variant's: every release runs the reuse of three runners; the mismatches, the unset
variable, destroy and rebuild, and TP=2 run on the variant's base release (``variant_base``).

Distributed state is process-global, so every scenario runs in a fresh
interpreter (tests/support/reuse_scenarios.py) and reports one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from tests.support.reuse_scenarios import MISMATCHES, SHARDED_WIDTHS
from tests.support.runtime import free_port

pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parents[1]
ENV = "SGLANG_ALLOW_REUSE_DISTRIBUTED"
TIMEOUT = 300


def _cmd(scenario: str, model: Path, *extra: str) -> List[str]:
    return [sys.executable, "-m", "tests.support.reuse_scenarios", scenario, str(model), *extra]


def _env(reuse: Optional[str]) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV, None)
    if reuse is not None:
        env[ENV] = reuse
    return env


def _parse(proc: subprocess.CompletedProcess, what: str) -> Dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"{what} failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def run_scenario(scenario: str, model: Path, *extra: str, reuse: Optional[str] = "1") -> Dict[str, Any]:
    proc = subprocess.run(
        _cmd(scenario, model, *extra), cwd=ROOT, env=_env(reuse), capture_output=True, text=True, timeout=TIMEOUT
    )
    return _parse(proc, scenario)


def test_second_and_third_runner_reuse_and_match_first(tiny_opt: Path) -> None:
    res = run_scenario("runners", tiny_opt, "--count", "3", reuse="true")
    first, second, third = res["times"]
    print(f"\nModelRunner construction: 1st {first:.3f}s, 2nd {second:.3f}s, 3rd {third:.3f}s")
    # Runners 2 and 3 give logits identical to the first (single) runner's.
    assert res["equal"] == [True, True]
    # Reuse is logged once per process, not once per runner.
    logs = res["reuse_logs"]
    assert sum("existing torch.distributed world" in m for m in logs) == 1, logs
    assert sum("model-parallel groups" in m for m in logs) == 1, logs


# What the groups of these tests are built with, and what the mismatch cases request instead
# (tests/support/reuse_scenarios.py: MISMATCHES).
EXISTING = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "attention_data_parallel_size": 1,
    "attention_context_model_parallel_size": 1,
    "moe_data_model_parallel_size": 1,
    "decode_context_parallel_size": 1,
    "backend": "gloo",
    "duplicate_tp_group": False,
    "enable_symm_mem": False,
    "rank_offset": 0,
    "max_world_size": None,
}


def _assert_names_only(err: Dict[str, Any], detail: str) -> None:
    """A reuse ValueError whose only difference is ``detail`` ("name: existing X, requested Y"), besides
    the widths requested with it (``err["also"]``: the published configuration needs them together)."""
    assert err["type"] == "ValueError", (detail, err)
    assert detail in err["message"], (detail, err["message"])
    also = err.get("also", [])
    assert err["message"].count(": existing ") == 1 + len(also), err["message"]
    for name in also:
        assert f"{name}: existing 1, requested 2" in err["message"], (name, err["message"])
    assert ENV in err["message"]


@pytest.mark.variant_base
def test_mismatches_raise_value_error_naming_both_values(tiny_opt: Path) -> None:
    res = run_scenario("mismatch", tiny_opt)
    assert res["world_match"]["type"] is None
    assert res["mp_match"]["type"] is None
    world = {
        "world_size": "world_size: existing 1, requested 2",
        "rank": "rank: existing 0, requested 1",
        "backend": "backend: existing 'gloo', requested 'nccl'",
        "local_rank": "local_rank: existing 0, requested 1",
    }
    for key, detail in world.items():
        _assert_names_only(res[key], detail)
    # Every argument of initialize_model_parallel the check compares (widths that split the TP group:
    # test_tp2_two_processes_gloo), each requested alone: the error names it and nothing else.
    assert {"tensor_model_parallel_size", "pipeline_model_parallel_size", "backend"} <= {
        name for name, err in res["groups"].items() if err != "absent"
    }
    for name, err in res["groups"].items():
        if err != "absent":  # the release's initialize_model_parallel has no such argument or width
            _assert_names_only(err, f"{name}: existing {EXISTING[name]!r}, requested {MISMATCHES[name]!r}")
    # Expert-location metadata may be replaced only when reuse is on.
    assert res["eplb"]["type"] is None
    assert res["unset_eplb"]["type"] == "AssertionError"
    # Variable unset: upstream behaviour (world silently reused, groups assert).
    assert res["unset_world_size"]["type"] is None
    assert res["unset_mp"] == {
        "type": "AssertionError",
        "message": "tensor model parallel group is already initialized",
    }


UPSTREAM_SECOND_RUNNER = {
    "bootstrap": ("AssertionError", "tensor model parallel group is already initialized"),
    "runtime-context": (
        "RuntimeError",
        "init_parallel_runtime() ran twice in this process. The groups are built "
        "once, before anything that reads one exists; a second build is "
        "either a lost race between two entries or a runner trying to "
        "bring up its own. An elastic scale-up joins an existing WORLD "
        "through initialize_model_parallel directly and does not come "
        "through here.",
    ),
}


@pytest.mark.variant_base
@pytest.mark.parametrize("value", [None, "false"])
def test_unset_or_false_keeps_upstream_error(tiny_opt: Path, value: Optional[str]) -> None:
    res = run_scenario("upstream_second_runner", tiny_opt, reuse=value)
    exc_type, message = UPSTREAM_SECOND_RUNNER[res["era"]]
    assert res["second"] == {"type": exc_type, "message": message}


@pytest.mark.variant_base
def test_destroy_and_recreate(tiny_opt: Path) -> None:
    res = run_scenario("destroy_recreate", tiny_opt)
    clean = dict(initialized=False, sglang_groups=[], torch_groups=0)
    for stage in ("direct", "runner", "end"):
        for key, value in clean.items():
            assert res[stage][key] == value, (stage, res[stage])
        if "parallel_initialised" in res[stage]:
            # 0.5.21+: destroy_model_parallel resets bootstrap's once-guard.
            assert res[stage]["parallel_initialised"] is False, (stage, res[stage])
    assert res["direct"]["port_free"] is True
    assert res["direct"]["reinit_same_port"] is True
    assert res["equal"] == [True, True]
    print(f"\nport free after destroying a ModelRunner's world: {res['runner']['port_free']}")


@pytest.mark.variant_base
def test_tp2_two_processes_gloo(tiny_opt: Path) -> None:
    port = str(free_port())
    procs = [
        subprocess.Popen(
            _cmd("tp2", tiny_opt, "--rank", str(rank), "--port", port),
            cwd=ROOT,
            env=_env("1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(_parse(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), f"tp2 rank {rank}"))
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["tp_size"] == 2
        assert res["same_group"] is True
        assert res["all_reduce"] == [3.0] * 4
        _assert_names_only(res["rank_mismatch"], f"rank: existing {rank}, requested {1 - rank}")
        existing = dict(EXISTING, tensor_model_parallel_size=2)
        assert set(res["widths"]) == set(SHARDED_WIDTHS)
        for name, err in res["widths"].items():
            if err != "absent":  # the release has no such width
                _assert_names_only(err, f"{name}: existing {existing[name]!r}, requested {MISMATCHES[name]!r}")
        assert res["widths"]["expert_model_parallel_size"] != "absent"
        assert res["initialized_after_destroy"] is False
