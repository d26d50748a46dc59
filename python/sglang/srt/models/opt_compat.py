"""Release compatibility for the native OPT model (sglang/srt/models/opt.py).

Each API that differs between the supported SGLang releases gets one name
here, taken from the newer releases first and rebuilt from the older API in
the ImportError branch, so the model code stays one version. Supporting an
older release means adding a branch here, not touching the model.

``get_parallel()`` is SGLang's runtime-context view of the parallel layout
(0.5.14+); older releases keep the same facts in ``parallel_state``.
``make_pp_layers`` builds the decoder layers of this pipeline rank.
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


try:
    from sglang.srt.utils import make_pp_layers
except ImportError:  # releases whose make_layers takes the pipeline rank
    from sglang.srt.utils import make_layers

    def make_pp_layers(num_hidden_layers: int, layer_fn, prefix: str = ""):
        parallel = get_parallel()
        return make_layers(
            num_hidden_layers,
            layer_fn,
            pp_rank=parallel.pp_rank,
            pp_size=parallel.pp_size,
            prefix=prefix,
        )


__all__ = ["get_parallel", "make_pp_layers"]
