"""Data parallelism for MeZO: replicas that each score a share of every batch and agree on its losses.

Every replica holds the whole model (or its tensor-parallel group does) and draws
the same z (``zo_noise``: a function of the step seed and the element), so the
replicas stay identical as long as they agree on each loss. A replica scores
every ``size``-th example of the batch and publishes two numbers per loss, the
sum of its target tokens' NLL and their count, in a key-value store (torchrun's
store, or any ``torch.distributed.Store``); every replica reads all of them in
the same order and gets the same mean, bit for bit. One exchange of a few
scalars per loss, no process group spanning the replicas (each replica's
SGLang runner owns its own torch.distributed world).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch

THREADS_BIND = "SGLANG_CPU_OMP_THREADS_BIND"


class DataParallel:
    """Replica ``rank`` of ``size`` exchanging losses through ``store``; ``writer``: whether this process
    publishes its replica's numbers (one process per replica does: tensor-parallel rank 0)."""

    def __init__(self, rank: int, size: int, store, writer: bool = True) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"data-parallel rank must be in [0, {size}), got {rank}")
        self.rank, self.size, self.writer = rank, size, writer
        self.store = torch.distributed.PrefixStore("sglang-overlay-mezo/", store)
        self.calls = 0

    @classmethod
    def from_env(cls, tp_size: int = 1, timeout_s: float = 600.0) -> Optional["DataParallel"]:
        """The replicas of a ``torchrun`` launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): process
        r is tensor-parallel rank r % tp_size of replica r // tp_size (one replica: a tensor-parallel
        group alone, whose ranks still agree on their world's port here); None without torchrun's
        variables."""
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return None
        # torchrun's flag makes every later tcp:// init_process_group of this process a client of the
        # agent's store: SGLang's own world (one per replica, on its own port) would wait forever for a
        # store nobody hosts. It is consumed here; the replicas' exchange below uses the agent's store.
        agent_store = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None) == "True"
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world % tp_size:
            raise ValueError(
                f"torchrun started {world} processes, not a multiple of tp_size={tp_size}: start "
                "replicas x tp_size processes (--nproc-per-node)"
            )
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
        store = torch.distributed.TCPStore(
            host,
            port,
            world_size=None if agent_store else world,
            is_master=not agent_store and rank == 0,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        return cls(rank // tp_size, world // tp_size, store, writer=rank % tp_size == 0)

    def world_port(self) -> int:
        """The port of this replica's own torch.distributed world, the same on its tensor-parallel ranks and
        unlike every other replica's: its writer asks the OS for a free port that no replica before it took
        and publishes it. (MASTER_PORT + 1 + replica, the old rule, collided with the ephemeral ports of the
        processes' own connections: torchrun --standalone draws MASTER_PORT from that range.)"""
        from sglang.overlay.compat import free_port

        key = f"port/{self.rank}"
        if self.writer:
            taken = {int(self.store.get(f"port/{r}")) for r in range(self.rank)}
            port = free_port()
            while port in taken:
                port = free_port()
            self.store.set(key, str(port))
        return int(self.store.get(key))

    def share(self, items: Sequence) -> list:
        """This replica's examples of a batch: every ``size``-th, from the ``rank``-th."""
        return list(items[self.rank :: self.size])

    def mean(self, total: float, count: int) -> float:
        """sum(totals) / sum(counts) over the replicas, the same on every one (a collective: every replica
        calls it, in the same order)."""
        self.calls += 1
        key = str(self.calls)
        if self.writer:
            self.store.set(f"{key}/{self.rank}", json.dumps([total, count]))
        parts = [json.loads(self.store.get(f"{key}/{r}")) for r in range(self.size)]
        counts = sum(part[1] for part in parts)
        if counts == 0:
            raise ValueError("the batch has no target tokens on any replica")
        return sum(part[0] for part in parts) / counts


def launch_layout(model: str, device: str, dtype: Optional[str], tp_size: int) -> tuple[Optional[DataParallel], Any]:
    """(data parallelism, RunnerConfig) of this process: one process without torchrun; under
    torchrun, process r is TP rank r % tp_size of replica r // tp_size, on its replica's own GPUs
    (LOCAL_RANK's block), its replica's torch.distributed world on the port ``DataParallel.world_port`` agrees."""
    from sglang.overlay.config import RunnerConfig

    rank = int(os.environ.get("RANK", "0"))
    if tp_size > 1 and "MASTER_PORT" not in os.environ:
        raise ValueError(
            f"--tp-size {tp_size} runs one process per rank: launch with torchrun --nproc-per-node "
            f"{tp_size} (more processes make data-parallel replicas)"
        )
    dp = DataParallel.from_env(tp_size=tp_size)
    if dp is None:
        return None, RunnerConfig(model_path=model, device=device, dtype=dtype)
    tp_rank = rank % tp_size
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    port = dp.world_port()
    if dp.size == 1:
        dp = None  # one replica: nothing to exchange
    config = RunnerConfig(
        model_path=model, device=device, dtype=dtype, tp_size=tp_size, tp_rank=tp_rank, dist_port=port
    )
    if config.device_kind() == "cuda":  # on the CPU the GPU id picks SGLang's NUMA binding: keep 0
        config = dataclasses.replace(config, first_gpu=local - tp_rank)
    elif tp_size > 1 and not os.environ.get(THREADS_BIND):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", str(tp_size))))
        os.environ[THREADS_BIND] = bind = cpu_thread_binding(local - tp_rank, tp_size, local_world)
        if rank == 0:
            print(
                f"MeZO: tensor parallelism on the CPU: each rank's threads on its own cores, "
                f"{THREADS_BIND}={bind!r} (rank r takes the r-th group; set it yourself to choose)",
                file=sys.stderr,
                flush=True,
            )
    return dp, config


def cpu_thread_binding(first: int, ranks: int, local_world: int) -> str:
    """SGLang's per-rank core lists (``'0-3|4-7'``) for the ``ranks`` tensor-parallel ranks of one replica whose
    first process is local process ``first`` of ``local_world``: this process's CPUs (its affinity) split
    evenly over the local processes, in order (fewer CPUs than processes: they share, round robin)."""
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // local_world)

    def cores(process: int) -> str:
        if len(cpus) < local_world:
            return str(cpus[process % len(cpus)])
        group = cpus[process * share : (process + 1) * share]
        return ",".join(map(str, group))

    return "|".join(cores(first + r) for r in range(ranks))
