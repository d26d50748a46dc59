"""Unit tests for the Gemma model: the MLP's activation."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-a-test-cpu")

import socket
import unittest

import torch
from transformers import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP as HFGemmaMLP

from sglang.srt.distributed import parallel_state
from sglang.srt.models.gemma import GemmaMLP
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


class TestGemmaMLP(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        _init_world(f"tcp://127.0.0.1:{_free_port()}")
        _initialize_model_parallel()

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def test_mlp_matches_hf(self):
        """Guards: the MLP's GELU is the tanh approximation, as in HF's GemmaMLP
        (gelu_pytorch_tanh) and the reference implementation; it was the exact GELU,
        GeluAndMul("none"), 3e-4 off here."""
        config = GemmaConfig(
            hidden_size=16, intermediate_size=32, hidden_act="gelu_pytorch_tanh"
        )
        torch.manual_seed(0)
        hf_mlp = HFGemmaMLP(config)
        mlp = GemmaMLP(config.hidden_size, config.intermediate_size)
        with torch.no_grad():
            gate_up = torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight])
            mlp.gate_up_proj.weight.copy_(gate_up)
            mlp.down_proj.weight.copy_(hf_mlp.down_proj.weight)
            x = 2 * torch.randn(8, config.hidden_size)
            torch.testing.assert_close(mlp(x), hf_mlp(x), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
