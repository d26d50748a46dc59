"""The native OPT on a pipeline of two ranks (PP=2, two gloo processes: tests/support/opt_pp.py).

Runs in the full row only (two interpreters importing sglang, about a minute); the layer split it
relies on is the release's make_pp_layers / make_layers (python/sglang/srt/models/opt_compat.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang


def test_pipeline_parallel_two_ranks_load_their_layers(tmp_path):
    """PP=2, two gloo processes: each rank loads its layer of the whole checkpoint (HF's tensors
    exactly, fused q/k/v included), needs no tensor of the other rank's layer, and raises naming a
    tensor of its own layer that the checkpoint lacks."""
    import json
    import subprocess
    import sys

    from tests.support import runtime

    src = runtime.make_tiny_opt(tmp_path / "src")
    port = str(runtime.free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.opt_pp", str(src), "--rank", str(rank), "--port", port],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = runtime.wait_all(procs, timeout=600)
    for rank, output in enumerate(outputs):
        result = json.loads(next(ln for ln in output.splitlines() if ln.startswith("RESULT "))[7:])
        assert result == {
            "layers": [rank, rank + 1],
            "matches_hf": True,
            "other_layer_missing_ok": True,
            "own_layer_missing": f"model.decoder.layers.{rank}.fc2.bias",
        }, result
