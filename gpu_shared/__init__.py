"""What the GPU tests (tests/gpu) and the benchmarks (benchmarks/) share: model shapes, random checkpoints,
runners (``gpu_shared.common``). Nothing here imports torch or sglang at module level."""
