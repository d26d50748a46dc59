"""The runner on every model family it serves (sglang.overlay.config.FAMILIES), on this release, CPU fp32:
logits equal HuggingFace's on the same saved weights (every parameter away from its init); other families
are refused at build time, naming them and what is served. MeZO on each family: tests/test_families_mezo.py."""

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


def runner_logits(path: Path):
    from sglang.overlay import RunnerConfig, StandaloneRunner

    with StandaloneRunner(RunnerConfig(model_path=str(path), device="cpu")) as runner:
        return runner.logits(SEQS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runner_logits_equal_huggingface(family: str, checkpoints: dict[str, Path]) -> None:
    # Gemma: as HF's since the overlay's gemma patch (upstream's MLP took the exact GELU, 3.6e-5 off).
    errors = relative_errors(runner_logits(checkpoints[family]), hf_model(checkpoints[family]))
    print(f"RUNNER_VS_HF {family}: max relative error {max(errors):.1e}")
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
