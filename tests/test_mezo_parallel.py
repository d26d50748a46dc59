"""MeZO on several processes against one: TP = 2 ranks and DP = 2 replicas (20 steps each), and the command
line under torchrun. What they check (placements, z offsets, the store's exchange, the CLI's wiring) is the
overlay's code on the model file's shapes, not the release's: they run once, in the full row
(tests/test_mezo.py runs on every CPU release; tests/test_standalone.py checks TP = 2 forwards there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.mezo import EVAL, PROMPTS, STEPS, TARGETS, TOL, load_saved, max_weight_diff
from tests.support.ranks import TP_HYPER, TP_TIMEOUT, run_ranks

pytestmark = pytest.mark.sglang


@pytest.mark.slow
def test_tp2_trajectory_equals_tp1(build, tiny_opt: Path, tmp_path: Path) -> None:
    """Two processes (gloo), one TP rank each, every rank perturbing its shards (q/k/v/fc1 rows, out_proj/fc2
    columns, vocabulary rows) at their HF offsets: TP = 2 draws TP = 1's z, and 20 steps give TP = 1's losses
    and weights within 1e-5."""
    from sglang.overlay.mezo import MeZO, MeZOConfig

    runner = build(tiny_opt)
    trainer = MeZO(runner, MeZOConfig(**TP_HYPER))
    want = trainer.train([(PROMPTS, TARGETS)], STEPS, progress=False)
    want_state = trainer.hf_state_dict()
    runner.close()  # the ranks run in their own interpreters

    results = run_ranks("tp_mezo_main", tiny_opt, tmp_path)
    for res in results:
        assert res["shards"]["model.decoder.layers.0.fc2.weight"] == (64, 64), "fc2 is not a column shard"
        assert res["shards"]["model.decoder.layers.0.self_attn.q_proj.weight"] == (32, 64)
        for (plus, minus), step in zip(res["losses"], want):
            assert abs(plus - step.loss_plus) < TOL and abs(minus - step.loss_minus) < TOL
        assert max_weight_diff(res["state"], want_state) < TOL


@pytest.mark.slow
def test_dp2_trajectory_equals_one_replica_on_the_union_batch(build, tiny_opt: Path, tmp_path: Path) -> None:
    """Two replicas as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT and the agent's store), each
    scoring half of every batch and exchanging (NLL sum, token count) through the store: both end with the
    same weights, bit for bit, and follow one replica on the whole batch within 1e-5 over 20 steps."""
    import os
    import subprocess
    import sys
    from datetime import timedelta

    import torch

    from sglang.overlay.compat import free_port
    from sglang.overlay.mezo import MeZO, MeZOConfig
    from tests.support.runtime import wait_all

    runner = build(tiny_opt)
    trainer = MeZO(runner, MeZOConfig(**TP_HYPER))
    want = trainer.train([(PROMPTS, TARGETS)], STEPS, progress=False)
    want_state = trainer.hf_state_dict()
    runner.close()

    port = free_port()
    store = torch.distributed.TCPStore(
        "127.0.0.1",
        port,
        world_size=None,
        is_master=True,
        timeout=timedelta(seconds=TP_TIMEOUT),
        wait_for_workers=False,
    )
    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            TORCHELASTIC_USE_AGENT_STORE="True",
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from tests.support.ranks import dp_mezo_main; dp_mezo_main(sys.argv[1], sys.argv[2])",
                    str(tiny_opt),
                    str(tmp_path / f"rank{rank}.pt"),
                ],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        wait_all(procs, TP_TIMEOUT, "replica")
    finally:
        del store
    replicas = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["share"] for r in replicas] == [PROMPTS[0::2], PROMPTS[1::2]] and replicas[1]["size"] == 2
    assert all(torch.equal(replicas[0]["state"][k], replicas[1]["state"][k]) for k in want_state)
    assert replicas[0]["losses"] == replicas[1]["losses"]
    for (plus, minus), step in zip(replicas[0]["losses"], want):
        assert abs(plus - step.loss_plus) < TOL and abs(minus - step.loss_minus) < TOL
    assert max_weight_diff(replicas[0]["state"], want_state) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_torchrun_command_line_equals_one_process(tiny_opt: Path, tmp_path: Path, layout: str) -> None:
    """``torchrun --nproc-per-node 2 -m sglang.overlay.mezo`` (two data-parallel replicas, or one replica at
    --tp-size 2) with evaluations every 2 steps writes one log and one model, and they equal one process's
    on the same data (under TP every rank takes part in every evaluation's forwards: before, rank 0 alone
    evaluated, pairing its collectives with the other rank's training forwards, and the run hung)."""
    import os
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(PROMPTS, TARGETS)))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(e) + "\n" for e in EVAL))
    flags = [
        "--model",
        str(tiny_opt),
        "--data",
        str(data),
        "--steps",
        "4",
        "--batch-size",
        "3",
        "--lr",
        "1e-4",
        "--eps",
        "1e-2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        "--eval-data",
        str(dev),
        "--eval-every",
        "2",
    ]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    # Unset: at --tp-size 2 the launcher binds each CPU rank's threads itself (it stopped with "set
    # SGLANG_CPU_OMP_THREADS_BIND"); a replica at tp_size 1 takes SGLang's default.
    env.pop("SGLANG_CPU_OMP_THREADS_BIND", None)
    single = subprocess.run(
        [sys.executable, "-m", "sglang.overlay.mezo", *flags, "--out", str(tmp_path / "one")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=TP_TIMEOUT,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    extra = ["--tp-size", "2"] if layout == "tp2" else []
    many = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "sglang.overlay.mezo",
            *flags,
            *extra,
            "--out",
            str(tmp_path / "many"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TP_TIMEOUT,
    )
    assert many.returncode == 0, many.stdout[-3000:] + many.stderr[-6000:]
    if layout == "tp2":
        assert "MeZO: tensor parallelism on the CPU: each rank's threads on its own cores" in many.stderr
        for noise in ("Custom allreduce failed", "--max-total-tokens", "--disable-custom-all-reduce"):
            assert noise not in many.stderr, many.stderr[-4000:]
    logs = [
        [json.loads(line) for line in (tmp_path / d / "mezo_log.jsonl").read_text().splitlines()]
        for d in ("one", "many")
    ]
    assert [(r["kind"], r.get("step", r.get("steps_done"))) for r in logs[1]] == [
        ("eval", 0),
        ("step", 0),
        ("step", 1),
        ("eval", 2),
        ("step", 2),
        ("step", 3),
        ("eval", 4),
    ]
    for a, b in zip(*logs):
        assert a["kind"] == b["kind"]
        if a["kind"] == "step":
            assert abs(a["loss_plus"] - b["loss_plus"]) < TOL and abs(a["loss_minus"] - b["loss_minus"]) < TOL
        else:
            assert abs(a["nll"] - b["nll"]) < TOL and a["accuracy"] == b["accuracy"], (a, b)
    one, many_model = load_saved(tmp_path / "one"), load_saved(tmp_path / "many")
    assert max_weight_diff(one.state_dict(), many_model.state_dict()) < TOL
