"""The quiet default (sglang.overlay.quiet): runners and the MeZO CLI drop upstream's noise, and only it.

Two real processes on the tiny OPT: one quiet (two runners, the second with distributed="reuse",
then the MeZO CLI's ``main``), one verbose (``--verbose`` and ``RunnerConfig(log_level="verbose")``).
Every NOISE message the verbose process prints must be absent from the quiet one, while messages the
list does not name, from the same upstream loggers and modules, still show. Runs in the full row.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang
REPO = Path(__file__).resolve().parent.parent

RUNNERS = """
from sglang.overlay import RunnerConfig, StandaloneRunner
first = StandaloneRunner(RunnerConfig(model_path=MODEL, device="cpu", log_level=LEVEL))
second = StandaloneRunner(RunnerConfig(model_path=MODEL, device="cpu", distributed="reuse", log_level=LEVEL))
assert first.loss([[2, 100]], [[200, 300]]).item() == second.loss([[2, 100]], [[200, 300]]).item()
second.close(); first.close()
"""
MEZO = """
from sglang.overlay.mezo.__main__ import main
assert main(["--model", MODEL, "--data", DATA, "--steps", "2", "--out", OUT, "--device", "cpu", "--no-progress",
             *(["--verbose"] if LEVEL == "verbose" else [])]) == 0
"""
KEPT = """
import logging, warnings
from sglang.overlay import quiet
with quiet.scope():
    logging.getLogger("sglang.srt.models.registry").warning("Ignore import error when loading sglang.srt.models.opt: kept")
    logging.getLogger("sglang.srt.models.registry").warning("kept: a registry message the list does not name")
    warnings.warn_explicit("kept: an upstream warning the list does not name", UserWarning, "awq.py", 1,
                           module="sglang.srt.layers.quantization.awq.awq")
    warnings.warn_explicit("Only CUDA, HIP and XPU support AWQ currently. kept: not from sglang", UserWarning,
                           "user.py", 1, module="user_code")
logging.getLogger("sglang.srt.runtime_context").warning("publish(role=x) re-projected the config bags: kept after the scope")
assert not any(f[1] is not None and "AWQ" in f[1].pattern for f in warnings.filters), "a filter outlived its scope"
"""


def _run(level: str, script: str, tiny_opt: Path, tmp_path: Path) -> str:
    data = tmp_path / f"{level}.jsonl"
    data.write_text('{"prompt": [2, 100, 5], "target": [200, 300]}\n{"prompt": [2, 7], "target": [9]}\n')
    head = f"MODEL, DATA, OUT, LEVEL = {str(tiny_opt)!r}, {str(data)!r}, {str(tmp_path / level)!r}, {level!r}\n"
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CUDA_IPC_TRANSPORT"}
    proc = subprocess.run(
        [sys.executable, "-c", head + textwrap.dedent(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _matched(out: str) -> list[str]:
    from sglang.overlay.quiet import NOISE

    # A log pattern is anchored at the message, which a handler may print after a timestamp.
    return [n.pattern for n in NOISE if re.search(n.pattern.lstrip("^"), out, re.M)]


def test_upstream_noise_is_dropped_by_default_and_shown_when_verbose(tiny_opt: Path, tmp_path: Path) -> None:
    verbose = _run("verbose", MEZO + RUNNERS, tiny_opt, tmp_path)
    quiet = _run("quiet", RUNNERS + MEZO + KEPT, tiny_opt, tmp_path)
    shown = _matched(verbose)
    print(f"verbose shows {len(shown)} NOISE entries:", *shown, sep="\n  ")
    for message in (
        "support AWQ currently",
        "Ignore import error when loading sglang.srt.models.",
        "Multi-thread loading shards",
    ):
        assert message in verbose, (
            f"{message!r} is not printed with --verbose / log_level='verbose':\n{verbose[-3000:]}"
        )
    assert len(shown) >= 6, verbose[-3000:]
    ours = "\n".join(line for line in quiet.splitlines() if "kept" not in line)
    assert _matched(ours) == [], f"noise in the quiet default:\n{quiet[-3000:]}"
    assert "saved " in quiet and "after 2 steps" in quiet
    for kept in (
        "Ignore import error when loading sglang.srt.models.opt: kept",
        "kept: a registry message the list does not name",
        "kept: an upstream warning the list does not name",
        "support AWQ currently. kept: not from sglang",
        "re-projected the config bags: kept after the scope",
    ):
        assert kept in quiet, f"{kept!r} was dropped:\n{quiet[-3000:]}"
