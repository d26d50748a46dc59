"""The native OPT's GPU fast paths against the plain computation they replace.

- ``add_layernorm.add_layer_norm`` (residual add + LayerNorm in one Triton kernel) against torch's
  add and ``layer_norm``;
- ``sglang.overlay.logprobs.gather_logprobs`` (one-read log-sum-exp) against ``log_softmax(logits.float())``;
- prefill CUDA graphs (``RunnerConfig(prefill_graphs=...)``): the eager run, the capture and the
  replays give the same hidden states, ragged lengths included, a replay sees an in-place
  weight update (MeZO's case), and assigning a new Parameter drops the graphs;
- the scoring path (``forward.final_hidden_states`` / ``score`` on the dense engine: no
  attention-backend metadata, no LogitsProcessor) gives the engine's eager hidden states bit for bit
  from graphs; without ``keep_kv`` it leaves the KV pool untouched, with it it writes the K/V (the
  engine against ModelRunner.forward: test_opt_gpu.py::test_dense_engine_matches_backend); ``score``
  hands the token ids to the engine without a ForwardBatch, and a loss is queued without waiting
  for the GPU;
- MeZO's noise-pass kernel against its torch definition;
- ``StandaloneRunner.generate`` (token ids kept on the device) against one decode step at a time
  with a host round trip per token (tests/support/logits.decode).
"""

from __future__ import annotations

import pytest

from gpu_shared import common


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hidden,affine", [(768, True), (1024, True), (2048, True), (4096, True), (512, False)])
def test_add_layer_norm_matches_torch(hidden, affine, dtype):
    import torch
    import torch.nn.functional as F

    from sglang.srt.layers.add_layernorm import add_layer_norm

    g = torch.Generator(device="cuda").manual_seed(hidden)
    dt = getattr(torch, dtype)
    x = torch.randn(3000, hidden, device="cuda", generator=g).to(dt)
    residual = (4 * torch.randn(3000, hidden, device="cuda", generator=g)).to(dt)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dt) if affine else None
    bias = (0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dt) if affine else None
    out, summed = add_layer_norm(x, residual, weight, bias, 1e-5, want_sum=True)
    ref_sum = residual + x
    ref = F.layer_norm(ref_sum, (hidden,), weight, bias, 1e-5)
    assert torch.equal(summed, ref_sum)
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10  # one unit in the last place at magnitude 1
    err = (out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1)
    print(
        f"ADD_LN {hidden} {dtype} affine={affine}: max err {err.max().item():.2e} ulp, "
        f"{(out != ref).float().mean().item():.2%} differ",
        flush=True,
    )
    assert err.max().item() <= ulp
    out_only, none = add_layer_norm(x, residual, weight, bias, 1e-5, want_sum=False)
    assert none is None and torch.equal(out_only, out)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gather_logprobs_matches_log_softmax(dtype):
    import torch

    from sglang.overlay.logprobs import gather_logprobs

    g = torch.Generator(device="cuda").manual_seed(3)
    logits = (3 * torch.randn(1537, 50272, device="cuda", generator=g)).to(getattr(torch, dtype))
    logits[5, 17] = 40  # one dominant logit
    targets = torch.randint(0, 50272, (1537,), device="cuda", generator=g)
    targets[5] = 17
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]
    got = gather_logprobs(logits, targets)
    err = (got - ref).abs().max().item()
    print(f"GATHER_LOGPROBS {dtype}: max abs err {err:.2e}", flush=True)
    assert got.dtype == torch.float32 and err <= 2e-5
    assert gather_logprobs(logits[:0], targets[:0]).shape == (0,)


def _hidden(standalone_runner, seqs):
    from sglang.overlay.forward import score

    return score(standalone_runner.runner, seqs, engine=standalone_runner.engine).every_hidden_state().clone()


@pytest.mark.parametrize("shape", ["opt-125m", "opt-350m"])
def test_prefill_graphs_replay_eager(shape):
    import torch

    from sglang.overlay.graphs import enable_graphs

    path = common.checkpoint(shape)
    g = torch.Generator().manual_seed(11)
    equal = [[2] + torch.randint(3, 50000, (255,), generator=g).tolist() for _ in range(4)]
    ragged = [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() for n in (300, 7, 128, 1)]
    with common.runner(path, "float16", prefill_graphs=4) as r:
        graphs = r.engine.graphs
        for seqs in (equal, ragged):
            runs = [_hidden(r, seqs) for _ in range(4)]  # eager, capture + replay, replay, replay
            assert (tuple(map(len, seqs)), False) in graphs.graphs, "no graph was captured"
            for i, out in enumerate(runs[1:], 1):
                assert torch.equal(out, runs[0]), f"run {i}: max diff {(out - runs[0]).abs().max().item()}"
        # An in-place weight update (what MeZO does) is seen by the replay.
        before = _hidden(r, equal)
        with torch.no_grad():
            r.model.model.decoder.layers[0].fc2.bias.add_(0.25)
        replayed = _hidden(r, equal)
        # Assigning a new Parameter (not an in-place update) drops the graphs; they are captured again.
        fc2 = r.model.model.decoder.layers[1].fc2
        original = fc2.bias
        fc2.bias = torch.nn.Parameter(original + 0.5, requires_grad=False)
        assigned = [_hidden(r, equal) for _ in range(3)]  # eager, capture + replay, replay
        enable_graphs(r.engine, 0)
        eager = _hidden(r, equal)
        fc2.bias = original
        eager_restored = _hidden(r, equal)
    assert not torch.equal(replayed, before)
    assert torch.equal(eager_restored, replayed), f"max diff {(eager_restored - replayed).abs().max().item()}"
    assert not torch.equal(assigned[0], replayed)
    for i, out in enumerate(assigned):
        assert torch.equal(out, eager), f"after the assignment, run {i}: max diff {(out - eager).abs().max().item()}"


def _model(name: str):
    """An OPT shape's checkpoint, or a family's small one (tests/gpu/test_families_gpu.py): the dense engine
    of OPT (dense_opt) or of the Llama-style families (dense_llama: llama3 with GQA and rope scaling, qwen3
    with q/k norms)."""
    return common.family_checkpoint(name) if name in common.SMALL_FAMILY_SHAPES else common.checkpoint(name)


@pytest.mark.parametrize("model", ["opt-125m", "llama3", "qwen3"])
@pytest.mark.parametrize("graphs", [0, 4])
def test_scoring_path_keeps_or_skips_the_kv(graphs, model):
    import torch

    from sglang.overlay import compat, forward

    path = _model(model)
    g = torch.Generator().manual_seed(13)
    equal = [[2] + torch.randint(3, 30000, (199,), generator=g).tolist() for _ in range(3)]
    ragged = [[2] + torch.randint(3, 30000, (n - 1,), generator=g).tolist() for n in (90, 1, 257)]
    with common.runner(path, "float16", prefill_graphs=graphs) as r:
        runner, engine = r.runner, r.engine
        for seqs in (equal, ragged):
            fb = compat.forward_batch_of(runner, forward.extend_batch(runner, seqs))
            key = runner.token_to_kv_pool.get_key_buffer(0)
            ref = engine.run(fb.input_ids, fb.positions, _plan(engine, fb, runner, write_kv=True)).clone()
            ref_key = key[fb.out_cache_loc].clone()
            key[fb.out_cache_loc] = 0
            for i in range(3):  # eager, then (graphs) capture + replay, replay
                hidden, head = forward.final_hidden_states(runner, fb, engine=engine, keep_kv=False)
                assert head is r.model.lm_head
                assert torch.equal(hidden, ref), f"run {i}: max diff {(hidden - ref).abs().max().item()}"
            assert not key[fb.out_cache_loc].any(), "keep_kv=False wrote K/V"
            for i in range(3):
                hidden, _ = forward.final_hidden_states(runner, fb, engine=engine, keep_kv=True)
                assert torch.equal(hidden, ref), f"keep_kv run {i}: max diff {(hidden - ref).abs().max().item()}"
            assert torch.equal(key[fb.out_cache_loc], ref_key)
            if graphs:
                assert {(tuple(map(len, seqs)), False), (tuple(map(len, seqs)), True)} <= set(engine.graphs.graphs)
            key[fb.out_cache_loc] = 0
            for i in range(3):  # the token ids straight to the engine (DenseEngine.score), no ForwardBatch
                scored = forward.score(runner, seqs, engine=engine)
                assert scored.batch is None and scored.lm_head is r.model.lm_head
                assert torch.equal(scored.every_hidden_state(), ref), f"score run {i}: max diff " + str(
                    (scored.every_hidden_state() - ref).abs().max().item()
                )
            assert not key[fb.out_cache_loc].any(), "score wrote K/V"


@pytest.mark.parametrize("model", ["opt-125m", "llama3"])
@pytest.mark.parametrize("graphs,bucket", [(0, 0), (4, 0), (4, 8)])  # bucket 0: ragged lengths
def test_loss_is_queued_without_waiting_for_the_gpu(graphs, bucket, model):
    """A scoring call queues its work and returns: MeZO's trainer queues a weight pass and the next
    forward while the GPU still runs the last one, and reads the two losses back once. torch's sync
    debug mode raises on any operation that waits for the GPU (a ScheduleBatch's preparation, a copy
    from pageable memory, ``.item()``)."""
    import torch

    path = _model(model)
    g = torch.Generator().manual_seed(17)
    prompts = [[2] + torch.randint(3, 30000, (n,), generator=g).tolist() for n in (47, 30, 47, 12)]
    targets = [[int(t)] for t in torch.randint(3, 30000, (4,), generator=g)]
    with common.runner(path, "bfloat16", prefill_graphs=graphs, graph_bucket=bucket) as r:
        expected = [r.loss(prompts, targets) for _ in range(3)]  # eager, then (graphs) capture + replay
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = r.loss(prompts, targets)
            logprobs = r.token_logprobs(prompts, targets)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(loss, expected[-1]) and torch.isfinite(loss)
        assert torch.equal(-torch.cat(logprobs).mean(), loss)


def _plan(engine, forward_batch, runner, write_kv: bool):
    from sglang.overlay.dense import DensePrefill

    weight = engine.decoder.embed_tokens.weight
    plan = DensePrefill.plan(
        forward_batch, engine.attention, weight.dtype, weight.device, runner.token_to_kv_pool, write_kv
    )
    assert plan is not None, "the engine declined the batch"
    return plan


def test_generate_matches_stepwise_decode():
    import torch

    from tests.support import logits as L

    path = common.checkpoint("opt-125m")
    g = torch.Generator().manual_seed(21)
    prompts = [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() for n in (40, 9, 128)]
    with common.runner(path, "float16") as r:
        generated = r.generate(prompts, 12)
        first = L.prefill(r.runner, prompts)
        step = first.next_token_logits.argmax(-1).tolist()
        stepwise = [[t] for t in step]
        for _ in range(11):
            step = L.decode(r.runner, first.batch, step).argmax(-1).tolist()
            for out, t in zip(stepwise, step):
                out.append(t)
        with pytest.raises(ValueError, match="context length"):
            r.generate([[2] * 2000], 100)
    assert generated == stepwise


@pytest.mark.parametrize("layout", [0, 1, 2], ids=["joined", "rows_of_four", "vectors_of_four"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zo_noise_kernel_matches_definition(dtype, layout):
    """MeZO's pass kernel (sglang.overlay.mezo.noise, its default functions, each block layout) against the
    torch definition on the GPU: two streams, decay, a column-sharded tensor, offsets past 2^32, a view whose
    offset and length are aligned to 4 elements and its address is not (layout 2 must leave it to layout 1:
    a vector access there is a misaligned address); fp32 within 2e-6, half precision equal after rounding
    except where the fp32 results straddle a rounding boundary."""
    import torch

    from sglang.overlay.mezo.noise import NoisePass, Stream

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = {"emb": (5003, 64), "qkv": (3 * 768, 768), "cols": (768, 1536), "bias": (7,), "view": (64, 96)}
    shapes["fc"] = (1024, 768)  # aligned, its Philox counters carrying into the high word
    base = {"emb": (1 << 33) - 5, "qkv": (1 << 34) + 6, "cols": 1 << 35, "bias": 11, "view": (1 << 36) - 4096}
    base["fc"] = (1 << 34) - 4096
    rows = {"cols": (1536, 3072)}
    start = {k: torch.randn(s, device="cuda", generator=g).to(dt) for k, s in shapes.items()}
    ref = {k: v.clone() for k, v in start.items()}
    ker = {k: v.clone() for k, v in start.items()}
    unaligned = torch.zeros(2 + start["view"].numel(), device="cuda", dtype=dt)
    ker["view"] = unaligned[2:].view_as(start["view"])
    ker["view"].copy_(start["view"])
    streams = [Stream(0x123456789ABC, 0.25, -0.5), Stream(42, 0.0, 1e-2)]
    NoisePass(ref, base, decays=["emb", "fc"], rows=rows)._torch_pass(streams, 0.75)
    kernel = NoisePass(ker, base, decays=["emb", "fc"], rows=rows)
    assert kernel.uses_kernel()
    kernel._kernel_pass(streams, 0.75, fast=NoisePass.FAST, layout=layout)
    for name in shapes:
        diff = (ker[name].float() - ref[name].float()).abs().max().item()
        differ = (ker[name] != ref[name]).float().mean().item()
        print(f"ZO_NOISE {dtype} {name}: max diff {diff:.2e}, {differ:.4%} differ", flush=True)
        if dtype == "float32":
            assert diff <= 2e-6
        else:
            assert differ <= 1e-3 and diff <= 2 * (2**-7 if dtype == "bfloat16" else 2**-10) * 8


Z_VARIANTS = [
    (0, 0, 2e-6),
    (1, 0, 4e-6),
    (2, 0, 4e-6),
    (1, 1, 4e-6),
    (2, 1, 4e-6),
    (2, 2, 4e-6),
]  # (FAST, LAYOUT, bound)


@pytest.mark.parametrize("fast, layout, bound", Z_VARIANTS)
def test_zo_noise_kernel_z_is_within_its_bound_of_the_definition(fast, layout, bound):
    """z itself (fp32 zeros + z) from each kernel variant the trainer may run: precise (FAST = 0), the
    hardware's sin / cos (1), and its log with a polynomial near u = 1 (2), in each block layout, against
    the torch definition over 4M offsets whose Philox counters cross 2^32."""
    import torch

    from sglang.overlay.mezo.noise import NoisePass, Stream, normal

    assert (NoisePass.FAST, NoisePass.LAYOUT) in {(f, lay) for f, lay, _ in Z_VARIANTS}, "the default is untested"
    n, base = 1 << 22, (1 << 34) - (1 << 21)
    z = {"w": torch.zeros(n, device="cuda")}
    NoisePass(z, {"w": base})._kernel_pass([Stream(99, 1.0, 0.0)], 1.0, fast=fast, layout=layout)
    want = normal(99, torch.arange(base, base + n, device="cuda"))
    diff = (z["w"] - want).abs().max().item()
    print(f"ZO_NOISE z fast={fast} layout={layout}: max |kernel - definition| {diff:.2e}", flush=True)
    assert diff <= bound


def test_scoring_batches_padded_to_a_bucket_share_one_graph():
    """The runner's default keeps prefill graphs on and pads a scoring batch at its end to a multiple of
    graph_bucket (8): two MeZO-like batches of 16 x (49 ± 6) tokens share one captured graph, and their losses
    equal an unpadded, graph-less runner's (the padding follows every real token: causal attention leaves
    their scores as they were; only the GEMM shapes differ)."""
    import torch

    path = common.checkpoint("opt-125m")
    g = torch.Generator().manual_seed(17)
    batches = []
    for _ in range(2):
        lengths = torch.randint(43, 56, (16,), generator=g).tolist()
        prompts = [[2] + torch.randint(3, 50000, (n - 2,), generator=g).tolist() for n in lengths]
        targets = [[int(torch.randint(3, 50000, (1,), generator=g))] for _ in lengths]
        batches.append((prompts, targets))
    with common.runner(path, "float16", prefill_graphs=0, graph_bucket=0) as plain:
        want = [plain.loss(p, t).item() for p, t in batches]
    common.free_cuda()
    with common.runner(path, "float16", prefill_graphs=None) as r:
        assert r.engine.graphs is not None, "prefill graphs are on by default for OPT on CUDA"
        got = [[r.loss(p, t).item() for p, t in batches] for _ in range(3)]
        keys = list(r.engine.graphs.graphs)
    assert keys == [((56,) * 16, False)], keys
    for run in got:
        for a, b in zip(run, want):
            assert abs(a - b) <= 2e-3 * abs(b), (run, want)
