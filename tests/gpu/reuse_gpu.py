"""Build N runners on the GPU in one process (NCCL), all alive at once; compare their logits.

    SGLANG_ALLOW_REUSE_DISTRIBUTED=1 python -m tests.gpu.reuse_gpu MODEL_DIR [N]

The first runner initializes torch.distributed (NCCL) and SGLang's groups; the others reuse them
(``RunnerConfig(distributed="reuse")``). Prints ``RESULT <json>``. Run by
tests/gpu/test_opt_gpu.py in a fresh interpreter, since the distributed state is process-global.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from gpu_shared import common

SEQS = [[2, 5, 7, 9, 11, 13] * 20, [2, 100, 200, 300], [2] + list(range(1000, 1300))]


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    runners, times = [], []
    for i in range(n):
        tic = time.perf_counter()
        runners.append(
            common.runner(
                path, "float16", distributed="reuse" if i else "fresh", mem_fraction_static=0.3, max_total_tokens=4096
            )
        )
        times.append(time.perf_counter() - tic)
    outs = [common.sgl_logits(r, SEQS) for r in runners]  # run each after all were built
    res = dict(
        alive=len(runners),
        build_s=times,
        backend=torch.distributed.get_backend(),
        world_size=torch.distributed.get_world_size(),
        equal_all_positions=[bool(torch.equal(outs[0][0], o[0])) for o in outs[1:]],
        equal_last=[bool(torch.equal(outs[0][1], o[1])) for o in outs[1:]],
        max_abs_diff=[float((outs[0][0] - o[0]).abs().max()) for o in outs[1:]],
    )
    for r in reversed(runners):
        r.close()
    res["closed_cleanly"] = not torch.distributed.is_initialized()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
