"""Logits from a real ModelRunner at every position, and a decode step.

SGLang's LogitsProcessor computes logits only where sampling needs them (the
last position of each sequence). ``sglang.overlay`` records what the
model hands its LogitsProcessor (the final hidden states of all tokens and the
head) and applies the head to them; the LogitsProcessor's own last-position
logits come back too, so the tests also check that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import torch


@dataclass
class Prefill:
    """Per-sequence logits at every position, and the batch to decode on."""

    logits: List[torch.Tensor]
    next_token_logits: torch.Tensor
    batch: Any


def prefill(runner, seqs: Sequence[Sequence[int]]) -> Prefill:
    """Prefill ``seqs`` in one EXTEND forward; logits at every position."""
    from sglang.overlay.forward import prefill as standalone_prefill

    vocab_size = runner.model_config.vocab_size
    fwd = standalone_prefill(runner, seqs, all_positions=True)
    return Prefill(fwd.all_logits(vocab_size), fwd.next_token_logits[:, :vocab_size].float(), fwd.batch)


def decode(runner, batch, next_ids: Sequence[int]) -> torch.Tensor:
    """One DECODE forward feeding ``next_ids`` (one per sequence); its next-token logits."""
    from sglang.overlay.forward import decode as standalone_decode

    for req, token in zip(batch.reqs, next_ids):
        req.output_ids.append(int(token))
    ids = torch.tensor(list(next_ids), dtype=torch.int64, device=runner.device)
    return standalone_decode(runner, batch, ids).next_token_logits[:, : runner.model_config.vocab_size].float()
