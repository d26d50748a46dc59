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

from tests.gpu import common


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


def test_decode_cuda_graphs_from_the_config():
    import torch

    path = common.checkpoint("opt-125m")
    g = torch.Generator().manual_seed(19)
    prompts = [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() for n in (40, 9, 128, 77)]
    with common.runner(path, "float16") as eager:
        want = eager.generate(prompts, 8)
    with common.runner(path, "float16", cuda_graphs=True, cuda_graph_batch_sizes=(1, 2, 4, 8)) as graphed:
        runner = graphed.runner
        assert (
            getattr(runner, "decode_cuda_graph_runner", None) or getattr(runner, "cuda_graph_runner", None)
        ) is not None, "no decode CUDA graph runner"
        got = graphed.generate(prompts, 8)
    agree = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) / sum(map(len, want))
    print(f"DECODE_GRAPHS agreement with eager {agree:.3f}", flush=True)
    assert agree >= 0.95  # fp16: a graph's kernels may round a near-tie differently
