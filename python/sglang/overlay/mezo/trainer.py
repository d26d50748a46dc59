"""The ``MeZO`` trainer on a :class:`StandaloneRunner`'s model (the algorithm: ``sglang.overlay.mezo``).

What a caller sees is θ. ``step(defer_update=True)`` (what ``train`` does)
leaves the weights at θ - eps·z until the next step's first pass applies the
update. The trainer registers ``sync`` with its runner
(``StandaloneRunner.register_weight_sync``), and the runner calls it before
every public forward and before handing out its model, so evaluation, a
callback's ``runner.logits``, checkpoints and ``hf_state_dict`` all read θ
exactly. The trainer's own scoring of θ ± eps·z never has an update pending
(each step's first perturbation applies it), so it costs no extra pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from sglang.overlay import quiet
from sglang.overlay.mezo import checkpoint, params
from sglang.overlay.mezo.config import MeZOConfig, StepResult, derive_seed
from sglang.overlay.mezo.data import Batch, EvalExample
from sglang.overlay.mezo.dp import DataParallel
from sglang.overlay.mezo.eval import EvalResult, evaluate
from sglang.overlay.mezo.lora import add_lora
from sglang.overlay.mezo.noise import NoisePass, Stream
from sglang.overlay.mezo.progress import Progress

if TYPE_CHECKING:
    from sglang.overlay.runner import StandaloneRunner


class MeZO:
    """MeZO on a :class:`StandaloneRunner`'s model, in place (see ``sglang.overlay.mezo``)."""

    def __init__(
        self, runner: StandaloneRunner, config: MeZOConfig, data_parallel: Optional[DataParallel] = None
    ) -> None:
        """``data_parallel``: this trainer is one replica (``sglang.overlay.mezo.dp``), scoring its share of
        every batch; every replica takes the same steps."""
        config.validate()
        if runner.server_args.pp_size != 1:
            raise ValueError(f"MeZO runs on pipeline-parallel size 1 only, the runner has {runner.server_args.pp_size}")
        self.tp_rank, self.tp_size = runner.config.tp_rank, runner.config.tp_size
        if self.tp_size > 1 and config.lora_rank is not None:
            raise ValueError("LoRA with tensor parallelism is not supported: train LoRA with tp_size=1")
        self.runner, self.config, self.steps_done, self.dp = runner, config, 0, data_parallel
        # The update of the last deferred step (step(defer_update=True)): (seed, a, b, keep) of its pass.
        self._pending: Optional[tuple[int, float, float, float]] = None
        self.hf_config = runner.hf_config
        self.placements = params.place(runner.model, self.hf_config, self.tp_rank, self.tp_size)
        self._weights = {name: placement.view for name, placement in self.placements.items()}
        self.device = next(iter(self._weights.values())).device
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if config.lora_rank is None:
            self._trainables = dict(self._weights)
            bases = {name: p.base for name, p in self.placements.items()}
            rows = {name: p.rows for name, p in self.placements.items() if p.rows is not None}
            transposed = [name for name, p in self.placements.items() if p.transposed]
        else:
            seed = derive_seed(self.config.seed, "lora-init")
            self.lora = add_lora(self.runner.model, self.placements, self.config, seed)
            self._trainables = {
                f"{prefix}.lora_{x}.weight": t for prefix, ab in self.lora.items() for x, t in zip("AB", ab)
            }
            bases, rows, transposed, offset = {}, {}, [], 0
            for name, tensor in self._trainables.items():  # LoRA's z: offsets in A/B order
                bases[name], offset = offset, offset + tensor.numel()
        no_decay = params.no_weight_decay(self.hf_config)
        decays = [name for name in self._trainables if name not in no_decay]
        shifted = [name for name in decays if name in self.placements and self.placements[name].shift]
        if shifted and config.weight_decay:
            raise ValueError(
                f"{shifted[0]} is stored with a constant added, so weight decay on it would decay that "
                "too: train with weight_decay=0"
            )
        self.noise = NoisePass(self._trainables, bases, decays, rows, transposed, config.z_rounds)
        runner.register_weight_sync(self.sync)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Every HF parameter (this rank's part), as a view of the SGLang parameter holding it: θ."""
        self.sync()
        return self._weights

    @property
    def trainables(self) -> dict[str, torch.Tensor]:
        """What MeZO perturbs and updates (every weight, or LoRA's A/B): θ."""
        self.sync()
        return self._trainables

    @property
    def lead(self) -> bool:
        """Whether this process writes the run's files: tensor-parallel rank 0 of data-parallel replica 0."""
        return self.tp_rank == 0 and (self.dp is None or self.dp.rank == 0)

    def perturb(self, seed: int, scale: float) -> None:
        """θ += scale·eps·z(seed), in place (a pending deferred update is applied in the same pass)."""
        self._pass(Stream(seed, 0.0, scale * self.config.eps))

    def _update(self, seed: int, projected_grad: float, lr: float) -> tuple[Stream, float]:
        """The pass that takes θ - eps·z to θ - lr·(g·z + wd·θ), restoring θ in the same pass over z:
        k·θ_m + (k·eps - lr·g)·z with θ_m = θ - eps·z and k = 1 - lr·wd where weight decay applies."""
        return Stream(seed, self.config.eps, -lr * projected_grad), 1 - lr * self.config.weight_decay

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
        """Apply a deferred update: the weights are then θ exactly. The runner calls it before every
        forward and model access it serves; nothing else needs to."""
        if self._pending is not None:
            seed, a, b, keep = self._pending
            self._pending = None
            self.noise([Stream(seed, a, b)], keep)

    def local_part(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole HF tensor ``full`` named ``name`` (a LoRA tensor: all of it)."""
        placement = self.placements.get(name)
        return full if placement is None else params.local_part(placement, full)

    def _loss(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> torch.Tensor | float:
        """The mean NLL of the batch's target tokens: a 0-dim tensor not read back yet, so that the
        host queues the next pass and forward before it waits for this one (with data parallelism:
        over every replica's share, read back by the all-reduce)."""
        if self.dp is None:
            return self.runner.loss(prompts, targets)
        prompts, targets = self.dp.share(prompts), self.dp.share(targets)
        nll = -torch.cat(self.runner.token_logprobs(prompts, targets)) if prompts else torch.zeros(0)
        return self.dp.mean(nll.sum().item(), nll.numel())

    def sample_seeds(self, step: int) -> list[int]:
        """The z seeds of step ``step``: ``derive_seed(seed, "step", step)`` for one sample, else
        ``derive_seed(seed, "step", step, "sample", i)`` for each sample i."""
        if self.config.n_samples == 1:
            return [derive_seed(self.config.seed, "step", step)]
        return [derive_seed(self.config.seed, "step", step, "sample", i) for i in range(self.config.n_samples)]

    def step(
        self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, defer_update: bool = False
    ) -> StepResult:
        """One MeZO step on a batch; the weights are updated in place.

        ``defer_update`` (one sample per step): the update is not applied now but in the same pass as
        the next step's first perturbation (2 passes over the weights a step instead of 3), or by
        ``sync()`` before anything else reads the weights (see the module docstring).

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
            loss_plus, loss_minus = float(loss_plus), float(loss_minus)  # the step's one wait for the GPU
            if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                self.perturb(seed, 1.0)
                raise FloatingPointError(
                    f"step {step}: loss is not finite (L+={loss_plus}, L-={loss_minus}); "
                    "the weights are restored and not updated: lower lr or eps"
                )
            if i < len(seeds) - 1:
                self.perturb(seed, 1.0)
            pluses.append(loss_plus)
            minuses.append(loss_minus)
        grads = [(plus - minus) / (2 * eps) for plus, minus in zip(pluses, minuses)]
        q = len(seeds)
        stream, keep = self._update(seeds[-1], grads[-1] / q, lr)
        if defer_update and q == 1:
            self._pending = (stream.seed, stream.a, stream.b, keep)
        else:
            self._pass(stream, keep)
        for seed, grad in zip(seeds[:-1], grads[:-1]):
            self.perturb(seed, -lr * grad / (q * eps))
        self.steps_done += 1
        loss_plus, loss_minus = _mean(pluses), _mean(minuses)
        return StepResult(step, seeds[0], loss_plus, loss_minus, _mean(grads), (loss_plus + loss_minus) / 2, lr)

    def train(
        self,
        batches: Sequence[Batch],
        steps: int,
        progress: bool = True,
        callback: Optional[Callable[[StepResult], None]] = None,
    ) -> list[StepResult]:
        """``steps`` more steps; step k (counted from the trainer's first) on ``batches[k % len(batches)]``;
        ``callback(result)`` after each; a progress bar shows the loss. The last step's update stays
        deferred (the next step's first pass applies it); whatever reads the weights applies it first."""
        if steps < 0 or not batches:
            raise ValueError(
                f"train needs steps >= 0 and at least one batch; got steps={steps}, {len(batches)} batches"
            )
        lengths = [list(map(self.runner.scored_length, prompts, targets)) for prompts, targets in batches]
        self.runner.fit_prefill_graphs([self.dp.share(x) if self.dp is not None else x for x in lengths])
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
            bar.close()
        return results

    def evaluate(self, examples: Sequence[EvalExample], batch_size: int = 32) -> EvalResult:
        """Held-out NLL and candidate accuracy on θ (:mod:`sglang.overlay.mezo.eval`); at tensor
        parallelism every rank calls it."""
        return evaluate(self.runner, examples, batch_size)

    def facts(self) -> dict[str, Any]:
        """What a checkpoint must share with the trainer that loads it, besides the MeZOConfig."""
        return checkpoint.model_facts(
            self.hf_config.to_dict(), self.device.type, next(iter(self._trainables.values())).dtype
        )

    def save_checkpoint(self, directory: str | Path, run: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
        """A resumable checkpoint, written atomically (:mod:`sglang.overlay.mezo.checkpoint`); ``run``:
        facts a resume must match (data hash, batch size); ``extra``: kept, not compared."""
        if self.tp_size > 1:
            raise ValueError("checkpoints at tensor parallelism > 1 are not supported yet: save_pretrained works")
        self.sync()
        state = {
            "steps_done": self.steps_done,
            "mezo_config": asdict(self.config),
            "facts": self.facts(),
            "run": run or {},
            "extra": extra or {},
        }
        lora = {name: t.detach().to("cpu", copy=True) for name, t in self._trainables.items()} if self.lora else None
        return checkpoint.save_checkpoint(directory, self._write_pretrained, state, lora)

    def load_checkpoint(self, directory: str | Path, run: Optional[dict] = None) -> dict:
        """Load a checkpoint's weights in place and its ``steps_done``; ValueError for other settings."""
        if self.tp_size > 1:
            raise ValueError("checkpoints at tensor parallelism > 1 are not supported yet")
        state = checkpoint.read_state(directory)
        checkpoint.check_compatible(state, asdict(self.config), self.facts(), run, directory)
        if self.lora:
            targets = self._trainables
            shapes = {name: tuple(t.shape) for name, t in targets.items()}
        else:
            targets = self._weights
            shapes = {name: tuple(shape) for name, shape in params.hf_parameter_shapes(self.hf_config)}
        loaded = checkpoint.load_tensors(directory, shapes, bool(self.lora))
        self._pending = None  # the checkpoint's weights replace whatever is there
        with torch.no_grad():
            for name, tensor in targets.items():
                tensor.copy_(self.local_part(name, loaded[name]))
        self.steps_done = int(state["steps_done"])
        return state

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's weights (CPU copies, ``named_parameters`` names), LoRA merged: W0 + (alpha/r)·B A.
        At tensor parallelism > 1 the shards are gathered: every rank calls it."""
        self.sync()
        state = params.gather(self.placements, self.hf_config, self.tp_size)
        if self.config.lora_rank is not None:
            scale = self.config.lora_alpha / self.config.lora_rank
            for prefix, (a, b) in self.lora.items():
                state[f"{prefix}.weight"] = (self._weights[f"{prefix}.weight"] + scale * (b @ a)).cpu()
        return state

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """An HF checkpoint (config.json, model.safetensors) that ``AutoModelForCausalLM.from_pretrained`` loads.
        Every rank calls it (tensor parallelism gathers the shards); the lead rank writes."""
        return self._write_pretrained(Path(out_dir), write=self.lead)

    def _write_pretrained(self, out_dir: Path, write: bool = True) -> Path:
        state = self.hf_state_dict()
        model = params.hf_model(self.hf_config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()  # a tied head is not in the state: it takes the embeddings
        if unexpected or any(p.is_meta for p in model.parameters()):
            raise RuntimeError(
                f"the trainer's weights do not fill the HF model: missing {missing}, unexpected {unexpected}"
            )
        if write:
            with quiet.scope(self.runner.config.log_level):  # HF's one-shard "Writing model shards" bar
                model.save_pretrained(out_dir)
        return Path(out_dir)


def _mean(values: Sequence[float]) -> float:
    return values[0] if len(values) == 1 else sum(values) / len(values)
