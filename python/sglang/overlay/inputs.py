"""What callers hand a runner, checked before any kernel runs, and cut into batches that fit.

A bad token id that reaches the GPU's embedding lookup is a device-side assert,
and that kills the CUDA context with everything in it (a training run's
weights); a batch larger than the KV pool fails deep inside SGLang's scheduler
structures. So every sequence is checked here first, and each error is a
``ValueError`` that names the sequence (and the position), the value and the
limit. Scoring batches larger than the pool are cut into batches that fit
(scoring keeps no K/V, so the answer is the same as one big batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Limits:
    """What one runner takes: token ids in ``[0, vocab_size)``, sequences of at most
    ``context_len`` tokens, batches of at most ``kv_tokens`` KV slots (``page_size`` granular)
    and ``max_requests`` sequences."""

    vocab_size: int
    context_len: int
    kv_tokens: int
    max_requests: int
    page_size: int = 1

    def slots(self, tokens: int) -> int:
        """The KV slots a sequence of ``tokens`` tokens takes."""
        return math.ceil(tokens / self.page_size) * self.page_size


def _describe(value: Any) -> str:
    text = repr(value)
    return (text if len(text) <= 40 else text[:37] + "...") + f" ({type(value).__name__})"


def token_ids(value: Any, name: str, limits: Limits) -> list[int]:
    """``value`` (a list / tuple of ints, or a 1-D integer tensor or array) as a list of token ids."""
    if hasattr(value, "tolist") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 1:
        if "int" not in str(value.dtype):
            raise ValueError(f"{name} is a tensor of {value.dtype}, not of integer token ids")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} is {_describe(value)}, not a list of token ids")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: every sequence needs at least one token")
    ids = list(value)
    for i, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool):
            raise ValueError(f"{name}[{i}] is {_describe(token)}, not an int token id")
        if not 0 <= token < limits.vocab_size:
            raise ValueError(
                f"{name}[{i}] = {token} is not a token id of this model: ids must be in [0, {limits.vocab_size})"
            )
    return ids


def sequences(value: Any, name: str, limits: Limits) -> list[list[int]]:
    """A non-empty batch of token-id sequences, each checked (``token_ids``)."""
    if hasattr(value, "tolist") and hasattr(value, "dtype") and getattr(value, "ndim", 0) == 2:
        value = list(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} is {_describe(value)}, not a list of token-id sequences")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: give at least one sequence")
    return [token_ids(seq, f"{name}[{i}]", limits) for i, seq in enumerate(value)]


def within_context(lengths: Sequence[int], name: str, limits: Limits, what: str = "tokens") -> None:
    for i, length in enumerate(lengths):
        if length > limits.context_len:
            raise ValueError(
                f"{name}[{i}] has {length} {what}, more than the model's context length {limits.context_len}"
            )


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {_describe(value)}")
    return value


def batches(costs: Sequence[int], name: str, limits: Limits) -> list[range]:
    """Consecutive index ranges whose KV slots (``costs``, one per sequence) and sequence counts fit
    the runner's pools; a sequence that alone does not fit is a ValueError saying what to raise."""
    out: list[range] = []
    start, used = 0, 0
    for i, cost in enumerate(costs):
        if cost > limits.kv_tokens:
            raise ValueError(
                f"{name}[{i}] needs {cost} KV slots, but the runner's KV pool holds {limits.kv_tokens}: build the "
                "runner with a larger RunnerConfig(max_total_tokens=...) (on CUDA, or a larger mem_fraction_static)"
            )
        if i > start and (used + cost > limits.kv_tokens or i - start == limits.max_requests):
            out.append(range(start, i))
            start, used = i, 0
        used += cost
    out.append(range(start, len(costs)))
    return out
