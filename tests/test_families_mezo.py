"""MeZO on every family the runner serves (CPU fp32), against the independent HF reference
(tests/support/mezo_reference.py) on the same saved weights: 20 steps of full-parameter training and of LoRA,
losses and weights within 1e-5, as OPT's (tests/test_mezo.py); ``save_pretrained`` writes what HF's
``AutoModelForCausalLM`` loads. Tensor parallelism on a grouped-query Llama: 2 k/v heads over 2 ranks, and
1 k/v head replicated on both, equal one rank. The placements come from each model's own weight loading
(sglang/overlay/mezo/params.py), so these run once, in the full row; tests/test_families.py checks every
family's forward on every release."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.families import FAMILIES, make_tiny
from tests.support.mezo import PROMPTS, STEPS, TARGETS, TOL, max_weight_diff
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.sglang

from tests.support.ranks import FAMILY_HYPER as FULL  # noqa: E402

LORA = dict(lr=1e-2, eps=1e-2, seed=7, lora_rank=4, lora_alpha=8.0)
CASES = [(family, "full") for family in FAMILIES] + [(family, "lora") for family in FAMILIES if family != "gpt2"]


def reference(model_dir: Path, family: str, hyper: dict):
    from tests.support.mezo_reference import ReferenceMeZO

    return ReferenceMeZO(model_dir, **hyper)


@pytest.mark.parametrize("family, mode", CASES)
def test_mezo_equals_the_hf_reference_and_saves_what_hf_loads(family: str, mode: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.mezo import MeZO, MeZOConfig

    model_dir = make_tiny(family, tmp_path / "model")
    hyper = FULL if mode == "full" else LORA
    with StandaloneRunner(RunnerConfig(model_path=str(model_dir), device="cpu")) as runner:
        trainer = MeZO(runner, MeZOConfig(**hyper))
        results = trainer.train([(PROMPTS, TARGETS)], STEPS, progress=False)
        trained = trainer.hf_state_dict()
        trainer.save_pretrained(tmp_path / "out")
    ref = reference(model_dir, family, hyper)
    worst = 0.0
    for k, result in enumerate(results):
        plus, minus = ref.step(PROMPTS, TARGETS)
        worst = max(worst, abs(result.loss_plus - plus), abs(result.loss_minus - minus))
        assert abs(result.loss_plus - plus) < TOL and abs(result.loss_minus - minus) < TOL, (k, result, plus, minus)
    want = {k: v for k, v in ref.state_dict().items() if k in trained}
    initial = {k: v for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items() if k in trained}
    print(
        f"MEZO_FAMILY {family} {mode}: max |dL+-| {worst:.1e}, max |dW| {max_weight_diff(trained, want):.1e}, "
        f"largest move {max_weight_diff(trained, initial):.1e}"
    )
    assert max_weight_diff(trained, want) < TOL
    assert max_weight_diff(trained, initial) > 1e-3, "20 steps must move the weights"
    saved, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert max_weight_diff({k: v for k, v in saved.state_dict().items() if k in trained}, trained) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_tensor_parallel_gqa_llama_equals_one_rank(kv_heads: int, tmp_path: Path) -> None:
    """Llama with 4 query heads and ``kv_heads`` k/v heads at TP = 2 (gloo, two processes): each rank perturbs
    its shards at their HF offsets (with 1 k/v head both ranks hold it, and perturb it alike); 20 steps give
    TP = 1's losses and weights within 1e-5."""

    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.mezo import MeZO, MeZOConfig

    model_dir = make_tiny("llama", tmp_path / "model", num_key_value_heads=kv_heads)
    with StandaloneRunner(RunnerConfig(model_path=str(model_dir), device="cpu")) as runner:
        trainer = MeZO(runner, MeZOConfig(**FULL))
        want = trainer.train([(PROMPTS, TARGETS)], STEPS, progress=False)
        want_state = trainer.hf_state_dict()
    results = run_ranks("tp_mezo_main", model_dir, tmp_path, hyper="family")
    head = 16  # hidden 64 / 4 heads
    for got in results:
        assert got["shards"]["model.layers.0.self_attn.k_proj.weight"] == (head * max(1, kv_heads // 2), 64)
        assert got["shards"]["model.layers.0.self_attn.q_proj.weight"] == (2 * head, 64)
        assert got["shards"]["model.layers.0.mlp.down_proj.weight"] == (64, 64), "down_proj is not a column shard"
        for (plus, minus), step in zip(got["losses"], want):
            assert abs(plus - step.loss_plus) < TOL and abs(minus - step.loss_minus) < TOL
        assert max_weight_diff(got["state"], want_state) < TOL
