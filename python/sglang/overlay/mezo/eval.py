"""MeZO's evaluation: held-out NLL and the paper's prompt-based accuracy, on the runner as it is.

``evaluate`` scores the weights as they are (no perturbation) with the runner's
batched ``token_logprobs``:

- ``nll``: the mean negative log-likelihood per target token over every example's
  target (the gold candidate where an example has no ``target``), the same
  definition as the training loss;
- ``accuracy``: over the examples with ``candidates``, the fraction whose
  prediction, the candidate of highest *total* log-likelihood given the prompt
  (ties: the first), is ``gold`` (MeZO's prompt-based setting, e.g. SST-2 with
  " great" / " terrible"); None when no example has candidates.

Each distinct (prompt, target) pair is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from sglang.overlay.mezo.data import EvalExample

if TYPE_CHECKING:
    from sglang.overlay.runner import StandaloneRunner


@dataclass(frozen=True)
class EvalResult:
    """``nll`` per target token, ``accuracy`` (None without candidates), the counts, and the
    predicted candidate index per example (None for examples without candidates)."""

    nll: float
    accuracy: Optional[float]
    examples: int
    tokens: int
    predictions: tuple[Optional[int], ...]

    def summary(self) -> dict:
        """What the step log records (no per-example predictions)."""
        return {"nll": self.nll, "accuracy": self.accuracy, "examples": self.examples, "tokens": self.tokens}


def evaluate(runner: StandaloneRunner, examples: Sequence[EvalExample], batch_size: int = 32) -> EvalResult:
    """Score ``examples`` on ``runner`` in batches of ``batch_size`` pairs (see the module docstring)."""
    if not examples or batch_size < 1:
        raise ValueError(
            f"evaluate needs at least one example and batch_size >= 1; got {len(examples)} examples, "
            f"batch_size={batch_size}"
        )
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for example in examples:
        for target in (example.nll_target, *example.candidates):
            index.setdefault((tuple(example.prompt), tuple(target)), len(index))
    pairs = list(index)
    totals: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        logprobs = runner.token_logprobs([list(p) for p, _ in chunk], [list(t) for _, t in chunk])
        totals += [row.double().sum().item() for row in logprobs]
    nll_sum, tokens, right, scored = 0.0, 0, 0, 0
    predictions: list[Optional[int]] = []
    for example in examples:
        prompt = tuple(example.prompt)
        nll_sum -= totals[index[(prompt, tuple(example.nll_target))]]
        tokens += len(example.nll_target)
        if not example.candidates:
            predictions.append(None)
            continue
        scores = [totals[index[(prompt, tuple(c))]] for c in example.candidates]
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
        scored += 1
        right += predictions[-1] == example.gold
    return EvalResult(nll_sum / tokens, right / scored if scored else None, len(examples), tokens, tuple(predictions))
