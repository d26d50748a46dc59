"""Unit tests for OPTForCausalLM: HF weight names, strict loading, accessors."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=20, suite="base-a-test-cpu")

import socket
import unittest
from unittest import mock

import torch
from torch import nn
from transformers import OPTConfig
from transformers import OPTForCausalLM as HFOPTForCausalLM

from sglang.srt.distributed import parallel_state
from sglang.srt.models.opt import OPTForCausalLM, get_activation
from sglang.test.test_utils import CustomTestCase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initialize_model_parallel(tp_size: int = 1, pp_size: int = 1) -> None:
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size
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


def _build(config: OPTConfig) -> OPTForCausalLM:
    # The logits processor and pooler are not under test and read server config.
    with mock.patch("sglang.srt.models.opt.LogitsProcessor"), mock.patch(
        "sglang.srt.models.opt.Pooler"
    ):
        return OPTForCausalLM(config)


class TestOPTWeightLoading(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            local_rank=0,
            backend="gloo",
        )
        _initialize_model_parallel()

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def _assert_matches_hf(self, model, hf_state):
        params = dict(model.named_parameters())
        for i in range(model.config.num_hidden_layers):
            prefix = f"model.decoder.layers.{i}.self_attn."
            expected = torch.cat([hf_state[f"{prefix}{p}_proj.weight"] for p in "qkv"])
            torch.testing.assert_close(
                params[f"{prefix}qkv_proj.weight"], expected, rtol=0, atol=0
            )
        for name, value in hf_state.items():
            if name in params:
                torch.testing.assert_close(params[name], value, rtol=0, atol=0)

    def test_loads_model_decoder_names(self):
        config = _config()
        hf_state = HFOPTForCausalLM(config).state_dict()
        model = _build(config)
        model.load_weights(list(hf_state.items()))
        self._assert_matches_hf(model, hf_state)

    def test_loads_decoder_names_of_opt_model_checkpoints(self):
        config = _config(tie_word_embeddings=False)
        hf_state = HFOPTForCausalLM(config).state_dict()
        weights = [(name.removeprefix("model."), w) for name, w in hf_state.items()]
        model = _build(config)
        model.load_weights(weights)
        self._assert_matches_hf(model, hf_state)
        torch.testing.assert_close(model.lm_head.weight, hf_state["lm_head.weight"])

    def test_loads_project_in_and_out(self):
        config = _config(word_embed_proj_dim=8, do_layer_norm_before=False)
        hf_state = HFOPTForCausalLM(config).state_dict()
        model = _build(config)
        model.load_weights(list(hf_state.items()))
        self._assert_matches_hf(model, hf_state)

    def test_unexpected_weight_raises(self):
        config = _config()
        weights = list(HFOPTForCausalLM(config).state_dict().items())
        weights.append(("model.decoder.extra.weight", torch.zeros(2)))
        with self.assertRaisesRegex(ValueError, "model.decoder.extra.weight"):
            _build(config).load_weights(weights)

    def test_missing_weight_raises(self):
        config = _config()
        weights = [
            (name, w)
            for name, w in HFOPTForCausalLM(config).state_dict().items()
            if name != "model.decoder.layers.1.fc2.weight"
        ]
        with self.assertRaisesRegex(ValueError, r"layers\.1\.fc2\.weight"):
            _build(config).load_weights(weights)

    def test_later_calls_may_update_a_subset(self):
        config = _config()
        model = _build(config)
        model.load_weights(list(HFOPTForCausalLM(config).state_dict().items()))
        update = torch.full((32, 16), 0.5)
        model.load_weights([("model.decoder.layers.0.fc1.weight", update)])
        torch.testing.assert_close(model.model.decoder.layers[0].fc1.weight, update)

    def test_embedding_accessors(self):
        model = _build(_config())
        embed_tokens = model.model.decoder.embed_tokens
        self.assertIs(model.get_input_embeddings(), embed_tokens)
        self.assertIs(model.get_embed(), embed_tokens.weight)
        embed, head = model.get_embed_and_head()
        self.assertIs(embed, embed_tokens.weight)
        new = nn.Parameter(torch.zeros_like(embed_tokens.weight))
        with mock.patch("torch.cuda.empty_cache"), mock.patch("torch.cuda.synchronize"):
            model.set_embed(new)
        self.assertIs(model.get_embed(), new)

    def test_module_name_from_weight_name(self):
        model = _build(_config())
        self.assertEqual(
            model.get_module_name_from_weight_name(
                "model.decoder.layers.0.self_attn.k_proj.weight"
            ),
            ("model.decoder.layers.0.self_attn.qkv_proj", 3),
        )
        self.assertEqual(
            model.get_module_name_from_weight_name("model.decoder.layers.0.fc1.weight"),
            ("model.decoder.layers.0.fc1", 1),
        )

    def test_layer_prefixes_follow_the_module_tree(self):
        from sglang.srt.models import opt

        with mock.patch.object(
            opt, "OPTDecoderLayer", side_effect=opt.OPTDecoderLayer
        ) as layer_cls:
            _build(_config())
        prefixes = [call.kwargs["prefix"] for call in layer_cls.call_args_list]
        self.assertEqual(prefixes, ["model.decoder.layers.0", "model.decoder.layers.1"])

    def test_kv_cache_scales_skip_layers_of_other_ranks(self):
        model = _build(_config())
        model.model.decoder.layers[0] = nn.Identity()
        scales = [(0, 0.5), (1, 0.25)]
        with mock.patch(
            "sglang.srt.models.opt.kv_cache_scales_loader", return_value=scales
        ):
            model.load_kv_cache_scales("scales.json")
        attn = model.model.decoder.layers[1].self_attn.attn
        self.assertEqual((attn.k_scale, attn.v_scale), (0.25, 0.25))

    def test_unknown_activation_raises(self):
        self.assertIsInstance(get_activation("relu"), nn.ReLU)
        with self.assertRaisesRegex(ValueError, "swiglu"):
            get_activation("swiglu")


if __name__ == "__main__":
    unittest.main()
