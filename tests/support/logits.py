"""Logits from a real ModelRunner at every position, and a decode step.

Complements ``tests.support.runtime``. SGLang's LogitsProcessor computes
logits only where sampling needs them (the last position of each sequence).
For every position, ``prefill`` records what the model hands its
LogitsProcessor (the final hidden states of all tokens and the head) with a
forward pre-hook, and applies the head to them as LogitsProcessor does. The
LogitsProcessor's own last-position logits come back too, so the test also
checks that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import torch

from tests.support import runtime


@dataclass
class Prefill:
    """Per-sequence logits at every position, and the batch to decode on."""

    logits: List[torch.Tensor]
    next_token_logits: torch.Tensor
    batch: Any


def prefill(runner, seqs: Sequence[Sequence[int]]) -> Prefill:
    """Prefill ``seqs`` in one EXTEND forward; logits at every position."""
    seen = {}

    def record(module, args, kwargs):
        seen["hidden_states"], seen["lm_head"] = args[1], args[2]

    handle = runner.model.logits_processor.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ext = runtime.extend(runner, seqs)
    finally:
        handle.remove()
    vocab_size = runner.model_config.vocab_size
    hidden = seen["hidden_states"].float()
    logits = hidden @ seen["lm_head"].weight[:vocab_size].float().T
    lens = [len(s) for s in seqs]
    if logits.shape[0] != sum(lens):
        raise AssertionError(f"the model produced {logits.shape[0]} hidden states for {sum(lens)} tokens")
    return Prefill(list(torch.split(logits, lens)), ext.next_token_logits[:, :vocab_size].float(), ext.batch)


def decode(runner, batch, next_ids: Sequence[int]) -> torch.Tensor:
    """One DECODE forward feeding ``next_ids`` (one per sequence); its next-token logits."""
    ids = torch.tensor(list(next_ids), dtype=torch.int64, device=runner.device)
    for req, token in zip(batch.reqs, next_ids):
        req.output_ids.append(int(token))
    batch.output_ids = ids
    batch.input_ids = ids
    batch.prepare_for_decode()
    logits_output, _ = runtime._forward(runner, batch)
    return logits_output.next_token_logits[:, : runner.model_config.vocab_size].float()
