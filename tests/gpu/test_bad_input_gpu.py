"""Bad input on the GPU: a ValueError before any kernel, and the CUDA context stays usable.

Before the runner checked its input, a token id >= the vocabulary size reached the embedding lookup
and ended in ``CUDA error: device-side assert triggered``, which kills the CUDA context and everything
in GPU memory; a scoring batch larger than the KV pool failed inside SGLang's scheduler structures.
Here each is tried once on a real runner (opt-125m shape, fp16), and after each the same runner
answers a valid call with the same logits as before. Decode CUDA graphs come from
``RunnerConfig(cuda_graphs=True, cuda_graph_batch_sizes=...)`` and give ``generate`` the eager tokens.
"""

from __future__ import annotations

import pytest

from gpu_shared import common


def test_bad_input_leaves_the_cuda_context_usable():
    import torch

    path = common.checkpoint("opt-125m")
    g = torch.Generator().manual_seed(17)
    probe = [[2] + torch.randint(3, 50000, (63,), generator=g).tolist()]
    big = [[2] + torch.randint(3, 50000, (899,), generator=g).tolist() for _ in range(3)]
    with common.runner(path, "float16", max_total_tokens=1024) as r:
        vocab, pool = r.vocab_size, r.limits.kv_tokens
        before = r.logits(probe)[0]
        for bad, message in [
            ([[2, 5, vocab]], f"= {vocab} is not a token id of this model"),
            ([[2, -7]], "= -7 is not a token id"),
            ([[2] * 2049], "more than the model's context length 2048"),
            (
                probe + [[2] * (pool + 1)],
                rf"seqs\[1\] needs {pool + 1} KV slots, but the runner's KV pool holds {pool}",
            ),
        ]:
            with pytest.raises(ValueError, match=message):
                r.logits(bad)
            torch.cuda.synchronize()
            assert torch.equal(r.logits(probe)[0], before), f"after {message!r}"
        # 3 x 900 tokens > the pool's 1024 slots: three parts, each answer its own batch's
        together = r.logits(big)
        apart = [r.logits([seq])[0] for seq in big]
        for i, (a, b) in enumerate(zip(together, apart)):
            assert torch.equal(a, b), f"sequence {i}: max diff {(a - b).abs().max().item()}"
        torch.cuda.synchronize()
        assert torch.equal(r.logits(probe)[0], before)
        print(f"BAD_INPUT_GPU ok: pool {pool} slots, 3 x 900 tokens in parts", flush=True)


def _decode_logits(standalone_runner, prompts, tokens):
    """next-token logits (fp32, on the CPU) of a prefill and of each decode step fed ``tokens`` (teacher
    forcing: both runners see the same inputs), ``[steps + 1, batch, vocab]``."""
    import torch

    from sglang.overlay.forward import decode, prefill

    vocab = standalone_runner.vocab_size
    fwd = prefill(standalone_runner.runner, prompts)
    out = [fwd.next_token_logits[:, :vocab].float().cpu()]
    for step in range(tokens.shape[1]):
        ids = tokens[:, step].to("cuda")
        out.append(decode(standalone_runner.runner, fwd.batch, ids).next_token_logits[:, :vocab].float().cpu())
    return torch.stack(out)


def test_decode_cuda_graphs_from_the_config():
    """Decode CUDA graphs (RunnerConfig(cuda_graphs=True)) give the eager decode's logits at every step, the
    same tokens fed to both (fp16: within 2e-3 relative; the graph's kernels may differ in rounding), and
    greedy generation runs through them."""
    import torch

    path = common.checkpoint("opt-125m")
    g = torch.Generator().manual_seed(19)
    prompts = [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() for n in (40, 9, 128, 77)]
    with common.runner(path, "float16") as eager:
        tokens = torch.tensor(eager.generate(prompts, 8))
        want = _decode_logits(eager, prompts, tokens)
    with common.runner(path, "float16", cuda_graphs=True, cuda_graph_batch_sizes=(1, 2, 4, 8)) as graphed:
        runner = graphed.runner
        assert (
            getattr(runner, "decode_cuda_graph_runner", None) or getattr(runner, "cuda_graph_runner", None)
        ) is not None, "no decode CUDA graph runner"
        got = _decode_logits(graphed, prompts, tokens)
        generated = graphed.generate(prompts, 8)
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(got, want)]
    print(f"DECODE_GRAPHS relative logit difference per step {[f'{x:.1e}' for x in rel]}", flush=True)
    assert max(rel) <= 2e-3, rel
    assert len(generated) == len(prompts) and all(len(x) == 8 for x in generated)
