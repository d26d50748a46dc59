"""Tensor parallelism on the GPU: TP=2 (two processes, NCCL) against TP=1, on the same sequences.

    python -m tests.gpu.tp_gpu MODEL_DIR DTYPE [--tp N] [--timeout SECONDS]

First one spawned process builds a TP=1 ``StandaloneRunner`` on GPU 0; then ``N`` (default 2)
spawned processes build one rank each, ``RunnerConfig(tp_size=N, tp_rank=r, dist_port=PORT)``
with one shared free port, rank r on GPU r. Each prefills the same sequences in one EXTEND
(``sglang.overlay.forward.prefill(all_positions=True)``) and saves its final hidden states at
every position, the LogitsProcessor's last-token logits, the head's logits at every position
(``Forward.all_logits``: gathered over the TP group at N > 1) and ``token_logprobs``. The parent
never touches CUDA: it compares rank 0 (and checks the other ranks agree) with TP=1 and prints
``RESULT <json>``. On a failure or a timeout it kills the processes left, prints ``FAILED <why>``
with each process's exit code and traceback, and exits 1. ``--tp 1`` runs the harness against
itself on one GPU. Run by tests/gpu/test_opt_gpu.py (``test_tp2_matches_tp1``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

# NVLink multicast off (the device's rule); set before any process touches NCCL, inherited by the ranks.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

LENGTHS = [300, 128, 37, 5, 500, 66]  # 1036 tokens in one EXTEND batch
SEED = 4321


def _seqs() -> List[List[int]]:
    import torch

    g = torch.Generator().manual_seed(SEED)
    return [[2] + torch.randint(3, 50000, (n - 1,), generator=g).tolist() for n in LENGTHS]


def _pairs(seqs: List[List[int]]):
    """Each sequence split into a prompt (first half) and its target (the rest)."""
    prompts = [s[: max(1, len(s) // 2)] for s in seqs]
    targets = [s[len(p) :] for s, p in zip(seqs, prompts)]
    return prompts, targets


def _rank(tag: str, model: str, dtype: str, tp_size: int, tp_rank: int, port: Optional[int], out: str) -> None:
    """One process: build the runner, score, save ``{tag}{rank}.pt`` under ``out`` (a traceback to ``.err``)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        import torch

        from sglang.overlay import RunnerConfig, StandaloneRunner
        from sglang.overlay.forward import prefill

        tic = time.perf_counter()
        config = RunnerConfig(
            model_path=model,
            device="cuda",
            dtype=dtype,
            attention_backend="triton",
            max_total_tokens=4096,
            mem_fraction_static=0.3,
            tp_size=tp_size,
            tp_rank=tp_rank,
            dist_port=port,
        )
        seqs = _seqs()
        with StandaloneRunner(config) as runner:
            built = time.perf_counter() - tic
            vocab = runner.vocab_size
            fwd = prefill(runner.runner, seqs, all_positions=True)
            assert fwd.hidden_states is not None and fwd.hidden_states.shape[0] == sum(LENGTHS)
            model_dtype = fwd.hidden_states.dtype
            res: Dict[str, Any] = dict(
                hidden=fwd.hidden_states.float().cpu(),
                last=fwd.next_token_logits[:, :vocab].float().cpu(),
                # all_logits are the model-dtype head logits cast to fp32: storing them in that dtype is lossless.
                logits=torch.cat(fwd.all_logits(vocab)).to(model_dtype).cpu(),
                logprobs=torch.cat(runner.token_logprobs(*_pairs(seqs))).cpu(),
                vocab=vocab,
                head_rows=int(runner.model.lm_head.weight.shape[0]),
                device=str(fwd.hidden_states.device),
                world_size=torch.distributed.get_world_size(),
                backend=str(torch.distributed.get_backend()),
                build_s=built,
            )
            torch.cuda.synchronize()
        torch.save(res, Path(out) / f"{tag}{tp_rank}.pt")
    except BaseException:
        text = traceback.format_exc()
        (Path(out) / f"{tag}{tp_rank}.err").write_text(text)
        print(f"[{tag} rank {tp_rank}] {text}", file=sys.stderr, flush=True)
        sys.exit(1)


def _run(
    tag: str, model: str, dtype: str, tp_size: int, port: Optional[int], out: str, timeout: float
) -> Optional[str]:
    """Run ``tp_size`` rank processes; None when all succeeded, else why not (the others are killed)."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(tag, model, dtype, tp_size, r, port, out), name=f"{tag}rank{r}")
        for r in range(tp_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    why = None
    while any(p.is_alive() for p in procs):
        failed = [p for p in procs if not p.is_alive() and p.exitcode != 0]
        if failed:  # the others would wait in a collective for it forever
            why = f"{tag}: {', '.join(p.name for p in failed)} exited with {[p.exitcode for p in failed]}"
            break
        if time.monotonic() > deadline:
            why = f"{tag}: timed out after {timeout:.0f}s (alive: {[p.name for p in procs if p.is_alive()]})"
            break
        time.sleep(0.5)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
        p.join(10)
    if why is None and any(p.exitcode != 0 for p in procs):
        why = f"{tag}: exit codes {[p.exitcode for p in procs]}"
    if why is None:
        missing = [r for r in range(tp_size) if not (Path(out) / f"{tag}{r}.pt").is_file()]
        if missing:
            why = f"{tag}: ranks {missing} saved no results"
    if why is not None:
        lines = [f"FAILED {why}"]
        for r, p in enumerate(procs):
            err = Path(out) / f"{tag}{r}.err"
            lines.append(f"--- {p.name} (exit code {p.exitcode}) ---")
            lines.append(err.read_text() if err.is_file() else "(no traceback saved: killed, or failed outside Python)")
        return "\n".join(lines)
    return None


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(ref: Dict[str, Any], ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Metrics of rank 0 against the TP=1 reference, and whether every rank got the same results."""
    import torch

    got = ranks[0]
    return dict(
        tokens=sum(LENGTHS),
        sequences=len(LENGTHS),
        tp_size=len(ranks),
        world_size=got["world_size"],
        backend=got["backend"],
        devices=[r["device"] for r in ranks],
        head_rows=[r["head_rows"] for r in ranks],
        vocab=got["vocab"],
        build_s=[round(r["build_s"], 2) for r in ranks],
        hidden_rel=_rel(got["hidden"], ref["hidden"]),
        last_logits_rel=_rel(got["last"], ref["last"]),
        last_argmax=(got["last"].argmax(-1) == ref["last"].argmax(-1)).float().mean().item(),
        logits_rel=_rel(got["logits"], ref["logits"]),
        argmax=(got["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean().item(),
        logprobs_rel=_rel(got["logprobs"], ref["logprobs"]),
        logprobs_max_abs=(got["logprobs"] - ref["logprobs"]).abs().max().item(),
        ranks_equal={
            key: all(torch.equal(got[key], r[key]) for r in ranks[1:])
            for key in ("hidden", "last", "logits", "logprobs")
        },
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("dtype", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tp", type=int, default=2, help="TP size to compare with TP=1 (default 2)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds for each of the two runs")
    args = parser.parse_args(argv)

    import torch

    from sglang.overlay.compat import free_port as _free_port

    with tempfile.TemporaryDirectory(prefix="tp_gpu-") as out:
        failure = _run("ref-", args.model, args.dtype, 1, None, out, args.timeout)
        if failure is None:
            failure = _run(
                f"tp{args.tp}-",
                args.model,
                args.dtype,
                args.tp,
                _free_port() if args.tp > 1 else None,
                out,
                args.timeout,
            )
        if failure is not None:
            print(failure, flush=True)
            return 1
        ref = torch.load(Path(out) / "ref-0.pt")
        ranks = [torch.load(Path(out) / f"tp{args.tp}-{r}.pt") for r in range(args.tp)]
    print("RESULT " + json.dumps(dict(model=args.model, dtype=args.dtype, **compare(ref, ranks))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
