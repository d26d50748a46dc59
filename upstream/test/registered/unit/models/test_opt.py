"""Unit tests for the OPT model: pipeline-parallel loading, accessors, prefixes."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-a-test-cpu")

import os
import socket
import tempfile
import unittest
from unittest import mock

import torch
from torch import nn
from transformers import OPTConfig
from transformers import OPTForCausalLM as HFOPTForCausalLM

from sglang.srt.distributed import parallel_state
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.utils import PPMissingLayer
from sglang.srt.models.opt import OPTForCausalLM, get_activation
from sglang.test.test_utils import CustomTestCase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initialize_model_parallel(tp_size=1, pp_size=1, rank=0, **kwargs) -> None:
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        **kwargs,
    )


def _init_world(init_method: str, world_size: int = 1, rank: int = 0) -> None:
    parallel_state.init_distributed_environment(
        world_size=world_size,
        rank=rank,
        distributed_init_method=init_method,
        local_rank=rank,
        backend="gloo",
    )


def _config(**kwargs) -> OPTConfig:
    values = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    values.update(kwargs)
    return OPTConfig(**values)


def _hf_state(config: OPTConfig) -> dict:
    """An HF checkpoint with every tensor away from its initial value (HF starts
    biases at 0 and LayerNorm weights at 1, which would hide swapped tensors)."""
    torch.manual_seed(0)
    model = HFOPTForCausalLM(config)
    for param in model.parameters():
        nn.init.normal_(param, std=0.5)
    return model.state_dict()


def _build(config: OPTConfig, quant_config=None) -> OPTForCausalLM:
    # The logits processor and pooler are not under test and read server config.
    with mock.patch("sglang.srt.models.opt.LogitsProcessor"), mock.patch(
        "sglang.srt.models.opt.Pooler"
    ):
        return OPTForCausalLM(config, quant_config)


def assert_matches_hf(test, model: OPTForCausalLM, hf_state: dict) -> None:
    """Every parameter of ``model`` equals its HF tensor (fused q/k/v weights and
    biases included); layers of other pipeline ranks have none."""
    params = dict(model.named_parameters())
    checked = 0
    for i in range(model.start_layer, model.end_layer):
        prefix = f"model.decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            expected = torch.cat([hf_state[f"{prefix}{p}_proj.{kind}"] for p in "qkv"])
            torch.testing.assert_close(
                params[f"{prefix}qkv_proj.{kind}"], expected, rtol=0, atol=0
            )
            checked += 1
    for name, param in params.items():
        if "qkv_proj" not in name:
            torch.testing.assert_close(param, hf_state[name], rtol=0, atol=0)
            checked += 1
    test.assertEqual(checked, len(params))


class TestOPT(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        _init_world(f"tcp://127.0.0.1:{_free_port()}")
        _initialize_model_parallel()

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def test_unknown_activation_raises(self):
        """Guards: get_activation raises ValueError for an unknown name instead of returning nn.Identity()."""
        self.assertIsInstance(get_activation("relu"), nn.ReLU)
        with self.assertRaisesRegex(ValueError, "swish"):
            get_activation("swish")

    def test_quantization_sees_each_layer_at_its_module_path(self):
        """Guards: the decoder layers' prefix model.decoder.layers and out_proj's prefix (was o_proj)."""
        seen = {}

        def get_quant_method(layer, prefix):
            seen[prefix] = layer
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None

        quant_config = mock.Mock(get_quant_method=get_quant_method)
        model = _build(_config(tie_word_embeddings=False), quant_config)
        modules = dict(model.named_modules())
        self.assertIn("model.decoder.layers.1.self_attn.out_proj", modules)
        self.assertEqual(len(seen), 10)  # qkv_proj, out_proj, attn, fc1, fc2 per layer
        for prefix, layer in seen.items():
            self.assertIs(modules.get(prefix), layer, prefix)

    def test_kv_cache_scales_skip_layers_of_other_ranks(self):
        """Guards: load_kv_cache_scales skips the PPMissingLayer of another rank (was UnboundLocalError)."""
        model = _build(_config())
        model.model.decoder.layers[0] = PPMissingLayer()
        scales = [(0, 0.5), (1, 0.25)]
        with mock.patch(
            "sglang.srt.models.opt.kv_cache_scales_loader", return_value=scales
        ):
            model.load_kv_cache_scales("scales.json")
        attn = model.model.decoder.layers[1].self_attn.attn
        self.assertEqual((attn.k_scale, attn.v_scale), (0.25, 0.25))

    def test_embedding_accessors(self):
        """Guards: the embedding accessors read model.decoder.embed_tokens (was AttributeError)."""
        tied = _build(_config())
        with torch.no_grad():  # uninitialized memory may hold NaN, which equals nothing
            tied.model.decoder.embed_tokens.weight.normal_()
        self.assertEqual(
            tied.get_weights_by_name("lm_head.weight", truncate_size=2),
            tied.model.decoder.embed_tokens.weight[:2].tolist(),
        )
        model = _build(_config(tie_word_embeddings=False))
        embed_tokens = model.model.decoder.embed_tokens
        old = embed_tokens.weight
        self.assertIs(model.get_input_embeddings(), embed_tokens)
        self.assertIs(model.get_embed(), old)
        new = nn.Parameter(torch.randn_like(old))
        with mock.patch("torch.cuda.empty_cache"), mock.patch("torch.cuda.synchronize"):
            model.set_embed(new)
            embed, head = model.get_embed_and_head()
            self.assertIs(embed, new)
            self.assertIs(head, model.lm_head.weight)
            model.set_embed_and_head(old, model.lm_head.weight)
        self.assertIs(model.get_embed(), old)

    def test_start_and_end_layer(self):
        """Guards: the start_layer / end_layer properties read model.decoder (was AttributeError)."""
        model = _build(_config(num_hidden_layers=3))
        self.assertEqual((model.start_layer, model.end_layer), (0, 3))


def _pipeline_rank(rank: int, init_method: str, checkpoint: str) -> None:
    """One rank of a two-rank pipeline: load the whole HF checkpoint, check this rank's layers."""
    _init_world(init_method, world_size=2, rank=rank)
    try:
        _initialize_model_parallel(pp_size=2, rank=rank)
        hf_state = torch.load(checkpoint)
        model = _build(_config())
        assert (model.start_layer, model.end_layer) == (rank, rank + 1)
        assert isinstance(model.model.decoder.layers[1 - rank], PPMissingLayer)
        model.load_weights(list(hf_state.items()))
        assert_matches_hf(unittest.TestCase(), model, hf_state)
    finally:
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


class TestOPTPipelineParallel(CustomTestCase):
    def test_each_rank_loads_its_layers_of_a_whole_checkpoint(self):
        """Guards: load_weights skips other ranks' layers (its hasattr(self.model, "start_layer") was never true: KeyError)."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = os.path.join(tmp, "opt.pt")
            torch.save(_hf_state(_config()), checkpoint)
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            torch.multiprocessing.spawn(
                _pipeline_rank, args=(init_method, checkpoint), nprocs=2
            )


if __name__ == "__main__":
    unittest.main()
