"""sglang.srt.standalone: the in-process runner API on a real ModelRunner (CPU, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

PROMPTS = [[2, 10, 20, 30], [2, 7], [2, 100, 101]]
TARGETS = [[40, 50], [8, 9, 10, 11], [102]]


def hf_model(path: Path):
    import torch
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def runner(tiny_opt: Path):
    from sglang.srt.standalone import RunnerConfig, StandaloneRunner

    built = StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu"))
    yield built
    built.close()


def test_logprobs_and_loss_match_huggingface(runner, tiny_opt: Path) -> None:
    import torch

    hf = hf_model(tiny_opt)
    ours = runner.token_logprobs(PROMPTS, TARGETS)
    nll = []
    with torch.no_grad():
        for prompt, target, got in zip(PROMPTS, TARGETS, ours):
            logits = hf(torch.tensor([prompt + target])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            want = logp.gather(-1, torch.tensor(target)[:, None])[:, 0]
            assert got.shape == (len(target),)
            assert torch.allclose(got, want, atol=1e-5), (got, want)
            nll.append(-want)
    assert abs(runner.loss(PROMPTS, TARGETS).item() - torch.cat(nll).mean().item()) < 1e-5


def test_no_stale_kv_after_an_in_place_weight_change(runner, tiny_opt: Path) -> None:
    """A perturbation changes every weight: K/V computed before it must not be read after it."""
    import torch

    hf = hf_model(tiny_opt)
    seqs = [[2, 3, 4, 5, 6, 7], [2, 3, 4, 5]]
    before = runner.logits(seqs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in runner.model.parameters():
            param.add_(1e-2 * torch.randn(param.shape, generator=generator))
    after = runner.logits(seqs)
    assert not torch.allclose(before[0], after[0])
    hf_after = reload_into_hf(runner, hf)
    with torch.no_grad():
        for seq, got in zip(seqs, after):
            assert torch.allclose(got, hf_after(torch.tensor([seq])).logits[0], atol=1e-5)


def reload_into_hf(runner, hf):
    """HF's model with the runner's (perturbed) weights, through the fused QKV split."""
    import torch

    params = dict(runner.model.named_parameters())
    state = {}
    for name, tensor in hf.state_dict().items():
        for proj, index in (("q_proj", 0), ("k_proj", 1), ("v_proj", 2)):
            if f".{proj}." in name:
                fused = params[name.replace(proj, "qkv_proj")]
                state[name] = fused.chunk(3, dim=0)[index]
                break
        else:
            state[name] = params.get(name, params.get(name.replace("lm_head.weight", "model.decoder.embed_tokens.weight")))
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return hf


def test_a_second_fresh_runner_is_refused_and_reuse_works(runner, tiny_opt: Path) -> None:
    import torch
    from sglang.srt.standalone import RunnerConfig, StandaloneRunner

    with pytest.raises(ValueError, match="already exist in this process"):
        StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu"))
    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", distributed="reuse")) as second:
        assert all(torch.equal(a, b) for a, b in zip(runner.logits(PROMPTS), second.logits(PROMPTS)))
    assert torch.distributed.is_initialized(), "the first runner is still alive"


def test_closing_the_last_runner_destroys_the_distributed_setup(tiny_opt: Path) -> None:
    import torch
    from sglang.srt.standalone import RunnerConfig, StandaloneRunner

    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu")):
        assert torch.distributed.is_initialized()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(device="tpu"), "device 'tpu' is not one of"),
        (dict(dtype="int8"), "dtype 'int8' is not one of"),
        (dict(device="cpu", attention_backend="triton"), "does not run on CPU"),
        (dict(mem_fraction_static=1.5), r"mem_fraction_static must be in \(0, 1\]"),
        (dict(max_running_requests=0), "max_running_requests must be >= 1"),
        (dict(distributed="share"), "distributed must be 'fresh' or 'reuse'"),
    ],
)
def test_invalid_configs_say_what_is_wrong(tiny_opt: Path, fields: dict, message: str) -> None:
    from sglang.srt.standalone import RunnerConfig

    with pytest.raises(ValueError, match=message):
        RunnerConfig(model_path=str(tiny_opt), **fields).resolved()


def test_a_directory_without_a_model_is_refused(tmp_path: Path) -> None:
    from sglang.srt.standalone import RunnerConfig

    with pytest.raises(ValueError, match="has no config.json"):
        RunnerConfig(model_path=str(tmp_path)).resolved()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="names no architectures"):
        RunnerConfig(model_path=str(tmp_path)).resolved()


def test_empty_sequences_are_refused(runner) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        runner.token_logprobs([[2]], [[]])
    with pytest.raises(ValueError, match="1 prompts but 2 targets"):
        runner.token_logprobs([[2]], [[3], [4]])
