"""The entry points of the tests' subprocess ranks (``python -c "from tests.support.ranks import ..."``): one
tensor-parallel rank or data-parallel replica each, in its own interpreter, saving what it computed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.mezo import PROMPTS as MEZO_PROMPTS
from tests.support.mezo import STEPS
from tests.support.mezo import TARGETS as MEZO_TARGETS

TP_TIMEOUT = 300
PROMPTS = [[2, 10, 20, 30], [2, 7], [2, 100, 101]]
TARGETS = [[40, 50], [8, 9, 10, 11], [102]]
TP_SEQS = [[2, 10, 20, 30, 40, 50], [2, 7], [2, 100, 101, 102]]
TP_HYPER = dict(lr=1e-4, eps=1e-2, seed=9, weight_decay=0.5)
FAMILY_HYPER = dict(lr=1e-4, eps=1e-2, seed=5, weight_decay=0.5)


def omp_bind(ranks: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND giving each rank a share of this process's cores ('0,1|2,3')."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        cpus = cpus * ranks
    share = len(cpus) // ranks
    return "|".join(",".join(map(str, cpus[i * share : (i + 1) * share])) for i in range(ranks))


def run_ranks(entry: str, model: Path, out: Path, ranks: int = 2, **kwargs: Any) -> list[Any]:
    """Run ``entry`` (a function of this module) as ``ranks`` tensor-parallel ranks, each in its own interpreter
    and on its own cores (SGLANG_CPU_OMP_THREADS_BIND, unless set), as ``entry(model, rank, port, file,
    **kwargs)`` with one free port; every rank must exit 0 within TP_TIMEOUT. Returns what each saved."""
    import torch

    from sglang.overlay.compat import free_port
    from tests.support.runtime import wait_all

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_ALLOW_REUSE_DISTRIBUTED"}
    env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", omp_bind(ranks))
    code = f"import sys; from tests.support.ranks import {entry}; {entry}(*sys.argv[1:], **{kwargs!r})"
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(model), str(rank), str(port), str(out / f"rank{rank}.pt")],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(ranks)
    ]
    wait_all(procs, TP_TIMEOUT)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(ranks)]


def tp_rank_main(model: str, rank: str, port: str, out: str) -> None:
    """One rank of the TP=2 test (its own interpreter): a fresh runner, then a second one that reuses
    the world; saves both ranks' results to ``out``."""
    import torch

    from sglang.overlay import RunnerConfig, StandaloneRunner

    config = RunnerConfig(model_path=model, device="cpu", tp_size=2, tp_rank=int(rank), dist_port=int(port))
    first = StandaloneRunner(config)
    res = dict(
        shard_rows=first.model.lm_head.weight.shape[0],
        logits=first.logits(TP_SEQS),
        logprobs=first.token_logprobs(PROMPTS, TARGETS),
        generated=first.generate(PROMPTS, 3),
    )
    with StandaloneRunner(
        RunnerConfig(model_path=model, device="cpu", tp_size=2, tp_rank=int(rank), distributed="reuse")
    ) as second:
        res["reused_logits"] = second.logits(TP_SEQS)
    first.close()
    res["closed"] = not torch.distributed.is_initialized()
    torch.save(res, out)


def tp_mezo_main(model: str, rank: str, port: str, out: str, hyper: str = "tp") -> None:
    """One rank of a MeZO TP=2 test (its own interpreter): 20 steps with TP_HYPER (or FAMILY_HYPER), then the
    gathered HF weights and each HF parameter's shard shape."""
    import torch

    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.mezo import MeZO, MeZOConfig

    config = RunnerConfig(model_path=model, device="cpu", tp_size=2, tp_rank=int(rank), dist_port=int(port))
    with StandaloneRunner(config) as r:
        trainer = MeZO(r, MeZOConfig(**(TP_HYPER if hyper == "tp" else FAMILY_HYPER)))
        results = trainer.train([(MEZO_PROMPTS, MEZO_TARGETS)], STEPS, progress=False)
        shards = {name: tuple(p.view.shape) for name, p in trainer.placements.items()}
        torch.save(
            dict(losses=[(x.loss_plus, x.loss_minus) for x in results], state=trainer.hf_state_dict(), shards=shards),
            out,
        )


def dp_mezo_main(model: str, out: str) -> None:
    """One replica of the MeZO DP=2 test (its own interpreter, torchrun's variables in the environment)."""

    import torch

    from sglang.overlay import RunnerConfig, StandaloneRunner
    from sglang.overlay.mezo import MeZO, MeZOConfig
    from sglang.overlay.mezo.dp import DataParallel

    dp = DataParallel.from_env()
    port = dp.world_port()  # the replica's own world, as the CLI places it
    with StandaloneRunner(RunnerConfig(model_path=model, device="cpu", dist_port=port)) as r:
        trainer = MeZO(r, MeZOConfig(**TP_HYPER), data_parallel=dp)
        results = trainer.train([(MEZO_PROMPTS, MEZO_TARGETS)], STEPS, progress=False)
        torch.save(
            dict(
                losses=[(x.loss_plus, x.loss_minus) for x in results],
                state=trainer.hf_state_dict(),
                share=dp.share(MEZO_PROMPTS),
                rank=dp.rank,
                size=dp.size,
            ),
            out,
        )
