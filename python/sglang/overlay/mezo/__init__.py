"""MeZO: zeroth-order SGD (Malladi et al. 2023) on SGLang's in-process runner.

Algorithm. Each step takes a fresh step seed s and a batch, and uses forward
passes only::

    θ += ε·z(s);  L+ = loss(θ)          # z(s) ~ N(0, 1), one tensor per parameter
    θ -= 2ε·z(s); L- = loss(θ)
    g = (L+ - L-) / (2ε)                 # the projected gradient
    θ += ε·z(s)                          # back to θ (up to rounding), and in the same pass
    θ -= lr·(g·z(s) + wd·θ)              # wd only on weights: not biases, not layer norms

z is never stored: each pass over the weights recomputes it from (s, element),
so training needs the memory of inference. Restoring θ and updating it is one
pass; ``train`` also folds each step's update into the next step's first
perturbation (``step(defer_update=True)``): 2 passes a step, one rounding per
element per pass (``sglang.overlay.mezo.noise``; on CUDA one Triton kernel a
pass). ``loss`` is the runner's mean NLL over all target tokens (fp32).

n-SPSA (``n_samples`` q > 1, the paper's appendix): q projected gradients at θ,
each with its own z, and θ -= lr·((1/q)·Σ g_i·z_i + wd·θ). ``lr_schedule``
"linear" uses lr·(1 - k/total_steps) at step k (a pure function of k, so a
resumed run stays exact); "constant" uses lr.

Determinism. Step k (0-based) of a trainer with ``MeZOConfig.seed`` S uses
``derive_seed(S, "step", k)`` (63 bits of SHA-256); with q > 1 samples,
sample i uses ``derive_seed(S, "step", k, "sample", i)``. z of element i of HF
parameter p is ``noise.normal(seed, base(p) + i, z_rounds)`` (counter-based Philox4x32 with
``MeZOConfig.z_rounds`` rounds, 10 unless set; ``base(p)``: the elements of the parameters before p in HF
``OPTForCausalLM.named_parameters()`` order), the same on every device and
layout: ``params.place`` maps each HF parameter onto this rank's view of
the SGLang parameter holding it (row thirds of the fused ``qkv_proj``, the
vocabulary rows of the padded embedding / head, tensor-parallel row or column
shards) and its offsets. Tensor parallelism: every rank perturbs its shards at
their HF offsets (TP = 2 draws TP = 1's z); pipeline parallelism: size 1 only.

LoRA (the paper's PEFT setting). With ``lora_rank`` r, each target projection
(``q_proj`` and ``v_proj``) of every layer gets A (r × in, uniform in
±1/sqrt(in), like peft's kaiming-uniform, drawn from ``derive_seed(S,
"lora-init")`` on CPU, layer by layer, targets in config order) and B (out × r,
zeros). Only A and B are perturbed and updated, their z at offsets in the order
layer → target → A, B (names ``...self_attn.q_proj.lora_A.weight`` etc.); the base weights are
never written. A forward hook on each layer's fused ``qkv_proj`` adds
``(alpha/r)·(x Aᵀ) Bᵀ`` to the target's column slice of its output, which is
peft's unmerged LoRA, and needs no copy of the base weights.
``save_pretrained`` writes ``W0 + (alpha/r)·B A`` (merged).

KV cache. Every scoring call of ``StandaloneRunner`` clears the request and
KV pools before its prefill, and the runner is built with
``disable_radix_cache=True``: the K/V of each perturbation pass are computed
from the weights as they are at that pass. Reusing K/V across the passes would
be wrong anyway, since every layer's K/V depends on the perturbed weights.

Command line (a JSON Lines file of ``{"prompt": ..., "target": ...}``, each a
list of token ids, or a string tokenized with the model directory's
tokenizer)::

    python -m sglang.overlay.mezo --model DIR --data train.jsonl --steps 1000 \\
        --lr 1e-6 --eps 1e-3 --seed 0 --out DIR [--lora-rank 8 --lora-alpha 16] \\
        [--save-every 100 [--resume]] [--eval-data dev.jsonl --eval-every 100] \\
        [--n-samples 2] [--lr-schedule linear]

The package, one module a job:

- ``config``: every setting, declared once (``MeZOConfig``, ``RunConfig``); seeds;
- ``trainer``: the ``MeZO`` class (steps, sync, evaluation, checkpoints, HF export);
- ``noise``: z and the pass over the weights; ``params``: where each HF parameter lives;
  ``lora``: the adapters; ``dp``: data-parallel replicas;
- ``data``: the JSON Lines files; ``eval``: held-out NLL and accuracy;
- ``checkpoint``: checkpoint folders; ``run``: a run with its log, checkpoints, resume, evaluations;
- ``__main__``: the command line, generated from ``config``'s dataclasses.

A resumed run ends bit-identical to an uninterrupted one (same device type and dtype).
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {
    "MeZO": "sglang.overlay.mezo.trainer",
    "MeZOConfig": "sglang.overlay.mezo.config",
    "RunConfig": "sglang.overlay.mezo.config",
    "StepResult": "sglang.overlay.mezo.config",
    "EvalExample": "sglang.overlay.mezo.data",
    "EvalResult": "sglang.overlay.mezo.eval",
    "run_training": "sglang.overlay.mezo.run",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (``python -m sglang.overlay.mezo --help`` needs no torch)."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sglang.overlay.mezo' has no attribute {name!r}")
