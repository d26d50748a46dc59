"""Unit tests for destroy_model_parallel(): every group it built is destroyed."""

from sglang.test.ci.ci_register import register_cpu_ci

register_cpu_ci(est_time=10, suite="base-a-test-cpu")

import socket
import unittest

from sglang.srt.distributed import parallel_state
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


class TestDestroyModelParallel(CustomTestCase):
    def setUp(self):
        parallel_state.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            local_rank=0,
            backend="gloo",
        )
        _initialize_model_parallel()

    def tearDown(self):
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()

    def test_self_pp_group_is_destroyed(self):
        """Guards: destroy_model_parallel() destroys _SELF_PP and resets it to None (it was left alive)."""
        group = parallel_state._SELF_PP
        self.assertIsNotNone(group)
        parallel_state.destroy_model_parallel()
        self.assertIsNone(parallel_state._SELF_PP)
        self.assertIsNone(parallel_state._TP)

    def test_groups_are_rebuilt_after_destroy(self):
        """Guards: a rebuild after a destroy makes a new _SELF_PP (it kept the destroyed world's group)."""
        old = parallel_state._SELF_PP
        parallel_state.destroy_model_parallel()
        _initialize_model_parallel()
        self.assertIsNotNone(parallel_state._SELF_PP)
        self.assertIsNot(parallel_state._SELF_PP, old)


if __name__ == "__main__":
    unittest.main()
