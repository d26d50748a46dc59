#!/usr/bin/env python3
"""MeZO on the GPU: steps/s against an HF reference MeZO and against the hardware's roofline; drift.

    PYTHONPATH=/tmp/site:. python3 benchmarks/mezo_gpu.py [--shape opt-1.3b --batch 16 --prompt 128 --target 128]

Shapes: OPT's (gpu_shared/common.py SHAPES) and the other families' (FAMILY_SHAPES: llama-3.2-1b, llama-3-8b,
qwen2.5-7b). Task shapes: ``--prompt 48 --target 1`` (SST-2-like: a prompt and one label token), ``--prompt
256 --target 1``, ``--prompt 128 --target 128``. SGLang's runner keeps prefill CUDA graphs of the scoring
forward by default (the dense engine: OPT; ``--prefill-graphs 0`` turns them off); other families score
through SGLang's backend path (ModelRunner.forward).

Both sides run MeZO on the same random checkpoint (gpu_shared/common.py), model dtype, batch
``--batch`` x (``--prompt`` + ``--target``) tokens, loss = mean NLL over the target tokens.

- SGLang: ``MeZO(StandaloneRunner, MeZOConfig)`` (sglang/overlay/mezo/trainer.py) as ``train`` runs it:
  ``step(defer_update=True)``, so a step is 2 loss forwards (the dense engine) + 2 passes over the
  weights (sglang/overlay/mezo/noise.py: z from (seed, element offset) inside one Triton kernel a pass,
  the update of each step folded into the next step's first perturbation). ``--z-math`` and ``--z-layout``
  pick the kernel's variant (benchmarks/zo_kernel_parts.py times them apart); ``--profile`` adds the GPU
  kernel time of one loss forward and one step by category.
- HF reference (written here, the paper's scheme): ``OPTForCausalLM(input_ids, labels=...)`` under
  ``no_grad``, z from ``torch.randn`` per parameter, 4 passes a step (+εz, -2εz, +εz, -lr·g·z). Its z is
  not SGLang's (different generators): compare the mean loss (L+ + L-)/2, not L+ and L- apart.
Roofline of a step: 2 loss forwards at the bf16 matmul peak measured in the run + 2 weight passes
(each reads and writes every weight) at the copy bandwidth measured in the run. Perturbation share:
the time of SGLang's two passes alone (CUDA events) over its step time. Peak memory:
``torch.cuda.max_memory_allocated`` during the timed steps against the same side's inference (one loss
forward). Drift (``--drift-steps N``): N steps with lr = 0 (the passes only: with lr = 0 the losses do
not change what is written), then max and mean |θ - θ0| over all weights, for both schemes.
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
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from gpu_shared import common  # noqa: E402


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


def overlap_probe(r, trainer, prompts, targets) -> dict:
    """Milliseconds of a step's two loss forwards alone, its two weight passes alone (1 z and 2 z, zero
    coefficients: the weights are rewritten unchanged), and both at once on two streams."""
    from measure import cuda_time

    from sglang.overlay.mezo.noise import Stream

    side = torch.cuda.Stream()

    def forwards():
        r.loss(prompts, targets)
        r.loss(prompts, targets)

    def passes():
        trainer.noise([Stream(1, 0.0, 0.0), Stream(2, 0.0, 0.0)])
        trainer.noise([Stream(2, 0.0, 0.0)])

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            passes()
        forwards()
        torch.cuda.current_stream().wait_stream(side)

    out = {name: cuda_time(fn, 10) * 1e3 for name, fn in (("forwards", forwards), ("passes", passes), ("both", both))}
    log(
        f"overlap: 2 loss forwards {out['forwards']:.2f} ms, 2 passes {out['passes']:.2f} ms, both on two streams "
        f"{out['both']:.2f} ms (one after the other: {out['forwards'] + out['passes']:.2f}; the longer alone: "
        f"{max(out['forwards'], out['passes']):.2f})"
    )
    return out


def flops_per_token(cfg, seq: int) -> float:
    """Matmul FLOPs a token costs in a forward of ``seq`` tokens: 2 per weight of every linear layer (the head
    included, at every position), and causal attention's 2 x layers x width x seq (scores and values, half
    of the square on average)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    if model.get_output_embeddings() is not None and not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        weights += model.get_output_embeddings().weight.numel()
    layers = cfg.num_hidden_layers
    width = (
        cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) else cfg.hidden_size
    )
    return 2 * weights + 2 * layers * width * seq


# Published MeZO throughputs at the SST-2-like shape (OPT-1.3B, batch 16), quoted beside the table
# (../shared/notes/anchors.md): official MeZO (princeton-nlp/MeZO, fp16, A100: 79.6 s / 1,000 steps, as zo-vllm
# reports it) and zo-vllm (arXiv 2605.28760, playeriv65/zo-vllm phase6/README.md: 31.2 s / 1,000 steps with
# factorized low-rank perturbations, not MeZO's Gaussian z; GPU not named).
ANCHORS = (
    ("official MeZO (princeton-nlp/MeZO)", 1000 / 79.6),
    ("zo-vllm, factorized z (arXiv 2605.28760)", 1000 / 31.2),
)


class HFMeZO:
    """The reference: MeZO on an HF OPTForCausalLM, same z stream as sglang/overlay/mezo/trainer.py."""

    def __init__(self, model, lr: float, eps: float, seed: int):
        from sglang.overlay.mezo.config import derive_seed

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
    ap.add_argument("--drift-steps", type=int, default=1000)
    ap.add_argument("--mem-fraction", type=float, default=0.5, help="the runner's mem_fraction_static")
    ap.add_argument(
        "--dummy",
        action="store_true",
        help="random weights made in place (SGLang load_format=dummy, HF from the config): no "
        "checkpoint on disk; the default from opt-13b up",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the HF reference (shapes where two copies do not fit)")
    ap.add_argument(
        "--z-math",
        type=int,
        default=None,
        choices=[0, 1, 2, 3],
        help="the z kernel's transcendentals (default: NoisePass.FAST): 0 precise (z's definition), "
        "1 hardware sin/cos, 2 also log with a polynomial near u = 1, 3 the hardware log everywhere",
    )
    ap.add_argument(
        "--z-layout",
        type=int,
        default=None,
        choices=[0, 1, 2],
        help="the z kernel's block layout (default: NoisePass.LAYOUT): 0 joined, 1 rows of four, "
        "2 vectors of four where the tensors are aligned to 4 elements (rows of four elsewhere)",
    )
    ap.add_argument("--z-block", type=int, default=None, help="offsets per program of the z kernel (NoisePass.BLOCK)")
    ap.add_argument("--z-warps", type=int, default=None, help="warps per program of the z kernel (NoisePass.WARPS)")
    ap.add_argument(
        "--z-rounds", type=int, default=None, help="MeZOConfig.z_rounds, Philox rounds of z (default: the config's)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one loss forward and one step (GPU kernel time by category, the top kernels)",
    )
    ap.add_argument(
        "--overlap",
        action="store_true",
        help="also time a step's two loss forwards and two weight passes on two streams at once, against each "
        "alone (the passes with zero coefficients: they rewrite the weights unchanged): what running the passes "
        "beside the forwards could save",
    )
    ap.add_argument(
        "--prefill-graphs",
        type=int,
        default=None,
        help="RunnerConfig.prefill_graphs (default: the runner's, on where the dense engine takes the model; 0: off)",
    )
    ap.add_argument(
        "--dense-engine",
        type=int,
        choices=(0, 1),
        default=1,
        help="RunnerConfig.dense_engine: 1 scores through the dense engine where it takes the model (OPT, "
        "Llama, Mistral, Qwen2, Qwen3), 0 through ModelRunner.forward and the attention backend",
    )
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an SGLang server argument of the runner (VALUE read as JSON where it parses, else a string), "
        "e.g. cuda_graph_backend_prefill=breakable with disable_cuda_graph=false: upstream's prefill graphs",
    )
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    server_args = {}
    for item in a.server_arg:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--server-arg takes NAME=VALUE, got {item!r}")
        try:
            server_args[name] = json.loads(value)
        except json.JSONDecodeError:
            server_args[name] = value
    from sglang.overlay.mezo import MeZO, MeZOConfig
    from sglang.overlay.mezo.noise import NoisePass

    if a.z_math is not None:
        NoisePass.FAST = a.z_math
    if a.z_layout is not None:
        NoisePass.LAYOUT = a.z_layout
    if a.z_block is not None:
        NoisePass.BLOCK = a.z_block
    if a.z_warps is not None:
        NoisePass.WARPS = a.z_warps

    dummy = a.dummy or a.shape in ("opt-13b", "opt-30b", "opt-66b", "llama-3-8b", "qwen2.5-7b")
    path = common.config_only(a.shape) if dummy else common.checkpoint(a.shape)
    load = dict(load_format="dummy") if dummy else {}
    g = torch.Generator().manual_seed(11)
    prompts = [[2] + torch.randint(3, 50000, (a.prompt - 1,), generator=g).tolist() for _ in range(a.batch)]
    targets = [torch.randint(3, 50000, (a.target,), generator=g).tolist() for _ in range(a.batch)]
    cfg = MeZOConfig(lr=1e-6, eps=1e-3, seed=0, **({} if a.z_rounds is None else {"z_rounds": a.z_rounds}))
    row = dict(
        shape=a.shape,
        dtype=a.dtype,
        batch=a.batch,
        tokens=a.prompt + a.target,
        steps=a.steps,
        weights="dummy" if dummy else "checkpoint",
        z_math=NoisePass.FAST,
        z_layout=NoisePass.LAYOUT,
        z_block=NoisePass.BLOCK,
        z_warps=NoisePass.WARPS,
        z_rounds=cfg.z_rounds,
        prefill_graphs=a.prefill_graphs,
        dense_engine=bool(a.dense_engine),
        server_args=server_args,
    )

    from measure import copy_bandwidth, cuda_time, kernel_summary, matmul_peak_tflops

    from sglang.overlay.mezo.noise import Stream

    row["matmul_peak_tflops"] = matmul_peak_tflops()
    row["copy_tb_s"] = copy_bandwidth() / 1e12
    log(f"in-run ceilings: bf16 matmul {row['matmul_peak_tflops']:.0f} TFLOP/s, copy {row['copy_tb_s']:.2f} TB/s")

    # SGLang
    with common.runner(
        path,
        a.dtype,
        max_total_tokens=a.kv_tokens,
        mem_fraction_static=a.mem_fraction,
        prefill_graphs=a.prefill_graphs,
        dense_engine=bool(a.dense_engine),
        **load,
        **server_args,
    ) as r:
        trainer = MeZO(r, cfg)
        row["sgl_engine"] = None if r.engine is None else type(r.engine).__name__
        row["sgl_graphs"] = r.engine is not None and r.engine.graphs is not None
        r.fit_prefill_graphs([list(map(r.scored_length, prompts, targets))])
        assert trainer.noise.uses_kernel(), "the Triton pass kernel is not used"
        weight_bytes = sum(w.numel() * w.element_size() for w in trainer.weights.values())
        row["weight_bytes"], row["weight_tensors"] = weight_bytes, len(trainer.weights)
        row["sgl_infer_peak"] = peak_of(lambda: r.loss(prompts, targets).item())
        row["sgl_loss_ms"] = cuda_time(lambda: r.loss(prompts, targets).item(), 5) * 1e3
        # The first loss above ran eagerly (a prefill graph is captured the second time a shape comes); the
        # steps replay the graph, which holds its static output: inference as it runs again and again.
        row["sgl_infer_peak_replay"] = peak_of(lambda: r.loss(prompts, targets).item())
        t, res = timed_steps(lambda: trainer.step(prompts, targets, defer_update=True), a.steps)
        trainer.sync()
        row["sgl_step_peak"] = torch.cuda.max_memory_allocated()
        row["sgl_steps_per_s"] = 1 / t
        row["sgl_first"] = [res[0].loss_plus, res[0].loss_minus, res[0].projected_grad]
        one = cuda_time(lambda: trainer.noise([Stream(1, 0.0, 0.0)]), 10) * 1e3
        two = cuda_time(lambda: trainer.noise([Stream(1, 0.0, 0.0), Stream(2, 0.0, 0.0)]), 10) * 1e3
        row["sgl_pass_ms"], row["sgl_fold_pass_ms"] = one, two
        row["sgl_perturb_share"] = (one + two) / 1e3 / t
        if a.overlap:
            row["overlap"] = overlap_probe(r, trainer, prompts, targets)
        if a.profile:
            row["profile_loss"] = kernel_summary(lambda: r.loss(prompts, targets).item(), "loss forward", top=16)
            row["profile_step"] = kernel_summary(
                lambda: trainer.step(prompts, targets, defer_update=True), "MeZO step", top=8
            )
        # Drift: train's passes with lr = 0 (fold: the previous step's restore rides in the next
        # perturbation), then the final sync.
        eps = cfg.eps

        def sgl_passes(k):
            if k == 0:
                trainer.noise([Stream(1000 + k, 0.0, eps)])
            else:
                trainer.noise([Stream(1000 + k - 1, 0.0, eps), Stream(1000 + k, 0.0, eps)])
            trainer.noise([Stream(1000 + k, 0.0, -2 * eps)])

        if a.drift_steps and not dummy:  # dummy weights: θ0 is a second copy that may not fit
            weights = list(trainer.weights.values())
            start = [w.detach().float().clone() for w in weights]
            for k in range(a.drift_steps):
                sgl_passes(k)
            trainer.noise([Stream(1000 + a.drift_steps - 1, 0.0, eps)])
            diffs = [(w.float() - s0).abs() for w, s0 in zip(weights, start)]
            row["sgl_drift"] = (
                max(d.max().item() for d in diffs),
                sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
            )
    common.free_cuda()
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(path)
    seq = a.prompt + a.target
    loss_flops = a.batch * seq * flops_per_token(hf_cfg, seq)
    roof = 2 * loss_flops / (row["matmul_peak_tflops"] * 1e12) + 2 * 2 * weight_bytes / (row["copy_tb_s"] * 1e12)
    row["roofline_steps_per_s"] = 1 / roof
    row["fraction_of_roofline"] = row["sgl_steps_per_s"] / row["roofline_steps_per_s"]
    row["sgl_tokens_per_s"] = a.batch * seq * row["sgl_steps_per_s"]

    if not a.no_hf:
        try:  # a reference that does not fit leaves SGLang's half of the table
            hf_side(a, row, path, dummy, cfg, prompts, targets)
        except torch.OutOfMemoryError as e:
            row["hf_error"] = f"out of memory: {e}".splitlines()[0]
            log(f"HF reference: {row['hf_error']}")
    if a.json:
        a.json.write_text(json.dumps(row, indent=1) + "\n")
    report(a, row, weight_bytes)


def hf_side(a, row: dict, path, dummy: bool, cfg, prompts, targets) -> None:
    """The HF reference's half of the row (steps/s, peak memory, first step, drift)."""
    seq = a.prompt + a.target
    hf = common.hf_from_config(path, a.dtype) if dummy else common.hf_model(path, a.dtype)
    ids = torch.tensor([p + t for p, t in zip(prompts, targets)], device="cuda")
    labels = ids.clone()
    labels[:, : a.prompt] = -100
    ref = HFMeZO(hf, cfg.lr, cfg.eps, cfg.seed)
    with torch.no_grad():
        row["hf_infer_peak"] = peak_of(lambda: ref.loss(ids, labels).item())
    t, res = timed_steps(lambda: ref.step(ids, labels), a.steps)
    row["hf_step_peak"] = torch.cuda.max_memory_allocated()
    row["hf_steps_per_s"] = 1 / t
    row["hf_tokens_per_s"] = a.batch * seq * row["hf_steps_per_s"]
    row["hf_first"] = list(res[0])
    row["ratio"] = row["sgl_steps_per_s"] / row["hf_steps_per_s"]
    if a.drift_steps and not dummy:
        params = ref.params
        start = [p.detach().float().clone() for p in params]
        with torch.no_grad():
            for k in range(a.drift_steps):
                seed = 1000 + k
                ref.perturb(seed, 1.0)
                ref.perturb(seed, -2.0)
                ref.perturb(seed, 1.0)
        diffs = [(p.float() - s0).abs() for p, s0 in zip(params, start)]
        row["hf_drift"] = (
            max(d.max().item() for d in diffs),
            sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
        )


def report(a, row: dict, weight_bytes: int) -> None:
    gib = 2**30
    log(
        f"MeZO {a.shape} {a.dtype}, batch {a.batch} x {a.prompt}+{a.target} tokens, median of {a.steps} steps; "
        f"{row['weight_tensors']} weight tensors, {weight_bytes / 1e9:.2f} GB; z: Philox4x32-{row['z_rounds']}, "
        f"layout {row['z_layout']}, BLOCK {row['z_block']}, {row['z_warps']} warps, math {row['z_math']}"
    )
    log("| side | steps/s | tokens/s | peak GiB (step) | peak GiB (inference) | step/inference | mean loss 1st step |")
    log("|---|---|---|---|---|---|---|")
    sides = [
        s
        for s in (("sgl", "SGLang (sglang/overlay/mezo/trainer.py)"), ("hf", "HF reference"))
        if f"{s[0]}_first" in row
    ]
    for side, name in sides:
        first = row[f"{side}_first"]
        log(
            f"| {name} | {row[f'{side}_steps_per_s']:.2f} | {row[f'{side}_tokens_per_s']:,.0f} "
            f"| {row[f'{side}_step_peak'] / gib:.2f} | {row[f'{side}_infer_peak'] / gib:.2f} "
            f"| {row[f'{side}_step_peak'] / row[f'{side}_infer_peak']:.3f} | {(first[0] + first[1]) / 2:.4f} |"
        )
    if "sgl_infer_peak_replay" in row:
        log(
            f"SGLang inference peak with the prefill graph replayed: {row['sgl_infer_peak_replay'] / gib:.2f} GiB; "
            f"step / that: {row['sgl_step_peak'] / row['sgl_infer_peak_replay']:.3f}"
        )
    if "ratio" in row:
        log(f"steps/s SGLang / HF: {row['ratio']:.2f}")
    if "hf_error" in row:
        log(f"HF reference: {row['hf_error']}")
    log(
        f"roofline: {row['roofline_steps_per_s']:.2f} steps/s (2 loss forwards at {row['matmul_peak_tflops']:.0f} TFLOP/s "
        f"+ 2 weight passes at {row['copy_tb_s']:.2f} TB/s); SGLang at {row['fraction_of_roofline']:.1%} of it"
    )
    log(
        f"SGLang scoring path: {row['sgl_engine'] or 'ModelRunner.forward (attention backend)'}, "
        f"prefill graphs {'on' if row['sgl_graphs'] else 'off'}"
    )
    log(
        f"SGLang step {1e3 / row['sgl_steps_per_s']:.2f} ms: loss forward {row['sgl_loss_ms']:.2f} ms x 2, "
        f"perturbation pass {row['sgl_pass_ms']:.3f} ms + folded pass {row['sgl_fold_pass_ms']:.3f} ms "
        f"({row['sgl_perturb_share']:.1%} of the step; a pass at the copy bandwidth: "
        f"{2 * weight_bytes / (row['copy_tb_s'] * 1e12) * 1e3:.3f} ms)"
    )
    if a.shape == "opt-1.3b" and (a.prompt, a.target, a.batch) == (48, 1, 16):
        for name, steps_per_s in ANCHORS:
            log(
                f"anchor, same task shape: {name} {steps_per_s:.1f} steps/s; SGLang here {row['sgl_steps_per_s'] / steps_per_s:.2f}x that"
            )
    if "sgl_drift" in row and "hf_drift" in row:
        log(
            f"drift after {a.drift_steps} lr=0 steps, max / mean |θ - θ0|: SGLang {row['sgl_drift'][0]:.3e} / "
            f"{row['sgl_drift'][1]:.3e}, HF reference {row['hf_drift'][0]:.3e} / {row['hf_drift'][1]:.3e}"
        )


if __name__ == "__main__":
    main()
