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
element per pass (``sglang.overlay.zo_noise``; on CUDA one Triton kernel a
pass). ``loss`` is the runner's mean NLL over all target tokens (fp32).

n-SPSA (``n_samples`` q > 1, the paper's appendix): q projected gradients at θ,
each with its own z, and θ -= lr·((1/q)·Σ g_i·z_i + wd·θ). ``lr_schedule``
"linear" uses lr·(1 - k/total_steps) at step k (a pure function of k, so a
resumed run stays exact); "constant" uses lr.

Determinism. Step k (0-based) of a trainer with ``MeZOConfig.seed`` S uses
``derive_seed(S, "step", k)`` (63 bits of SHA-256); with q > 1 samples,
sample i uses ``derive_seed(S, "step", k, "sample", i)``. z of element i of HF
parameter p is ``zo_noise.normal(seed, base(p) + i)`` (counter-based Philox,
``base(p)``: the elements of the parameters before p in HF
``OPTForCausalLM.named_parameters()`` order), the same on every device and
layout: ``mezo_params.place`` maps each HF parameter onto this rank's view of
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

The step log, checkpoints, resume and evaluation are ``mezo_run`` /
``mezo_checkpoint`` / ``mezo_eval``; a resumed run ends bit-identical to an
uninterrupted one (same device type and dtype).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch

from sglang.overlay import mezo_checkpoint
from sglang.overlay.mezo_data import Batch, EvalExample, file_sha256, load_batches, load_eval_examples
from sglang.overlay.mezo_eval import EvalResult, evaluate
from sglang.overlay import mezo_params, quiet
from sglang.overlay.mezo_config import LR_SCHEDULES, MeZOConfig, StepResult, decays, derive_seed
from sglang.overlay.mezo_dp import DataParallel, launch_layout
from sglang.overlay.mezo_lora import add_lora
from sglang.overlay.mezo_params import hf_parameter_shapes, hf_parameter_views  # noqa: F401  (public here too)
from sglang.overlay.zo_noise import NoisePass, Stream
from sglang.overlay.mezo_run import Progress, plan_resume, run_training

if TYPE_CHECKING:
    from sglang.overlay.runner import StandaloneRunner

class MeZO:
    """MeZO on a :class:`StandaloneRunner`'s model, in place (see the module docstring)."""

    def __init__(self, runner: StandaloneRunner, config: MeZOConfig,
                 data_parallel: Optional[DataParallel] = None) -> None:
        """``data_parallel``: this trainer is one replica (``sglang.overlay.mezo_dp``), scoring its share of
        every batch; every replica takes the same steps."""
        from transformers import AutoConfig

        config.validate()
        if runner.server_args.pp_size != 1:
            raise ValueError(f"MeZO runs on pipeline-parallel size 1 only, the runner has {runner.server_args.pp_size}")
        self.tp_rank, self.tp_size = runner.config.tp_rank, runner.config.tp_size
        if self.tp_size > 1 and config.lora_rank is not None:
            raise ValueError("LoRA with tensor parallelism is not supported: train LoRA with tp_size=1")
        self.runner, self.config, self.steps_done, self.dp = runner, config, 0, data_parallel
        # The update of the last deferred step (step(defer_update=True)): (seed, a, b, keep) of its pass.
        self._pending: Optional[tuple[int, float, float, float]] = None
        self.hf_config = AutoConfig.from_pretrained(runner.config.model_path)
        if self.hf_config.model_type != "opt":
            raise ValueError(f"MeZO here supports OPT checkpoints only, {runner.config.model_path} is "
                             f"{self.hf_config.model_type!r}")
        self.placements = mezo_params.place(runner.model, self.hf_config, self.tp_rank, self.tp_size)
        self.weights = {name: placement.view for name, placement in self.placements.items()}
        self.device = next(iter(self.weights.values())).device
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if config.lora_rank is None:
            self.trainables = dict(self.weights)
            bases = {name: p.base for name, p in self.placements.items()}
            rows = {name: p.rows for name, p in self.placements.items() if p.rows is not None}
        else:
            self.trainables = self._add_lora(config.lora_rank)
            bases, rows, offset = {}, {}, 0
            for name, tensor in self.trainables.items():  # LoRA's z: offsets in A/B order
                bases[name], offset = offset, offset + tensor.numel()
        self.noise = NoisePass(self.trainables, bases, [n for n in self.trainables if decays(n)], rows)

    def _add_lora(self, rank: int) -> dict[str, torch.Tensor]:
        """LoRA A/B for every target of every layer, and the qkv_proj hooks that apply them."""
        self.lora = add_lora(self.runner.model, self.weights, self.hf_config, self.config,
                             derive_seed(self.config.seed, "lora-init"))
        return {f"{prefix}.lora_{x}.weight": t for prefix, ab in self.lora.items() for x, t in zip("AB", ab)}

    def perturb(self, seed: int, scale: float) -> None:
        """θ += scale·eps·z(seed), in place (a pending deferred update is applied in the same pass)."""
        self._pass(Stream(seed, 0.0, scale * self.config.eps))

    def _restore_and_update(self, seed: int, projected_grad: float) -> None:
        """From θ - eps·z: θ -= lr·(g·z + wd·θ), with θ restored in the same pass over z.

        θ_new = θ_r - lr·(g·z + wd·θ_r) with θ_r = θ_m + eps·z, i.e.
        k·θ_m + (k·eps - lr·g)·z with k = 1 - lr·wd where weight decay applies: one pass, not two.
        """
        self._pass(*self._update(seed, projected_grad))

    def _update(self, seed: int, projected_grad: float) -> tuple[Stream, float]:
        lr, eps, weight_decay = self.config.lr, self.config.eps, self.config.weight_decay
        return Stream(seed, eps, -lr * projected_grad), 1 - lr * weight_decay

    def _pass(self, stream: Stream, keep: float = 1.0) -> None:
        """One pass over the weights: ``stream`` (and ``keep``), after the pending update if any, which
        then rides in the same pass (its own decay factor; a perturbation has none)."""
        if self._pending is None:
            self.noise([stream], keep)
            return
        seed, a, b, pending_keep = self._pending
        self._pending = None
        if keep != 1.0:
            self.noise([Stream(seed, a, b)], pending_keep)
            self.noise([stream], keep)
        else:  # k·θ + (k·a + b)·z_pending + (scale·eps)·z: the second stream's coefficient ignores k
            self.noise([Stream(seed, a, b), Stream(stream.seed, 0.0, stream.a + stream.b)], pending_keep)

    def sync(self) -> None:
        """Apply a deferred update: the weights are then θ exactly (done before anything reads them)."""
        if self._pending is not None:
            seed, a, b, keep = self._pending
            self._pending = None
            self.noise([Stream(seed, a, b)], keep)

    def local_part(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole HF tensor ``full`` named ``name`` (a LoRA tensor: all of it)."""
        placement = self.placements.get(name)
        return full if placement is None else mezo_params.local_part(placement, full)

    def _loss(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> float:
        """The mean NLL of the batch's target tokens (with data parallelism: over every replica's share)."""
        if self.dp is None:
            return self.runner.loss(prompts, targets).item()
        prompts, targets = self.dp.share(prompts), self.dp.share(targets)
        nll = -torch.cat(self.runner.token_logprobs(prompts, targets)) if prompts else torch.zeros(0)
        return self.dp.mean(nll.sum().item(), nll.numel())

    def sample_seeds(self, step: int) -> list[int]:
        """The z seeds of step ``step``: ``derive_seed(seed, "step", step)`` for one sample, else
        ``derive_seed(seed, "step", step, "sample", i)`` for each sample i."""
        if self.config.n_samples == 1:
            return [derive_seed(self.config.seed, "step", step)]
        return [derive_seed(self.config.seed, "step", step, "sample", i) for i in range(self.config.n_samples)]

    @contextlib.contextmanager
    def _lr(self, lr: float) -> Iterator[None]:
        """``self.config.lr`` (what the update reads) set to the step's scheduled ``lr`` meanwhile."""
        config = self.config
        if lr != config.lr:
            self.config = dataclasses.replace(config, lr=lr)
        try:
            yield
        finally:
            self.config = config

    def step(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *,
             defer_update: bool = False) -> StepResult:
        """One MeZO step on a batch; the weights are updated in place.

        ``defer_update`` (one sample per step): the update is not applied now but in the same pass as
        the next step's first perturbation (2 passes over the weights a step instead of 3); until then
        the weights are θ - eps·z: ``sync()`` applies it (``train``, ``evaluate``, the checkpoints and
        ``hf_state_dict`` do).

        n-SPSA (``n_samples`` q > 1): q projected gradients g_i, each at θ, then
        θ -= lr·((1/q)·Σ g_i·z_i + wd·θ): the last sample's restore is fused with its
        update and weight decay, the others are restored after scoring and updated after.
        """
        step, eps = self.steps_done, self.config.eps
        lr, seeds = self.config.lr_at(step), self.sample_seeds(step)
        pluses, minuses = [], []
        for i, seed in enumerate(seeds):
            self.perturb(seed, 1.0)
            loss_plus = self._loss(prompts, targets)
            self.perturb(seed, -2.0)
            loss_minus = self._loss(prompts, targets)
            if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                self.perturb(seed, 1.0)
                raise FloatingPointError(f"step {step}: loss is not finite (L+={loss_plus}, L-={loss_minus}); "
                                         "the weights are restored and not updated: lower lr or eps")
            if i < len(seeds) - 1:
                self.perturb(seed, 1.0)
            pluses.append(loss_plus)
            minuses.append(loss_minus)
        grads = [(plus - minus) / (2 * eps) for plus, minus in zip(pluses, minuses)]
        q = len(seeds)
        with self._lr(lr):
            if defer_update and q == 1:
                stream, keep = self._update(seeds[-1], grads[-1])
                self._pending = (stream.seed, stream.a, stream.b, keep)
            else:
                self._restore_and_update(seeds[-1], grads[-1] / q)
        for seed, grad in zip(seeds[:-1], grads[:-1]):
            self.perturb(seed, -lr * grad / (q * eps))
        self.steps_done += 1
        loss_plus, loss_minus = _mean(pluses), _mean(minuses)
        return StepResult(step, seeds[0], loss_plus, loss_minus, _mean(grads), (loss_plus + loss_minus) / 2, lr)

    def train(self, batches: Sequence[Batch], steps: int, progress: bool = True,
              callback: Optional[Callable[[StepResult], None]] = None) -> list[StepResult]:
        """``steps`` more steps; step k (counted from the trainer's first) on ``batches[k % len(batches)]``;
        ``callback(result)`` after each; a progress bar shows the loss."""
        if steps < 0 or not batches:
            raise ValueError(f"train needs steps >= 0 and at least one batch; got steps={steps}, "
                             f"{len(batches)} batches")
        bar = Progress(steps, progress)
        results = []
        try:
            for _ in range(steps):
                prompts, targets = batches[self.steps_done % len(batches)]
                results.append(self.step(prompts, targets, defer_update=True))
                bar.update(results[-1])
                if callback is not None:
                    callback(results[-1])
        finally:
            self.sync()
            bar.close()
        return results

    def evaluate(self, examples: Sequence[EvalExample], batch_size: int = 32) -> EvalResult:
        """Held-out NLL and candidate accuracy on the current weights (:mod:`sglang.overlay.mezo_eval`)."""
        self.sync()
        return evaluate(self.runner, examples, batch_size)

    def save_checkpoint(self, directory: str | Path, run: Optional[dict] = None) -> Path:
        """A resumable checkpoint, written atomically (:mod:`sglang.overlay.mezo_checkpoint`); ``run``:
        facts a resume must match (data hash, batch size)."""
        if self.tp_size > 1:
            raise ValueError("checkpoints at tensor parallelism > 1 are not supported yet: save_pretrained works")
        self.sync()
        return mezo_checkpoint.save_checkpoint(self, directory, run)

    def load_checkpoint(self, directory: str | Path, run: Optional[dict] = None) -> dict:
        """Load a checkpoint's weights in place and its ``steps_done``; ValueError for other settings."""
        if self.tp_size > 1:
            raise ValueError("checkpoints at tensor parallelism > 1 are not supported yet")
        self._pending = None  # the checkpoint's weights replace whatever is there
        return mezo_checkpoint.load_checkpoint(self, directory, run)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """HF OPTForCausalLM weights (CPU copies), LoRA merged: W0 + (alpha/r)·B A. At tensor
        parallelism > 1 the shards are gathered: every rank calls it."""
        self.sync()
        state = mezo_params.gather(self.placements, self.hf_config, self.tp_size)
        if self.config.lora_rank is not None:
            scale = self.config.lora_alpha / self.config.lora_rank
            for prefix, (a, b) in self.lora.items():
                state[f"{prefix}.weight"] = (self.weights[f"{prefix}.weight"] + scale * (b @ a)).cpu()
        return state

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """An HF checkpoint (config.json, model.safetensors) that ``OPTForCausalLM.from_pretrained`` loads."""
        from transformers import OPTForCausalLM

        state = self.hf_state_dict()
        with torch.device("meta"):
            model = OPTForCausalLM(self.hf_config)
        if self.hf_config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        if self.tp_rank == 0:  # every rank gathers; one writes
            with quiet.scope(self.runner.config.log_level):  # HF's one-shard "Writing model shards" bar
                model.save_pretrained(out_dir)
        return Path(out_dir)


def _mean(values: Sequence[float]) -> float:
    return values[0] if len(values) == 1 else sum(values) / len(values)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_NUMBER_FLAGS = ("--lr", "--eps", "--weight-decay", "--lora-alpha", "--seed", "--steps", "--batch-size", "--lora-rank",
                 "--n-samples", "--save-every", "--keep-checkpoints", "--eval-every", "--eval-batch-size")


def _join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--eps -1e-3`` as ``--eps=-1e-3``: argparse takes ``-1e-3`` for an option, not a number, and
    says "expected one argument" instead of what is wrong with the value."""
    out: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in _NUMBER_FLAGS and args and args[0].startswith("-"):
            try:
                float(args[0])
            except ValueError:
                pass
            else:
                arg = f"{arg}={args.pop(0)}"
        out.append(arg)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sglang.overlay.mezo",
                                     description="MeZO (zeroth-order SGD) on SGLang's in-process OPT runner.")
    parser.add_argument("--model", required=True, help="HF OPT model directory (local)")
    parser.add_argument("--data", required=True, type=Path, help='JSON Lines of {"prompt": ..., "target": ...}')
    parser.add_argument("--steps", required=True, type=_int_at_least(1))
    parser.add_argument("--out", required=True, type=Path, help="where the trained HF checkpoint goes")
    parser.add_argument("--lr", type=float, default=MeZOConfig.lr)
    parser.add_argument("--eps", type=float, default=MeZOConfig.eps)
    parser.add_argument("--seed", type=_int_at_least(0), default=MeZOConfig.seed)
    parser.add_argument("--weight-decay", type=float, default=MeZOConfig.weight_decay)
    parser.add_argument("--lora-rank", type=_int_at_least(1), default=None,
                        help="train LoRA on q_proj/v_proj with this rank")
    parser.add_argument("--lora-alpha", type=float, default=MeZOConfig.lora_alpha)
    parser.add_argument("--batch-size", type=_int_at_least(1), default=8)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--tp-size", type=_int_at_least(1), default=1,
                        help="tensor parallelism: launch with torchrun, tp-size processes per replica; "
                             "more processes are data-parallel replicas")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--n-samples", type=_int_at_least(1), default=MeZOConfig.n_samples,
                        help="n-SPSA: perturbations per step, projected gradients averaged")
    parser.add_argument("--lr-schedule", default=MeZOConfig.lr_schedule, choices=LR_SCHEDULES,
                        help="linear: lr decays to 0 at --steps")
    parser.add_argument("--save-every", type=_int_at_least(1), default=None,
                        help="write a resumable checkpoint to OUT/checkpoints/step-NNNNNN every K steps")
    parser.add_argument("--keep-checkpoints", type=_int_at_least(1), default=None,
                        help="keep only the N newest checkpoints (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in OUT/checkpoints (none: start at step 0)")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help='held-out JSON Lines: {"prompt", "target"} and/or {"candidates": [...], "gold": i}')
    parser.add_argument("--eval-every", type=_int_at_least(1), default=None,
                        help="evaluate every K steps (always: before the first step and after the last)")
    parser.add_argument("--eval-batch-size", type=_int_at_least(1), default=32)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--verbose", action="store_true",
                        help="show every upstream message (default: drop those sglang.overlay.quiet.NOISE lists)")
    return parser.parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; a user error (bad flag value, data, model folder) is one ``error:`` line."""
    from sglang.overlay.runner import StandaloneRunner

    args = parse_args(argv)
    config = MeZOConfig(lr=args.lr, eps=args.eps, seed=args.seed, weight_decay=args.weight_decay,
                        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, n_samples=args.n_samples,
                        lr_schedule=args.lr_schedule, total_steps=args.steps if args.lr_schedule == "linear" else None)
    try:
        config.validate()
        if args.eval_every is not None and args.eval_data is None:
            raise ValueError("--eval-every needs --eval-data FILE (held-out examples)")
        if (args.save_every is not None or args.resume) and args.tp_size > 1:
            raise ValueError("checkpoints (--save-every, --resume) need --tp-size 1 (data parallelism is fine)")
        dp, rank, runner_config = launch_layout(args.model, args.device, args.dtype, args.tp_size)
        runner_config = dataclasses.replace(runner_config, log_level="verbose" if args.verbose else "quiet")
        runner_config.validate()
        batches = load_batches(args.data, args.batch_size, args.model)
        examples = load_eval_examples(args.eval_data, args.model) if args.eval_data is not None else None
        run = {"data_sha256": file_sha256(args.data), "batch_size": args.batch_size,
               "examples": sum(len(b.prompts) for b in batches)}
        if rank == 0:
            plan_resume(args.out, args.resume, dataclasses.asdict(config), run)  # before the model is built
        with StandaloneRunner(runner_config) as runner:
            trainer = MeZO(runner, config, data_parallel=dp)
            if rank == 0:  # the log, evaluations and checkpoints; every replica takes the same steps
                results = run_training(trainer, batches, args.steps, args.out, save_every=args.save_every,
                                       keep_checkpoints=args.keep_checkpoints, eval_examples=examples,
                                       eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
                                       resume=args.resume, run=run, progress=not args.no_progress)
            else:
                newest = mezo_checkpoint.latest_checkpoint(Path(args.out) / "checkpoints") if args.resume else None
                if newest is not None:
                    trainer.load_checkpoint(newest, run)
                results = trainer.train(batches, args.steps - trainer.steps_done, progress=False)
            out = trainer.save_pretrained(args.out)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if rank != 0:
        return 0
    (out / "mezo_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    print(f"saved {out} after {trainer.steps_done} steps; last loss {results[-1].loss:.4f}" if results
          else f"saved {out} after {trainer.steps_done} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
