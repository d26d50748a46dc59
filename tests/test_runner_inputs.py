"""The runner answers bad input with a ValueError and stays alive; batches larger than its pools run in parts.

A small KV pool (256 slots) and 4 request slots make the batching happen often. The fuzz test makes a
few hundred random calls mixing valid and invalid inputs: each either returns what HuggingFace returns
on the same weights or raises ValueError, and after every error the runner answers a valid call
correctly. A NaN written into a weight (and restored) is part of the mix.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

VOCAB, CONTEXT, KV_TOKENS, REQUESTS = 512, 128, 256, 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(StandaloneRunner, HF model) on the same tiny random OPT."""
    import torch
    from transformers import OPTForCausalLM

    from sglang.overlay import RunnerConfig, StandaloneRunner
    from tests.support.runtime import make_tiny_opt

    path = make_tiny_opt(tmp_path_factory.mktemp("inputs_opt"), seed=3)
    runner = StandaloneRunner(
        RunnerConfig(model_path=str(path), device="cpu", max_total_tokens=KV_TOKENS, max_running_requests=REQUESTS)
    )
    hf = OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield runner, hf
    runner.close()


def hf_logits(hf, seqs):
    import torch

    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0] for s in seqs]


def hf_logprobs(hf, prompts, targets):
    import torch

    out = []
    for prompt, target, logits in zip(prompts, targets, hf_logits(hf, [p + t for p, t in zip(prompts, targets)])):
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        out.append(logp.gather(-1, torch.tensor(target)[:, None])[:, 0])
    return out


def hf_greedy(hf, prompts, n):
    import torch

    with torch.no_grad():
        return [
            hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=1,
            )[0, len(p) :].tolist()
            for p in prompts
        ]


def close(got, want, atol: float) -> bool:
    import torch

    return len(got) == len(want) and all(
        g.shape == w.shape and torch.allclose(g, w, atol=atol, equal_nan=True) for g, w in zip(got, want)
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda r: r.logits([[2, 5, VOCAB]]),
            rf"seqs\[0\]\[2\] = {VOCAB} is not a token id of this model: "
            rf"ids must be in \[0, {VOCAB}\)",
        ),
        (lambda r: r.logits([[2, 5], [-1]]), r"seqs\[1\]\[0\] = -1 is not a token id"),
        (lambda r: r.logits([[2, 5], []]), r"seqs\[1\] is empty"),
        (lambda r: r.logits([]), r"seqs is empty"),
        (lambda r: r.logits([[2, "7"]]), r"seqs\[0\]\[1\] is '7' \(str\), not an int token id"),
        (lambda r: r.logits([[2, 7.0]]), r"seqs\[0\]\[1\] is 7.0 \(float\)"),
        (lambda r: r.logits([[2, True]]), r"seqs\[0\]\[1\] is True \(bool\)"),
        (lambda r: r.logits(["hello"]), r"seqs\[0\] is 'hello' \(str\), not a list of token ids"),
        (
            lambda r: r.logits([[2] * (CONTEXT + 1)]),
            rf"seqs\[0\] has {CONTEXT + 1} tokens, more than the model's "
            rf"context length {CONTEXT}",
        ),
        (lambda r: r.loss([[2, 3]], [[4], [5]]), "1 prompts but 2 targets"),
        (lambda r: r.loss([[2] * 100], [[3] * 29]), r"prompts \+ targets\[0\] has 129 tokens"),
        (lambda r: r.generate([[2, 3]], 0), r"max_new_tokens must be an int >= 1, got 0"),
        (lambda r: r.generate([[2] * 120], 9), r"prompts\[0\] has 129 tokens with max_new_tokens=9"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(pair, call, message) -> None:
    runner, hf = pair
    with pytest.raises(ValueError, match=message):
        call(runner)
    assert close(runner.logits([[2, 11, 12]]), hf_logits(hf, [[2, 11, 12]]), 1e-4), "the runner is still alive"


def test_the_limits_themselves_are_valid_input(pair) -> None:
    """A sequence of exactly the context length, token ids 0 and vocab - 1, a prompt + target that fills the
    context, and generation up to it, are answered, and equal HF's (the checks refuse past the limits only)."""
    runner, hf = pair
    full = [2] + [0, VOCAB - 1] * ((CONTEXT - 2) // 2) + [7]
    assert len(full) == CONTEXT
    assert close(runner.logits([full, [0], [VOCAB - 1]]), hf_logits(hf, [full, [0], [VOCAB - 1]]), atol=1e-4)
    prompts, targets = [full[:100]], [full[100:]]
    assert close(runner.token_logprobs(prompts, targets), hf_logprobs(hf, prompts, targets), atol=1e-4)
    assert runner.generate([full[:120]], CONTEXT - 120) == hf_greedy(hf, [full[:120]], CONTEXT - 120)


def test_scoring_runs_every_token_but_the_targets_last(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """token_logprobs and loss run prompt + target[:-1] (the last target token's position would only predict
    what follows the target: a 16 x (48 + 1) batch is 768 rows, not 784) and still give HF's answers on the
    whole sequences, one-token targets and ragged ones included."""
    import torch

    from sglang.overlay import runner as runner_module

    runner, hf = pair
    real, ran = runner_module.score, []

    def recording(model_runner, seqs, **kwargs):
        ran.append([list(s) for s in seqs])
        return real(model_runner, seqs, **kwargs)

    monkeypatch.setattr(runner_module, "score", recording)
    prompts, targets = [[2, 11, 12, 13], [2, 40], [2, 7, 8]], [[5], [6, 7, 9], [3, 4]]
    assert close(runner.token_logprobs(prompts, targets), hf_logprobs(hf, prompts, targets), atol=1e-4)
    assert ran == [[p + t[:-1] for p, t in zip(prompts, targets)]]
    assert [runner.scored_length(p, t) for p, t in zip(prompts, targets)] == [4, 4, 4]
    want = torch.cat(hf_logprobs(hf, prompts, targets)).mean().neg().item()
    assert abs(runner.loss(prompts, targets).item() - want) < 1e-5
    assert len(ran) == 2 and ran[1] == ran[0]


def test_a_sequence_larger_than_the_pool_says_which_field_to_raise(pair, tmp_path: Path) -> None:
    from sglang.overlay import RunnerConfig, StandaloneRunner
    from tests.support.runtime import make_tiny_opt

    path = make_tiny_opt(tmp_path / "opt")
    with StandaloneRunner(
        RunnerConfig(model_path=str(path), device="cpu", max_total_tokens=64, distributed="reuse")
    ) as runner:  # the module's runner is alive
        with pytest.raises(
            ValueError,
            match=r"seqs\[1\] needs 100 KV slots, but the runner's KV pool holds 64: "
            r"build the runner with a larger RunnerConfig\(max_total_tokens=...\)",
        ):
            runner.logits([[2, 3], [2] * 100])
        runner.logits([[2] * 64])  # exactly the pool


def test_batches_larger_than_the_pools_run_in_parts(pair) -> None:
    """3 x 100 tokens > 256 KV slots, 6 sequences > 4 request slots: the same answers as one batch
    would give, i.e. HuggingFace's."""
    import torch

    runner, hf = pair
    g = torch.Generator().manual_seed(0)
    seqs = [[2] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in (100, 100, 100, 7, 9, 1)]
    assert close(runner.logits(seqs), hf_logits(hf, seqs), 1e-4)
    prompts, targets = [s[:-3] or [2] for s in seqs], [[5, 6, 7]] * len(seqs)
    got = runner.token_logprobs(prompts, targets)
    want = hf_logprobs(hf, prompts, targets)
    assert close(got, want, 1e-5)
    assert abs(runner.loss(prompts, targets).item() - torch.cat(want).mean().neg().item()) < 1e-5
    gen = [s[:20] for s in seqs]
    assert runner.generate(gen, 5) == hf_greedy(hf, gen, 5)


def _random_call(rng: random.Random):
    """(method, args, what): a random call of the runner's API, valid or broken in one way."""

    def seq(n=None):
        return [2] + [rng.randrange(3, VOCAB) for _ in range((n or rng.randint(1, 60)) - 1)]

    method = rng.choice(["logits"] * 5 + ["token_logprobs"] * 3 + ["loss"] * 2 + ["generate"])
    batch = [seq() for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.15:  # oversize: valid, runs in parts
        batch = [seq(rng.randint(60, 100)) for _ in range(rng.randint(3, 6))]
    if method == "generate":
        batch = [s[:30] for s in batch]
    broken = rng.choice(
        [None] * 10
        + [
            "negative",
            "huge",
            "vocab",
            "empty_seq",
            "empty_batch",
            "str_token",
            "float_token",
            "none_token",
            "str_seq",
            "too_long",
        ]
    )
    i = rng.randrange(len(batch))
    if broken == "negative":
        batch[i][rng.randrange(len(batch[i]))] = -rng.randint(1, 10**6)
    elif broken == "huge":
        batch[i][rng.randrange(len(batch[i]))] = rng.choice([2**31, 2**63, 10**30])
    elif broken == "vocab":
        batch[i][rng.randrange(len(batch[i]))] = VOCAB + rng.randrange(100)
    elif broken == "empty_seq":
        batch[i] = []
    elif broken == "empty_batch":
        batch = []
    elif broken == "str_token":
        batch[i][-1] = "12"
    elif broken == "float_token":
        batch[i][-1] = 12.5
    elif broken == "none_token":
        batch[i][-1] = None
    elif broken == "str_seq":
        batch[i] = "2 3 4"
    elif broken == "too_long":
        batch[i] = seq(CONTEXT + rng.randint(1, 50))
    if method in ("token_logprobs", "loss"):
        targets = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 8))] for _ in batch]
        if broken is None and rng.random() < 0.2:
            targets[rng.randrange(len(targets))] = []
            broken = "empty_target"
        return method, (batch, targets), broken
    if method == "generate":
        new_tokens = rng.choice([1, 2, 3] * 4 + [0, -2])
        if new_tokens < 1 and broken is None:
            broken = "max_new_tokens"
        return method, (batch, new_tokens), broken
    return method, (batch,), broken


def test_fuzz_valid_answers_or_value_errors(pair) -> None:
    import torch

    runner, hf = pair
    rng = random.Random(1234)
    check = [[2, 40, 41, 42], [2, 9]]
    want_check = hf_logits(hf, check)
    counts = {"valid": 0, "errors": 0, "nan": 0}
    nan_param = "model.decoder.final_layer_norm.bias"
    for step in range(240):
        if step % 60 == 30:  # a NaN in a weight: NaN logits on both sides; restored after one call
            sgl_bias = dict(runner.model.named_parameters())[nan_param]
            hf_bias = dict(hf.named_parameters())[nan_param]
            saved = (sgl_bias.data.clone(), hf_bias.data.clone())
            with torch.no_grad():
                sgl_bias[3], hf_bias[3] = math.nan, math.nan
            got = runner.logits(check)
            assert all(g.isnan().all() for g in got) and close(got, hf_logits(hf, check), 1e-4)
            with torch.no_grad():
                sgl_bias.copy_(saved[0])
                hf_bias.copy_(saved[1])
            counts["nan"] += 1
            assert close(runner.logits(check), want_check, 1e-4), "after the NaN weight was restored"
        method, args, broken = _random_call(rng)
        try:
            got = getattr(runner, method)(*args)
        except ValueError as error:
            assert broken is not None, f"step {step}: valid {method} input raised {error}"
            counts["errors"] += 1
            assert close(runner.logits(check), want_check, 1e-4), f"step {step}: after a ValueError ({broken})"
            continue
        assert broken is None, f"step {step}: {method} with {broken} input returned instead of raising ValueError"
        counts["valid"] += 1
        if method == "logits":
            assert close(got, hf_logits(hf, args[0]), 1e-4), f"step {step}"
        elif method == "token_logprobs":
            assert close(got, hf_logprobs(hf, *args), 1e-5), f"step {step}"
        elif method == "loss":
            want = torch.cat(hf_logprobs(hf, *args)).mean().neg().item()
            assert abs(got.item() - want) < 1e-5, f"step {step}"
        else:
            assert got == hf_greedy(hf, *args), f"step {step}"
    print(f"FUZZ {counts}")
    assert counts["valid"] > 80 and counts["errors"] > 60
