"""The runner on every model family it serves (sglang.overlay.config.FAMILIES), on this release, CPU fp32:
logits equal HuggingFace's on the same saved weights (every parameter away from its init), and so do the
dense scoring engine's (sglang.overlay.dense_llama / dense_opt: the decoder walk that scores on the GPU,
run here on the CPU with a plan of its own); other families are refused at build time, naming them and
what is served. MeZO on each family: tests/test_families_mezo.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.families import FAMILIES, hf_model, make_tiny

pytestmark = pytest.mark.sglang

SEQS = [[2, 10, 20, 30, 40, 50, 60], [3, 7, 8], [5, 100, 101, 102, 103]]
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny(family, root / family) for family in FAMILIES}


def relative_errors(got, model) -> list[float]:
    import torch

    with torch.no_grad():
        want = [model(torch.tensor([seq])).logits[0] for seq in SEQS]
    return [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]


# The families whose decoder the dense engine walks (the rest score through ModelRunner.forward everywhere).
ENGINE_FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral")


def engine_logits(runner) -> list:
    """Each sequence's logits through the runner's dense engine walking the decoder on the CPU: the GPU's
    scoring path but for the attention kernel (torch's SDPA math kernel, K/V heads repeated for GQA)."""
    import torch

    from sglang.overlay.dense import DensePrefill
    from sglang.overlay.forward import head_logits

    out = []
    for seq in SEQS:
        plan = DensePrefill((len(seq),), None, None, None, write_kv=False)
        with torch.no_grad():
            hidden = runner.engine.run(torch.tensor(seq), torch.arange(len(seq)), plan)
        out.append(head_logits(hidden, runner.model.lm_head, runner.vocab_size).float())
    return out


@pytest.fixture(scope="module")
def scored(checkpoints: dict[str, Path]):
    """family -> (the runner's logits, the dense engine's or None, the engine's class name), one runner each."""
    from sglang.overlay import RunnerConfig, StandaloneRunner

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            with StandaloneRunner(RunnerConfig(model_path=str(checkpoints[family]), device="cpu")) as runner:
                engine = type(runner.engine).__name__ if runner.engine is not None else None
                cache[family] = (runner.logits(SEQS), engine_logits(runner) if engine else None, engine)
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runner_logits_equal_huggingface(family: str, checkpoints: dict[str, Path], scored) -> None:
    # Gemma: as HF's since the overlay's gemma patch (upstream's MLP took the exact GELU, 3.6e-5 off).
    errors = relative_errors(scored(family)[0], hf_model(checkpoints[family]))
    print(f"RUNNER_VS_HF {family}: max relative error {max(errors):.1e}")
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_engine_logits_equal_huggingface(family: str, checkpoints: dict[str, Path], scored) -> None:
    """The engine's own layer walk (norms and their residual, q/k/v biases, q/k norms, llama3's rope
    scaling, grouped-query heads, tied heads) against HF: a norm or bias routed wrong, or a Qwen3 q/k norm
    skipped, shows here, not in the runner's test (the runner scores through ModelRunner.forward on CPU)."""
    _, engine, name = scored(family)
    if family not in ENGINE_FAMILIES:
        assert engine is None, f"{family} got a dense engine ({name}); it scores through ModelRunner.forward"
        return
    assert name == "LlamaEngine", f"{family} has no dense engine ({name})"
    errors = relative_errors(engine, hf_model(checkpoints[family]))
    print(f"ENGINE_VS_HF {family}: max relative error {max(errors):.1e}")
    assert max(errors) <= TOL, errors


def test_a_family_the_runner_does_not_serve_is_refused_naming_it(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from sglang.overlay import RunnerConfig

    MixtralForCausalLM(
        MixtralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
            vocab_size=128,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"is a MixtralForCausalLM, which the in-process runner does not serve: it "
        r"serves OPT \(OPTForCausalLM\), GPT-2 .*Gemma \(GemmaForCausalLM\)\. To try another .* "
        r"RunnerConfig\(check_family=False\)",
    ):
        RunnerConfig(model_path=str(tmp_path), device="cpu").validate()
