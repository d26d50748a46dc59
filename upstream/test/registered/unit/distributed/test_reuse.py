"""Unit tests for SGLANG_ALLOW_REUSE_DISTRIBUTED (sglang.srt.distributed.reuse)."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=60, suite="base-a-test-cpu")

import inspect
import re
import socket
import tempfile
import unittest

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from sglang.benchmark.one_batch import load_model
from sglang.srt.distributed import parallel_state
from sglang.srt.environ import envs
from sglang.srt.eplb import expert_location
from sglang.srt.server_args import PortArgs, ServerArgs
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


def _init_world(port: int, **kwargs) -> None:
    args = dict(
        world_size=1,
        rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=0,
        backend="gloo",
    )
    args.update(kwargs)
    parallel_state.init_distributed_environment(**args)


def _other_value(parameter: inspect.Parameter):
    """A value of ``parameter`` other than its default, which the groups were built with."""
    if parameter.name == "backend":
        return "nccl"
    if parameter.default is None:
        return 2
    if isinstance(parameter.default, bool):
        return not parameter.default
    return parameter.default + 1


def _only_difference(name: str, existing, requested) -> str:
    """The message of a reuse ValueError whose only difference is ``name``."""
    return re.escape(
        f"cannot be reused: {name}: existing {existing!r}, requested {requested!r}. "
    )


def _reuse():
    return envs.SGLANG_ALLOW_REUSE_DISTRIBUTED.override(True)


class TestReuseDistributed(CustomTestCase):
    """One world and one set of groups (all widths 1), built with reuse off."""

    @classmethod
    def setUpClass(cls):
        cls.port = _free_port()
        _init_world(cls.port)
        _initialize_model_parallel()

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def test_second_initialize_fails_without_opt_in(self):
        """Guards: with the variable unset a second build still asserts, as upstream does."""
        # Upstream's behaviour, unchanged with the variable unset.
        with self.assertRaisesRegex(AssertionError, "already initialized"):
            _initialize_model_parallel()

    def test_matching_world_and_groups_are_reused(self):
        """Guards: the opt-in: matching requests reuse the world and groups instead of asserting."""
        world, tp_group = (
            parallel_state.get_world_group(),
            parallel_state.get_tp_group(),
        )
        with _reuse():
            _init_world(self.port)
            _initialize_model_parallel()
        self.assertIs(parallel_state.get_world_group(), world)
        self.assertIs(parallel_state.get_tp_group(), tp_group)

    def test_every_argument_of_initialize_model_parallel_is_compared(self):
        """Guards: each argument of initialize_model_parallel() that differs raises, named alone."""
        signature = inspect.signature(parallel_state.initialize_model_parallel)
        for name, parameter in signature.parameters.items():
            existing = "gloo" if name == "backend" else parameter.default
            requested = _other_value(parameter)
            with self.subTest(name), _reuse():
                with self.assertRaisesRegex(
                    ValueError, _only_difference(name, existing, requested)
                ):
                    parallel_state.initialize_model_parallel(**{name: requested})

    def test_requested_widths_are_compared(self):
        """Guards: requested TP / PP widths that differ from the existing groups raise, named alone."""
        self.addCleanup(self._request_existing_widths)
        for tp_size, pp_size, name in (
            (2, 1, "tensor_model_parallel_size"),
            (1, 2, "pipeline_model_parallel_size"),
        ):
            with self.subTest(name), _reuse():
                with self.assertRaisesRegex(ValueError, _only_difference(name, 1, 2)):
                    _initialize_model_parallel(tp_size=tp_size, pp_size=pp_size)

    def test_world_mismatches_name_the_argument(self):
        """Guards: init_distributed_environment() refuses a world of another size, rank, local rank or backend."""
        for name, existing, requested in (
            ("world_size", 1, 2),
            ("rank", 0, 1),
            ("local_rank", 0, 1),
            ("backend", "gloo", "nccl"),
        ):
            with self.subTest(name), _reuse():
                with self.assertRaisesRegex(
                    ValueError, _only_difference(name, existing, requested)
                ):
                    _init_world(self.port, **{name: requested})

    def test_expert_location_metadata_may_be_replaced_with_opt_in(self):
        """Guards: a later runner may replace the expert-location metadata (only) with the opt-in."""
        first, second = object(), object()
        self.addCleanup(self._clear_expert_location_metadata)
        with _reuse():
            expert_location.set_global_expert_location_metadata(first)
            expert_location.set_global_expert_location_metadata(second)
        self.assertIs(expert_location.get_global_expert_location_metadata(), second)
        with self.assertRaises(AssertionError):
            expert_location.set_global_expert_location_metadata(first)

    @staticmethod
    def _request_existing_widths():
        with _reuse():
            _initialize_model_parallel()

    @staticmethod
    def _clear_expert_location_metadata():
        with _reuse():
            expert_location.set_global_expert_location_metadata(None)


def _tiny_checkpoint(path: str) -> str:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
    )
    model = OPTForCausalLM(config)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(path)
    # load_model() loads the tokenizer too.
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, "t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(
        path
    )
    return path


def _load_model(model_path: str):
    """A ModelRunner on CPU, as sglang.benchmark.one_batch builds it."""
    server_args = ServerArgs(
        model_path=model_path,
        device="cpu",
        dtype="float32",
        attention_backend="torch_native",
        sampling_backend="pytorch",
        disable_cuda_graph=True,
        disable_radix_cache=True,
        max_total_tokens=256,
        max_running_requests=4,
        mem_fraction_static=0.5,
    )
    port_args = PortArgs.init_new(server_args)
    return load_model(server_args, port_args, 0, 0)[0]


class TestTwoModelRunnersInOneProcess(CustomTestCase):
    """The flow the variable is for: a second ModelRunner in a process that built one."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.first = _load_model(_tiny_checkpoint(cls.tmp.name))

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
        cls.tmp.cleanup()

    def test_second_runner_fails_without_opt_in(self):
        """The failing flow: load_model() twice in one process, variable unset (upstream's error)."""
        with self.assertRaises((AssertionError, RuntimeError)):
            _load_model(self.tmp.name)

    def test_second_runner_reuses_the_groups_with_opt_in(self):
        """Guards: the same flow with the opt-in builds the second runner on the existing groups."""
        tp_group = parallel_state.get_tp_group()
        with _reuse():
            second = _load_model(self.tmp.name)
        self.assertIsNot(second, self.first)
        self.assertIs(parallel_state.get_tp_group(), tp_group)


if __name__ == "__main__":
    unittest.main()
