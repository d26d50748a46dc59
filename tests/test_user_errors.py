"""User errors of the trainer's command line and of RunnerConfig: one line that names the file, line or field
and says what to do, found before any model is built, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parent.parent


def mezo_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sglang.overlay.mezo", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def write_data(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": [2, 10, 11], "target": [12, 13]})


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD] * 5 + ['{"prompt": [2, 3] "target": [4]}'], r"data.jsonl:6: not valid JSON \(Expecting ',' delimiter"),
        ([GOOD, '{"prompt": [2, 3]}'], r"data.jsonl:2: each line must be an object with 'prompt' and 'target'"),
        (
            [GOOD, json.dumps({"prompt": [2, 512], "target": [4]})],
            r"data.jsonl:2: prompt\[1\] = 512 is not a token id of the model: ids must be in \[0, 512\)",
        ),
        ([json.dumps({"prompt": [2, 3], "target": [-4]})], r"data.jsonl:1: target\[0\] = -4 is not a token id"),
        (
            [json.dumps({"prompt": [2] * 120, "target": [4] * 9})],
            r"data.jsonl:1: prompt \+ target is 129 tokens, more than the model's context length 128",
        ),
        (
            [json.dumps({"prompt": "hello there", "target": " world"})],
            r"data.jsonl:1: the example is text, but .* has no usable tokenizer|data.jsonl:1: the tokenizer of .* turned",
        ),
        ([], r"data.jsonl has no examples"),
    ],
)
def test_bad_training_data_names_the_file_and_line(tiny_opt: Path, tmp_path: Path, lines, message) -> None:
    from sglang.overlay.mezo.data import load_batches

    data = write_data(tmp_path / "data.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_batches(data, 4, str(tiny_opt))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "-1"], "argument --steps: must be an int >= 1, got -1"),
        (["--steps", "2", "--eps", "-1e-3"], "argument --eps: must be a finite number > 0, got -0.001"),
        (["--steps", "2", "--lr", "0"], "argument --lr: must be a finite number > 0, got 0.0"),
        (["--steps", "2", "--batch-size", "0"], "argument --batch-size: must be an int >= 1, got 0"),
    ],
)
def test_bad_flags_are_one_line_before_anything_is_built(tiny_opt: Path, tmp_path: Path, extra, message) -> None:
    data = write_data(tmp_path / "data.jsonl", [GOOD])
    proc = mezo_cli("--model", str(tiny_opt), "--data", str(data), "--out", str(tmp_path / "out"), *extra)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_bad_data_from_the_command_line_is_one_line(tiny_opt: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data.jsonl", [GOOD, GOOD, '{"prompt": [2, 3], "target": [4, 99999]}'])
    proc = mezo_cli("--model", str(tiny_opt), "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "1")
    assert proc.returncode == 1
    assert f"error: {data}:3: target[1] = 99999 is not a token id of the model" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_truncated_safetensors_file_is_named_by_validate(tiny_opt: Path, tmp_path: Path) -> None:
    import shutil

    from sglang.overlay import RunnerConfig

    broken = tmp_path / "broken"
    shutil.copytree(tiny_opt, broken)
    (weights,) = broken.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(
        ValueError,
        match=rf"{weights} is truncated: its header describes \d+ bytes, the file has "
        r"\d+; save or download it again",
    ):
        RunnerConfig(model_path=str(broken), device="cpu").validate()
    weights.write_bytes(b"\x01")
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        RunnerConfig(model_path=str(broken), device="cpu").validate()


def test_a_gpu_attention_backend_on_a_cpu_machine_fails_in_validate(
    tiny_opt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from sglang.overlay import RunnerConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"attention_backend 'triton' does not run on CPU \(device='auto' is the "
        r"CPU here\); use 'torch_native'",
    ):
        RunnerConfig(model_path=str(tiny_opt), attention_backend="triton").validate()


def test_a_memory_error_names_the_command_lines_flag(tiny_opt: Path, tmp_path: Path) -> None:
    """SGLang's "Raise --mem-fraction-static" reached the MeZO command line's users, which had no such flag,
    and said GPU on a CPU run: the command line has --mem-fraction-static and the error names it."""
    data = write_data(tmp_path / "data.jsonl", [GOOD])
    proc = mezo_cli(
        "--model",
        str(tiny_opt),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "1",
        "--device",
        "cpu",
        "--mem-fraction-static",
        "1e-9",
    )
    if proc.returncode == 0:  # the machine's free memory grew while the model loaded (other processes)
        pytest.skip("free memory grew during the load, so SGLang found room at a fraction of 1e-9")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        "error: the model's weights leave no memory for the KV cache with --mem-fraction-static 1e-09: "
        "SGLang sizes the KV pool from the machine's free memory" in proc.stderr
    ), proc.stderr[-3000:]
