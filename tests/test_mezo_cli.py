"""MeZO's command line under torchrun (DP = 2 replicas, TP = 2 ranks) against one process. Not
release-dependent beyond tests/test_mezo.py (which checks TP = 2 and DP = 2 trajectories on every CPU
release): runs once, in the full row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_mezo import PROMPTS, TARGETS, TOL, load_saved, max_weight_diff

pytestmark = pytest.mark.sglang


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_torchrun_command_line_equals_one_process(tiny_opt: Path, tmp_path: Path, layout: str) -> None:
    """``torchrun --nproc-per-node 2 -m sglang.overlay.mezo`` (two data-parallel replicas, or one replica at
    --tp-size 2) writes one log and one model, and they equal one process's on the same data."""
    import os
    import subprocess
    import sys

    from tests.test_standalone import TP_TIMEOUT, _omp_bind

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in zip(PROMPTS, TARGETS)))
    flags = ["--model", str(tiny_opt), "--data", str(data), "--steps", "4", "--batch-size", "3", "--lr", "1e-4",
             "--eps", "1e-2", "--seed", "3", "--device", "cpu", "--no-progress"]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if layout == "tp2":  # SGLang binds each CPU rank's threads; a replica at tp_size 1 takes the default
        env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", _omp_bind(2))
    else:
        env.pop("SGLANG_CPU_OMP_THREADS_BIND", None)
    single = subprocess.run([sys.executable, "-m", "sglang.overlay.mezo", *flags, "--out", str(tmp_path / "one")],
                            cwd=root, capture_output=True, text=True, timeout=TP_TIMEOUT)
    assert single.returncode == 0, single.stderr[-4000:]
    extra = ["--tp-size", "2"] if layout == "tp2" else []
    many = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sglang.overlay.mezo", *flags, *extra, "--out", str(tmp_path / "many")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=TP_TIMEOUT)
    assert many.returncode == 0, many.stdout[-3000:] + many.stderr[-6000:]
    logs = [[json.loads(line) for line in (tmp_path / d / "mezo_log.jsonl").read_text().splitlines()]
            for d in ("one", "many")]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3]
    for a, b in zip(*logs):
        assert abs(a["loss_plus"] - b["loss_plus"]) < TOL and abs(a["loss_minus"] - b["loss_minus"]) < TOL
    one, many_model = load_saved(tmp_path / "one"), load_saved(tmp_path / "many")
    assert max_weight_diff(one.state_dict(), many_model.state_dict()) < TOL
