"""Unit tests for sglang.srt.distributed.reuse (SGLANG_ALLOW_REUSE_DISTRIBUTED)."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=15, suite="base-a-test-cpu")

import os
import socket
import unittest
from unittest import mock

from sglang.srt.distributed import parallel_state
from sglang.srt.distributed.reuse import (
    REUSE_DISTRIBUTED_ENV,
    allow_reuse,
    reuse_distributed_enabled,
)
from sglang.srt.eplb import expert_location
from sglang.test.test_utils import CustomTestCase


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initialize_model_parallel(tp_size: int = 1, pp_size: int = 1) -> None:
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size
    )


def _init_world(port: int, world_size: int = 1, backend: str = "gloo") -> None:
    parallel_state.init_distributed_environment(
        world_size=world_size,
        rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        local_rank=0,
        backend=backend,
    )


class TestReuseDistributed(CustomTestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = _free_port()
        with mock.patch.dict(os.environ, {REUSE_DISTRIBUTED_ENV: "0"}):
            _init_world(cls.port)
            _initialize_model_parallel()

    @classmethod
    def tearDownClass(cls):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def test_enabled_by_env_or_context(self):
        for value, expected in (("1", True), ("true", True), ("0", False)):
            with mock.patch.dict(os.environ, {REUSE_DISTRIBUTED_ENV: value}):
                self.assertEqual(reuse_distributed_enabled(), expected)
        with mock.patch.dict(os.environ, {REUSE_DISTRIBUTED_ENV: "0"}):
            with allow_reuse():
                self.assertTrue(reuse_distributed_enabled())
            self.assertFalse(reuse_distributed_enabled())

    def test_second_initialize_fails_without_opt_in(self):
        with mock.patch.dict(os.environ, {REUSE_DISTRIBUTED_ENV: "0"}):
            with self.assertRaises(AssertionError):
                _initialize_model_parallel()

    def test_matching_layout_is_reused(self):
        tp_group = parallel_state.get_tp_group()
        with mock.patch.dict(os.environ, {REUSE_DISTRIBUTED_ENV: "1"}):
            _init_world(self.port)
            _initialize_model_parallel()
        with allow_reuse():
            _initialize_model_parallel()
        self.assertIs(parallel_state.get_tp_group(), tp_group)

    def test_mismatched_layout_raises(self):
        with allow_reuse():
            with self.assertRaisesRegex(ValueError, "tp: existing 1, requested 2"):
                _initialize_model_parallel(tp_size=2)
            with self.assertRaisesRegex(
                ValueError, "world_size: existing 1, requested 2"
            ):
                _init_world(self.port, world_size=2)
            with self.assertRaisesRegex(ValueError, "backend"):
                _init_world(self.port, backend="nccl")

    def test_expert_location_metadata_may_be_replaced(self):
        first, second = object(), object()
        with allow_reuse():
            expert_location.set_global_expert_location_metadata(first)
            expert_location.set_global_expert_location_metadata(second)
        self.assertIs(expert_location.get_global_expert_location_metadata(), second)
        with mock.patch.dict(os.environ, {REUSE_DISTRIBUTED_ENV: "0"}):
            with self.assertRaises(AssertionError):
                expert_location.set_global_expert_location_metadata(first)


if __name__ == "__main__":
    unittest.main()
