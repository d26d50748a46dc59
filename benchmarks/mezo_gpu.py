#!/usr/bin/env python3
"""MeZO steps/s and peak memory: sglang/overlay/mezo.py on SGLang's runner vs an HF reference MeZO, one GPU.

    PYTHONPATH=/tmp/site:. python3 benchmarks/mezo_gpu.py [--shape opt-1.3b --batch 16 --prompt 128 --target 128]

Both sides run the same algorithm on the same random checkpoint (tests/gpu/common.py), model dtype,
batch ``--batch`` x (``--prompt`` + ``--target``) tokens, loss = mean NLL over the target tokens:
θ += εz; L+; θ -= 2εz; L-; θ += εz; θ -= lr·g·z, with z regenerated from one CUDA generator per step,
parameter by parameter in HF ``named_parameters()`` order, so both sides draw the same z and their
losses and projected gradients should agree to half-precision noise (printed).

- SGLang: ``MeZO(StandaloneRunner, MeZOConfig)`` from sglang/overlay/mezo.py; each loss is one EXTEND
  forward of the batch (``StandaloneRunner.loss``).
- HF reference (written here): ``OPTForCausalLM(input_ids, labels=...)`` under ``no_grad``, prompt
  positions labelled -100.
Peak memory: ``torch.cuda.max_memory_allocated`` during the timed steps, against the same side's
inference (one loss forward of the same batch, no perturbation) — both include that side's weights,
and SGLang's includes its (small, ``--kv-tokens``) KV pool.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.gpu import common  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def timed_steps(step, n: int) -> tuple[float, list]:
    step()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out, times = [], []
    for _ in range(n):
        t = time.perf_counter()
        out.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_of(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


class HFMeZO:
    """The reference: MeZO on an HF OPTForCausalLM, same z stream as sglang/overlay/mezo.py."""

    def __init__(self, model, lr: float, eps: float, seed: int):
        from sglang.overlay.mezo import derive_seed

        self.model, self.lr, self.eps, self.seed, self.k = model, lr, eps, seed, 0
        self.derive_seed = derive_seed
        self.params = [p for _, p in model.named_parameters()]

    def _noise(self, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for p in self.params:
            yield p, torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)

    def perturb(self, seed, scale):
        for p, z in self._noise(seed):
            p.data.add_(z, alpha=scale * self.eps)

    def loss(self, ids, labels):
        return self.model(input_ids=ids, labels=labels, use_cache=False).loss

    @torch.no_grad()
    def step(self, ids, labels):
        seed = self.derive_seed(self.seed, "step", self.k)
        self.perturb(seed, 1.0)
        lp = self.loss(ids, labels).item()
        self.perturb(seed, -2.0)
        lm = self.loss(ids, labels).item()
        self.perturb(seed, 1.0)
        g = (lp - lm) / (2 * self.eps)
        for p, z in self._noise(seed):
            p.data.add_(z, alpha=-self.lr * g)
        self.k += 1
        return lp, lm, g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--target", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kv-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from sglang.overlay.mezo import MeZO, MeZOConfig

    path = common.checkpoint(a.shape)
    g = torch.Generator().manual_seed(11)
    prompts = [[2] + torch.randint(3, 50000, (a.prompt - 1,), generator=g).tolist() for _ in range(a.batch)]
    targets = [torch.randint(3, 50000, (a.target,), generator=g).tolist() for _ in range(a.batch)]
    cfg = MeZOConfig(lr=1e-6, eps=1e-3, seed=0)
    row = dict(shape=a.shape, dtype=a.dtype, batch=a.batch, tokens=a.prompt + a.target, steps=a.steps)

    # SGLang
    with common.runner(path, a.dtype, max_total_tokens=a.kv_tokens, mem_fraction_static=0.5) as r:
        trainer = MeZO(r, cfg)
        row["sgl_infer_peak"] = peak_of(lambda: r.loss(prompts, targets).item())
        t, res = timed_steps(lambda: trainer.step(prompts, targets), a.steps)
        row["sgl_step_peak"] = torch.cuda.max_memory_allocated()
        row["sgl_steps_per_s"] = 1 / t
        row["sgl_first"] = [res[0].loss_plus, res[0].loss_minus, res[0].projected_grad]
    common.free_cuda()

    # HF reference
    hf = common.hf_model(path, a.dtype)
    ids = torch.tensor([p + t for p, t in zip(prompts, targets)], device="cuda")
    labels = ids.clone()
    labels[:, : a.prompt] = -100
    ref = HFMeZO(hf, cfg.lr, cfg.eps, cfg.seed)
    with torch.no_grad():
        row["hf_infer_peak"] = peak_of(lambda: ref.loss(ids, labels).item())
    t, res = timed_steps(lambda: ref.step(ids, labels), a.steps)
    row["hf_step_peak"] = torch.cuda.max_memory_allocated()
    row["hf_steps_per_s"] = 1 / t
    row["hf_first"] = list(res[0])
    row["ratio"] = row["sgl_steps_per_s"] / row["hf_steps_per_s"]
    if a.json:
        a.json.write_text(json.dumps(row, indent=1) + "\n")
    gib = 2**30
    log(f"MeZO {a.shape} {a.dtype}, batch {a.batch} x {a.prompt}+{a.target} tokens, median of {a.steps} steps")
    log("| side | steps/s | peak GiB (step) | peak GiB (inference) | step/inference | L+, L-, g of the 1st timed step |")
    log("|---|---|---|---|---|---|")
    for side, name in (("sgl", "SGLang (sglang/overlay/mezo.py)"), ("hf", "HF reference")):
        first = ", ".join(f"{x:.4f}" for x in row[f"{side}_first"])
        log(f"| {name} | {row[f'{side}_steps_per_s']:.2f} | {row[f'{side}_step_peak'] / gib:.2f} "
            f"| {row[f'{side}_infer_peak'] / gib:.2f} | {row[f'{side}_step_peak'] / row[f'{side}_infer_peak']:.2f} "
            f"| {first} |")
    log(f"steps/s SGLang / HF: {row['ratio']:.2f}")


if __name__ == "__main__":
    main()
