"""sglang.overlay: the in-process runner API on a real ModelRunner (CPU, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.ranks import PROMPTS, TARGETS, TP_SEQS, run_ranks

pytestmark = pytest.mark.sglang


def hf_model(path: Path):
    import torch
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def runner(tiny_opt: Path):
    from sglang.overlay import RunnerConfig, StandaloneRunner

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


def test_scoring_falls_back_to_the_runner_where_the_dense_path_does_not_run(runner) -> None:
    """On the CPU the dense scoring engine declines (its GPU test covers it): the scoring path then runs
    ModelRunner.forward and hands over the same hidden states as prefill(all_positions=True)."""
    import torch

    from sglang.overlay import compat, forward

    assert runner.engine is not None  # the native OPT gets an engine; it declines CPU batches
    fwd = forward.prefill(runner.runner, PROMPTS, all_positions=True)
    forward_batch = compat.forward_batch_of(runner.runner, forward.extend_batch(runner.runner, PROMPTS))
    assert runner.engine.forward(forward_batch, runner.runner.token_to_kv_pool, write_kv=False) is None
    scored = forward.score(runner.runner, PROMPTS, engine=runner.engine)
    assert scored.batch is None and scored.logits_output is None and scored.lm_head is runner.model.lm_head
    assert torch.equal(scored.every_hidden_state(), fwd.every_hidden_state())


def test_generate_matches_huggingface_greedy(runner, tiny_opt: Path) -> None:
    """generate() keeps the token ids on the device between decode steps; the tokens are HF's greedy ones."""
    import torch

    hf = hf_model(tiny_opt)
    prompts = [[2, 10, 20, 30], [2, 7], [2, 100, 101, 102, 103]]
    ours = runner.generate(prompts, max_new_tokens=6)
    with torch.no_grad():
        for prompt, got in zip(prompts, ours):
            ids = torch.tensor([prompt])
            want = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                pad_token_id=1,
            )[0, len(prompt) :].tolist()
            assert got == want, (prompt, got, want)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        runner.generate(prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="context length"):
        runner.generate([[2] * 10], max_new_tokens=runner.runner.model_config.context_len)


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
    params = dict(runner.model.named_parameters())
    state = {}
    for name in hf.state_dict():
        for proj, index in (("q_proj", 0), ("k_proj", 1), ("v_proj", 2)):
            if f".{proj}." in name:
                fused = params[name.replace(proj, "qkv_proj")]
                state[name] = fused.chunk(3, dim=0)[index]
                break
        else:
            state[name] = params.get(
                name, params.get(name.replace("lm_head.weight", "model.decoder.embed_tokens.weight"))
            )
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return hf


def test_a_failed_build_leaves_nothing_behind(tiny_opt: Path, tmp_path: Path) -> None:
    """A build that fails after torch.distributed and SGLang's groups exist (here: a checkpoint whose fc1 is
    not the config's shape, refused while loading) tears them down before the error leaves
    StandaloneRunner(...), so the next runner builds (it was refused: 'already exist in this process')."""
    import json
    import shutil

    from sglang.overlay import RunnerConfig, StandaloneRunner, compat

    broken = tmp_path / "broken"
    shutil.copytree(tiny_opt, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "ffn_dim": 96}))
    with pytest.raises(ValueError, match=r"fc1.*\(96, 64\)|\(96, 64\).*fc1|fc1"):
        StandaloneRunner(RunnerConfig(model_path=str(broken), device="cpu")).close()
    assert not compat.distributed_exists(), "the failed build left its distributed state behind"
    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu")) as runner:
        assert runner.logits([[2, 5, 6]])[0].shape[0] == 3


def test_a_memory_error_names_the_field_to_raise(tiny_opt: Path) -> None:
    """SGLang's 'Raise --mem-fraction-static' (a server flag the API does not have; 'GPU' on the CPU) becomes a
    SettingError naming RunnerConfig's field, on every release's wording (0.5.13's RuntimeError, 0.5.17+'s
    ValueError): here a static fraction of 1e-9 leaves the KV pool no room."""
    from sglang.overlay import RunnerConfig, StandaloneRunner, compat
    from sglang.overlay.config import SettingError

    try:
        built = StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", mem_fraction_static=1e-9))
    except SettingError as error:
        message = str(error)
    else:  # the machine's free memory grew while the model loaded (other processes): no error to check
        built.close()
        pytest.skip("free memory grew during the load, so SGLang found room at a fraction of 1e-9")
    assert message.startswith(
        "the model's weights leave no memory for the KV cache with "
        "RunnerConfig(mem_fraction_static=1e-09): SGLang sizes the KV pool from the machine's "
        "free memory"
    ), message
    assert "--mem-fraction-static" in message.split("SGLang said:")[1]
    assert not compat.distributed_exists()


def test_a_second_fresh_runner_is_refused_and_reuse_works(runner, tiny_opt: Path) -> None:
    import torch

    from sglang.overlay import RunnerConfig, StandaloneRunner

    with pytest.raises(ValueError, match="already exist in this process"):
        StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu"))
    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", distributed="reuse")) as second:
        assert all(torch.equal(a, b) for a, b in zip(runner.logits(PROMPTS), second.logits(PROMPTS)))
    assert torch.distributed.is_initialized(), "the first runner is still alive"


def test_closing_the_last_runner_destroys_the_distributed_setup(tiny_opt: Path) -> None:
    import torch

    from sglang.overlay import RunnerConfig, StandaloneRunner

    with StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu")):
        assert torch.distributed.is_initialized()
    assert not torch.distributed.is_initialized()


def test_runners_leave_the_callers_own_world_alive(tiny_opt: Path) -> None:
    """Runners built with reuse on the caller's init_process_group destroy only what they created:
    after both close, the caller's world is there and its all-reduce works; reuse was not passed
    through the environment."""
    import os

    import torch
    import torch.distributed as dist

    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.compat import free_port
    from sglang.srt.distributed import parallel_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    try:
        first = StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", distributed="reuse"))
        second = StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", distributed="reuse"))
        assert "SGLANG_ALLOW_REUSE_DISTRIBUTED" not in os.environ
        assert all(torch.equal(a, b) for a, b in zip(first.logits(PROMPTS), second.logits(PROMPTS)))
        first.close()
        second.close()
        assert dist.is_initialized()
        assert not parallel_state.model_parallel_is_initialized(), "the runners' own groups are destroyed"
        value = torch.ones(3)
        dist.all_reduce(value)
        assert value.tolist() == [1.0, 1.0, 1.0]
    finally:
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(device="tpu"), "device 'tpu' is not one of"),
        (dict(dtype="int8"), "dtype 'int8' is not one of"),
        (dict(device="cpu", attention_backend="triton"), "does not run on CPU"),
        (dict(mem_fraction_static=1.5), r"mem_fraction_static must be in \(0, 1\]"),
        (dict(max_running_requests=0), "max_running_requests must be >= 1"),
        (dict(distributed="share"), "distributed must be 'fresh' or 'reuse'"),
        (dict(prefill_graphs=-1), "prefill_graphs must be >= 0"),
        (dict(device="cpu", prefill_graphs=2), "prefill_graphs are CUDA graphs"),
        (dict(dense_engine="no"), "dense_engine must be True or False, got 'no'"),
        (dict(dense_engine=False, prefill_graphs=2), r"prefill_graphs are the dense engine's .* dense_engine=True"),
    ],
)
def test_invalid_configs_say_what_is_wrong(tiny_opt: Path, fields: dict, message: str) -> None:
    from sglang.overlay import RunnerConfig

    with pytest.raises(ValueError, match=message):
        RunnerConfig(model_path=str(tiny_opt), **fields).resolved()


def test_a_directory_without_a_model_is_refused(tmp_path: Path) -> None:
    from sglang.overlay import RunnerConfig

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


# --------------------------------------------------------------------------- tensor parallelism


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tp_size=0), "tp_size must be >= 1"),
        (dict(tp_size=2, tp_rank=2, dist_port=29500), r"tp_rank must be in \[0, tp_size\) = \[0, 2\), got 2"),
        (dict(tp_rank=-1), r"tp_rank must be in \[0, tp_size\) = \[0, 1\), got -1"),
        (dict(tp_size=2, tp_rank=1), "tp_size=2 needs dist_port"),
        (dict(dist_port=70000), r"dist_port must be a TCP port in \[1, 65535\]"),
    ],
)
def test_invalid_tensor_parallel_configs_say_what_to_do(
    tiny_opt: Path, fields: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sglang.overlay import RunnerConfig

    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    with pytest.raises(ValueError, match=message):
        RunnerConfig(model_path=str(tiny_opt), device="cpu", **fields).resolved()


def test_tensor_parallel_fields_resolve(tiny_opt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.overlay.config import RunnerConfig, make_server_args

    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    config = RunnerConfig(model_path=str(tiny_opt), device="cpu", tp_size=2, tp_rank=1, dist_port=29500).resolved()
    assert (config.tp_size, config.tp_rank, config.dist_port) == (2, 1, 29500)
    assert make_server_args(config).tp_size == 2
    # 'reuse' keeps the existing world, so it needs no port; a matching server_args tp_size is accepted.
    RunnerConfig(
        model_path=str(tiny_opt), device="cpu", tp_size=2, tp_rank=1, distributed="reuse", server_args={"tp_size": 2}
    ).resolved()
    assert make_server_args(RunnerConfig(model_path=str(tiny_opt), device="cpu")).tp_size == 1


def test_tensor_parallel_needs_the_gpus_and_cpu_cores(tiny_opt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from sglang.overlay import RunnerConfig
    from sglang.overlay import config as overlay_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(
        ValueError,
        match=r"tp_size=2 on CUDA puts rank r on GPU r, but torch sees 1 GPU\(s\) "
        r"\(CUDA_VISIBLE_DEVICES='3'\): make 2 GPUs visible",
    ):
        RunnerConfig(model_path=str(tiny_opt), device="cuda", tp_size=2, dist_port=29500).validate()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    RunnerConfig(model_path=str(tiny_opt), device="cuda", tp_size=2, tp_rank=1, dist_port=29500).validate()

    cpu = RunnerConfig(model_path=str(tiny_opt), device="cpu", tp_size=2, dist_port=29500)
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(overlay_config, "_numa_nodes", lambda: 1)
    with pytest.raises(ValueError, match="this machine has 1; set SGLANG_CPU_OMP_THREADS_BIND"):
        cpu.validate()
    monkeypatch.setattr(overlay_config, "_numa_nodes", lambda: 2)
    cpu.validate()
    monkeypatch.setattr(overlay_config, "_numa_nodes", lambda: 1)
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    cpu.validate()


def test_a_runner_takes_tp_size_from_the_config_not_server_args(tiny_opt: Path) -> None:
    from sglang.overlay import RunnerConfig, StandaloneRunner

    with pytest.raises(
        ValueError,
        match=r"server_args sets tp_size=2, the config tp_size=1: set it with "
        r"RunnerConfig\(tp_size=...\)",
    ):
        StandaloneRunner(RunnerConfig(model_path=str(tiny_opt), device="cpu", server_args={"tp_size": 2}))


def test_reuse_of_a_world_of_another_layout_is_refused(runner, tiny_opt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.overlay import RunnerConfig, StandaloneRunner

    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    with pytest.raises(
        ValueError,
        match=r"existing torch.distributed world \(world size 1, rank 0\), which is not "
        r"this runner's layout \(tp_size=2, tp_rank=1\)",
    ):
        StandaloneRunner(
            RunnerConfig(model_path=str(tiny_opt), device="cpu", tp_size=2, tp_rank=1, distributed="reuse")
        )


@pytest.mark.slow
def test_tp2_matches_tp1_on_cpu(runner, tiny_opt: Path, tmp_path: Path) -> None:
    """Two processes (gloo), one rank each: the same logits, log-probs and greedy tokens as one rank.

    The vocab-parallel head's logits are gathered over the TP group on every rank."""
    import torch

    want_logits = runner.logits(TP_SEQS)
    want_logprobs = runner.token_logprobs(PROMPTS, TARGETS)
    want_generated = runner.generate(PROMPTS, 3)
    runner.close()  # the ranks run in their own interpreters; free this one's cores

    ranks = run_ranks("tp_rank_main", tiny_opt, tmp_path)
    vocab = want_logits[0].shape[-1]
    for res in ranks:
        assert res["shard_rows"] < vocab, "the head is not sharded: not a TP=2 run"
        for got, reused, want in zip(res["logits"], res["reused_logits"], want_logits):
            assert got.shape == want.shape
            assert ((got - want).norm() / want.norm()).item() <= 1e-5
            assert torch.equal(got, reused)
        for got, want in zip(res["logprobs"], want_logprobs):
            assert torch.allclose(got, want, atol=1e-5), (got, want)
        assert res["generated"] == want_generated
        assert res["closed"] is True
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["logits"], ranks[1]["logits"]))


def test_cuda_graph_fields_mean_the_same_on_every_release(tiny_opt: Path) -> None:
    """RunnerConfig(cuda_graphs, cuda_graph_batch_sizes) become this release's own ServerArgs fields."""
    import inspect

    from sglang.overlay import RunnerConfig, compat
    from sglang.srt.server_args import ServerArgs

    fields = compat.decode_graph_server_args([1, 8, 64])
    assert set(fields) <= set(inspect.signature(ServerArgs).parameters), fields
    assert [1, 8, 64] in fields.values()
    assert compat.decode_graph_server_args(None).get("cuda_graph_bs_decode", None) is None
    with pytest.raises(ValueError, match="cuda_graphs are CUDA graphs"):
        RunnerConfig(model_path=str(tiny_opt), device="cpu", cuda_graphs=True).validate()
    with pytest.raises(ValueError, match="cuda_graph_batch_sizes is given but cuda_graphs is False"):
        RunnerConfig(model_path=str(tiny_opt), device="cpu", cuda_graph_batch_sizes=(1, 2)).validate()
