"""Release compatibility for the native OPT model (sglang/srt/models/opt.py).

``get_parallel()`` is SGLang's runtime-context view of the parallel layout
(0.5.14+). Older releases keep the same facts in ``parallel_state``; this module
gives them the same view, read when used, so the model code stays one version.
"""

try:
    from sglang.srt.runtime_context import get_parallel
except ImportError:  # up to 0.5.13: no runtime context
    from sglang.srt.distributed import parallel_state as _ps

    class _ParallelView:
        """The fields of runtime_context.get_parallel() that opt.py reads, from parallel_state."""

        @property
        def tp_group(self):
            return _ps.get_tp_group()

        @property
        def tp_rank(self) -> int:
            return _ps.get_tensor_model_parallel_rank()

        @property
        def tp_size(self) -> int:
            return _ps.get_tensor_model_parallel_world_size()

        @property
        def pp_group(self):
            return _ps.get_pp_group()

        @property
        def pp_rank(self) -> int:
            return _ps.get_pp_group().rank_in_group

        @property
        def pp_size(self) -> int:
            return _ps.get_pp_group().world_size

    _VIEW = _ParallelView()

    def get_parallel() -> _ParallelView:
        return _VIEW


__all__ = ["get_parallel"]
