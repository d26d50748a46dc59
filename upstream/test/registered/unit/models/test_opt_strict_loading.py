"""Unit tests for OPT's strict weight loading and the flows that load a subset on purpose."""

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
from sglang.srt.layers.quantization.fp8 import Fp8Config
from sglang.srt.models.opt import OPTForCausalLM
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


def _config() -> OPTConfig:
    return OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )


def _hf_state() -> dict:
    """An HF checkpoint with every tensor away from its initial value."""
    torch.manual_seed(0)
    model = HFOPTForCausalLM(_config())
    for param in model.parameters():
        nn.init.normal_(param, std=0.5)
    return model.state_dict()


def _build(quant_config=None) -> OPTForCausalLM:
    # The logits processor and pooler are not under test and read server config.
    with mock.patch("sglang.srt.models.opt.LogitsProcessor"), mock.patch(
        "sglang.srt.models.opt.Pooler"
    ):
        return OPTForCausalLM(_config(), quant_config)


def _without(state: dict, name: str) -> list:
    return [(n, w) for n, w in state.items() if n != name]


class TestOPTStrictLoading(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        _init_world(f"tcp://127.0.0.1:{_free_port()}")
        _initialize_model_parallel()

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def test_unexpected_weight_raises(self):
        """Guards: a checkpoint tensor no parameter takes raises (was skipped silently)."""
        weights = list(_hf_state().items())
        weights.append(("model.decoder.extra.weight", torch.zeros(2)))
        with self.assertRaisesRegex(ValueError, r"'model\.decoder\.extra\.weight'"):
            _build().load_weights(weights)

    def test_missing_weight_raises(self):
        """Guards: the checkpoint load raises naming a parameter it left unset (was left at its initial value)."""
        weights = _without(_hf_state(), "model.decoder.layers.1.fc2.bias")
        with self.assertRaisesRegex(
            ValueError, r"'model\.decoder\.layers\.1\.fc2\.bias'"
        ):
            _build().load_weights(weights)

    def test_later_calls_may_update_a_subset(self):
        """Guards: only the first call, the checkpoint load, must be complete (weight updates are partial).

        Passes without strict loading, which checks nothing; fails if every call is checked.
        """
        model = _build()
        model.load_weights(list(_hf_state().items()))
        update = torch.full((32, 16), 0.5)
        model.load_weights([("model.decoder.layers.0.fc1.weight", update)])
        torch.testing.assert_close(model.model.decoder.layers[0].fc1.weight, update)

    def test_dummy_weights_then_a_partial_update(self):
        """Guards: after post_load_weights() (load_format="dummy" calls it, never load_weights) updates may be partial.

        Without strict loading post_load_weights() does not exist; fails if it does not mark the
        weights initialized.
        """
        model = _build()
        model.post_load_weights()  # what the loaders that bypass load_weights() call
        update = torch.full((32, 16), 0.5)
        model.load_weights([("model.decoder.layers.0.fc1.weight", update)])
        torch.testing.assert_close(model.model.decoder.layers[0].fc1.weight, update)

    def test_online_fp8_kv_cache_scales_need_no_checkpoint_tensor(self):
        """Guards: parameters marked _skip_weight_check (online fp8 KV-cache scales) are not required.

        Passes without strict loading, which checks nothing; fails if the check requires them.
        """
        model = _build(Fp8Config(is_checkpoint_fp8_serialized=False))
        skipped = [
            name
            for name, param in model.named_parameters()
            if getattr(param, "_skip_weight_check", False)
        ]
        self.assertIn("model.decoder.layers.0.self_attn.attn.k_scale", skipped)
        model.load_weights(list(_hf_state().items()))


def _pipeline_rank(rank: int, init_method: str, checkpoint: str) -> None:
    """One rank of a two-rank pipeline: another rank's tensor may be missing, its own may not."""
    _init_world(init_method, world_size=2, rank=rank)
    try:
        _initialize_model_parallel(pp_size=2, rank=rank)
        state = torch.load(checkpoint)
        other = f"model.decoder.layers.{1 - rank}.fc2.bias"
        _build().load_weights(_without(state, other))
        own = f"model.decoder.layers.{rank}.fc2.bias"
        try:
            _build().load_weights(_without(state, own))
        except ValueError as e:
            assert repr(own) in str(e), e
        else:
            raise AssertionError(f"rank {rank} loaded a checkpoint without {own}")
    finally:
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


class TestOPTStrictLoadingPipelineParallel(CustomTestCase):
    def test_each_rank_requires_only_its_layers(self):
        """Guards: a pipeline rank's checkpoint load requires only its own layers' tensors."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = os.path.join(tmp, "opt.pt")
            torch.save(_hf_state(), checkpoint)
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            torch.multiprocessing.spawn(
                _pipeline_rank, args=(init_method, checkpoint), nprocs=2
            )


if __name__ == "__main__":
    unittest.main()
