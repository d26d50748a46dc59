"""What the MeZO tests share: their batches, tolerances, and how they read a trainer's output."""

from __future__ import annotations

from pathlib import Path

TOL = 1e-5
STEPS = 20
PROMPTS = [[2, 10, 20, 30, 31], [2, 7, 8], [2, 100, 101, 102]]
TARGETS = [[40, 50, 60], [8, 9, 10, 11], [102, 103]]
EVAL = [
    {"prompt": [2, 11, 12], "target": [13, 14]},
    {"prompt": [2, 40, 41, 42], "candidates": [[43], [44, 45], [46]], "gold": 1},
    {"prompt": [2, 200], "target": [201, 202, 203], "candidates": [[201], [300], [301, 302]], "gold": 0},
    {"prompt": [2, 60, 61], "candidates": [[62, 63], [64]], "gold": 1},
]


def load_saved(out_dir: Path):
    """The trainer's checkpoint through ``from_pretrained``, which must find every key and no other."""
    import torch
    from transformers import OPTForCausalLM

    model, info = OPTForCausalLM.from_pretrained(out_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def eval_examples():
    from sglang.overlay.mezo.data import EvalExample

    return [EvalExample(e["prompt"], e.get("target"), e.get("candidates", []), e.get("gold")) for e in EVAL]
