"""Build N ModelRunners on the GPU in one process (NCCL), all alive at once; compare their logits.

    SGLANG_ALLOW_REUSE_DISTRIBUTED=1 python -m tests.gpu.reuse_gpu MODEL_DIR [N]

Prints ``RESULT <json>``. Run by tests/gpu/test_opt_gpu.py in a fresh interpreter, since the
distributed state is process-global.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from tests.gpu import common
from tests.support import logits as L
from tests.support.runtime import build_runner

SEQS = [[2, 5, 7, 9, 11, 13] * 20, [2, 100, 200, 300], [2] + list(range(1000, 1300))]


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    runners, times, alls, lasts = [], [], [], []
    for _ in range(n):
        tic = time.perf_counter()
        runners.append(build_runner(path, **common.gpu_overrides("float16", mem_fraction_static=0.3,
                                                                 max_total_tokens=4096)))
        times.append(time.perf_counter() - tic)
    for r in runners:  # every runner still alive; run each after all were built
        pf = L.prefill(r, SEQS)
        alls.append(torch.cat(pf.logits))
        lasts.append(pf.next_token_logits)
    out = dict(
        alive=len(runners),
        build_s=times,
        backend=torch.distributed.get_backend(),
        world_size=torch.distributed.get_world_size(),
        equal_all_positions=[bool(torch.equal(alls[0], a)) for a in alls[1:]],
        equal_last=[bool(torch.equal(lasts[0], a)) for a in lasts[1:]],
        max_abs_diff=[float((alls[0] - a).abs().max()) for a in alls[1:]],
    )
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
