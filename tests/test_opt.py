"""SGLang's native OPT model (python/sglang/srt/models/opt.py) on a real ModelRunner.

Each test builds a CPU fp32 ModelRunner on a tiny random OPT checkpoint (every
bias and LayerNorm parameter random too) and compares it with HF
``OPTForCausalLM`` on the same weights: logits at every position of a batch of
unequal lengths, then one decode step against HF's ``past_key_values``. Broken
checkpoints and configs must fail loudly; the flows that load a subset on
purpose (dummy weights then updates, fp8 KV-cache scales) work; pipeline ranks:
tests/test_opt_pipeline.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# torch, transformers and sglang are imported inside the tests: without
# SGLANG_OVERLAY_RELEASE these tests are skipped and the interpreter may lack them.
pytestmark = pytest.mark.sglang

TOL = 1e-5
SEQS = [[2, 5, 7, 9, 11, 13, 17, 19, 23], [2, 100, 200], [2, *range(300, 316)], [2, 42]]

VARIANTS = {
    # id: (OPTConfig overrides, checkpoint layout)
    "pre_ln": ({}, "safetensors"),
    "post_ln_project_in_out": (dict(do_layer_norm_before=False, word_embed_proj_dim=32), "safetensors"),
    "untied_head": (dict(tie_word_embeddings=False), "safetensors"),
    "no_bias": (dict(enable_bias=False), "safetensors"),
    "no_elementwise_affine": (dict(layer_norm_elementwise_affine=False), "safetensors"),
    "remove_final_layer_norm": (dict(_remove_final_layer_norm=True), "safetensors"),
    "gelu": (dict(activation_function="gelu"), "safetensors"),
    "decoder_names": ({}, "decoder_names"),
    "bin": ({}, "bin"),
    "sharded": (dict(tie_word_embeddings=False), "sharded"),
    "sharded_bin": ({}, "sharded_bin"),
}


@pytest.fixture
def build():
    """Builds ModelRunners; tears torch.distributed down after the test."""
    from tests.support import runtime

    built = []

    def _build(model_path: Path, **server_args):
        built.append(model_path)
        return runtime.build_runner(model_path, **server_args)

    yield _build
    if built:
        runtime.destroy_distributed()


def hf_model(model_dir: Path):
    import torch
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_at_every_position_and_after_decode(variant, build, tmp_path):
    import torch

    from tests.support import checkpoints, logits, runtime

    overrides, layout = VARIANTS[variant]
    src = runtime.make_tiny_opt(tmp_path / "src", seed=1, **overrides)
    runner = build(checkpoints.relayout(src, tmp_path / layout, layout))
    assert type(runner.model).__module__ == "sglang.srt.models.opt"
    hf = hf_model(src)

    prefill = logits.prefill(runner, SEQS)
    next_ids, hf_decode = [], []
    diffs = {"prefill": 0.0, "last": 0.0, "decode": 0.0}
    with torch.no_grad():
        for i, seq in enumerate(SEQS):
            out = hf(torch.tensor([seq]), use_cache=True)
            diffs["prefill"] = max(diffs["prefill"], max_diff(prefill.logits[i], out.logits[0]))
            diffs["last"] = max(diffs["last"], max_diff(prefill.next_token_logits[i], out.logits[0, -1]))
            next_id = int(out.logits[0, -1].argmax())
            step = hf(torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True)
            next_ids.append(next_id)
            hf_decode.append(step.logits[0, -1])
    decoded = logits.decode(runner, prefill.batch, next_ids)
    diffs["decode"] = max(max_diff(decoded[i], hf_decode[i]) for i in range(len(SEQS)))
    print(f"OPT parity {variant}: " + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs

    model = runner.model
    state = hf.state_dict()
    embed = state["model.decoder.embed_tokens.weight"]
    assert model.get_input_embeddings() is model.model.decoder.embed_tokens
    got_embed, got_head = model.get_embed_and_head()
    assert torch.equal(got_embed[: embed.shape[0]], embed)
    assert torch.equal(got_head[: embed.shape[0]], state["lm_head.weight"])
    for name in ("decoder.layers.1.self_attn.v_proj.weight", "model.decoder.layers.0.fc2.weight", "lm_head.weight"):
        assert torch.equal(torch.tensor(model.get_weights_by_name(name, truncate_size=8)), state[canonical(name)][:8])


def canonical(name: str) -> str:
    return "model." + name if name.startswith("decoder.") else name


def _drop(name):
    return lambda state: state.pop(name)


def _add(name, shape):
    def mutate(state):
        import torch

        state[name] = torch.zeros(shape)

    return mutate


def _grow_rows(name):
    def mutate(state):
        import torch

        state[name] = torch.cat([state[name], state[name][:1]])

    return mutate


BROKEN = {
    # id: (OPTConfig overrides, mutation, the name the error must give)
    "missing": (
        {},
        _drop("model.decoder.layers.1.self_attn.k_proj.bias"),
        "model.decoder.layers.1.self_attn.k_proj.bias",
    ),
    "missing_untied_head": (dict(tie_word_embeddings=False), _drop("lm_head.weight"), "lm_head.weight"),
    "unexpected": (
        {},
        _add("model.decoder.layers.0.mlp.gate_proj.weight", (128, 64)),
        "model.decoder.layers.0.mlp.gate_proj.weight",
    ),
    "misshaped": ({}, _grow_rows("model.decoder.layers.0.fc1.weight"), "model.decoder.layers.0.fc1.weight"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_raises_naming_the_tensor(case, build, tmp_path):
    from tests.support import checkpoints, runtime

    overrides, mutate, name = BROKEN[case]
    src = runtime.make_tiny_opt(tmp_path / "src", **overrides)
    broken = checkpoints.mutated(src, tmp_path / "broken", mutate)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        build(broken)


def test_activations_match_hf_act2fn():
    import torch
    from transformers.activations import ACT2FN

    from sglang.srt.models.opt import _ACTIVATIONS, get_activation

    x = torch.linspace(-6, 6, 1001)
    for name in _ACTIVATIONS:
        assert max_diff(get_activation(name)(x), ACT2FN[name](x)) <= 1e-6, name


def test_unknown_activation_raises(build, tmp_path):
    import torch

    from sglang.srt.models.opt import get_activation
    from tests.support import checkpoints, runtime

    assert isinstance(get_activation("relu"), torch.nn.ReLU)
    with pytest.raises(ValueError, match="'nope'"):
        get_activation("nope")
    src = runtime.make_tiny_opt(tmp_path / "src")
    checkpoints.write_config(src, activation_function="nope")
    with pytest.raises(ValueError, match="activation_function 'nope'"):
        build(src)


def test_registry_resolves_native_opt():
    from sglang.srt.models.opt import OPTForCausalLM
    from sglang.srt.models.registry import ModelRegistry

    cls, arch = ModelRegistry.resolve_model_cls(["OPTForCausalLM"])
    assert (cls, arch) == (OPTForCausalLM, "OPTForCausalLM")
    assert cls.__module__ == "sglang.srt.models.opt"


def test_dummy_weights_then_partial_updates(build, tmp_path):
    """load_format="dummy" never calls load_weights; the loader's post_load_weights() makes later
    calls updates, so update_weights_from_tensor may send one tensor (the weight sync of RL trainers)."""
    import torch

    from tests.support import checkpoints, runtime

    src = runtime.make_tiny_opt(tmp_path / "src")
    runner = build(src, load_format="dummy")
    state = checkpoints.read_state_dict(src)
    name = "model.decoder.layers.1.self_attn.k_proj.bias"
    updater = getattr(runner, "weight_updater", runner)  # ModelRunner's own method up to 0.5.14
    ok, message = updater.update_weights_from_tensor([(name, state[name])])
    assert ok, message
    qkv = runner.model.model.decoder.layers[1].self_attn.qkv_proj.bias
    assert torch.equal(qkv[64:128], state[name])
    # The whole checkpoint as an update then gives HF's logits.
    ok, message = updater.update_weights_from_tensor(list(state.items()))
    assert ok, message
    with torch.no_grad():
        expected = hf_model(src)(torch.tensor([SEQS[0]])).logits[0, -1]
    from tests.support import logits

    assert max_diff(logits.prefill(runner, [SEQS[0]]).next_token_logits[0], expected) <= TOL


def test_online_fp8_kv_cache_scales_are_not_checkpoint_tensors(tmp_path):
    """Fp8Config(is_checkpoint_fp8_serialized=False) gives each attention k_scale / v_scale parameters
    marked _skip_weight_check; a bf16/fp32 HF checkpoint has none and loads."""
    from unittest import mock

    from transformers import OPTConfig

    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.models.opt import OPTForCausalLM
    from tests.support import checkpoints, runtime
    from tests.support.reuse_scenarios import _request

    src = runtime.make_tiny_opt(tmp_path / "src")
    from sglang.srt.distributed import parallel_state as ps

    ps.init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{runtime.free_port()}",
    )
    try:
        _request(src, 0, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        # The logits processor and pooler are not under test and read server config.
        with mock.patch("sglang.srt.models.opt.LogitsProcessor"), mock.patch("sglang.srt.models.opt.Pooler"):
            model = OPTForCausalLM(OPTConfig.from_pretrained(src), Fp8Config(is_checkpoint_fp8_serialized=False))
        skipped = [n for n, p in model.named_parameters() if getattr(p, "_skip_weight_check", False)]
        assert "model.decoder.layers.0.self_attn.attn.k_scale" in skipped, skipped
        loaded = model.load_weights(checkpoints.read_state_dict(src).items())
        assert not any(name.endswith(("k_scale", "v_scale")) for name in loaded)
    finally:
        runtime.destroy_distributed()
