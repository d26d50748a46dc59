"""Forward primitives on a ModelRunner: prefill, score, decode, and the head.

``prefill`` / ``decode`` go through ``ModelRunner.forward`` and keep the K/V
(generation). ``score`` is a scoring forward: nothing decodes after it, so it
keeps no K/V and, where the model has a dense scoring engine
(``sglang.overlay.dense``: OPT and the Llama-style families on the GPU), runs the decoder there,
without the attention backend's metadata or the LogitsProcessor. Every batch
starts from empty KV pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from sglang.overlay import compat


@dataclass
class Forward:
    """One forward: the batch (to continue decoding), its LogitsProcessor output,
    and, when asked for, the final hidden states of every token and the head
    (after :func:`score`: those only, ``batch`` and ``logits_output`` are None)."""

    batch: Any
    logits_output: Any
    lengths: list[int]
    hidden_states: Optional[torch.Tensor] = None
    lm_head: Any = None

    @property
    def next_token_logits(self) -> torch.Tensor:
        return self.logits_output.next_token_logits

    def all_logits(self, vocab_size: int) -> list[torch.Tensor]:
        """fp32 logits at every position, one ``[length, vocab]`` tensor per sequence.

        At tensor parallelism > 1 a collective of the TP group (see :func:`head_logits`)."""
        logits = head_logits(self.every_hidden_state(), self.lm_head, vocab_size).float()
        return list(torch.split(logits, self.lengths))

    def every_hidden_state(self) -> torch.Tensor:
        """The final hidden states of every token, ``[sum(lengths), hidden]`` (``all_positions=True``)."""
        if self.hidden_states is None or self.hidden_states.shape[0] != sum(self.lengths):
            raise RuntimeError("the model did not hand every token's hidden state to its LogitsProcessor")
        return self.hidden_states


def head_logits(hidden_states: torch.Tensor, lm_head, vocab_size: int) -> torch.Tensor:
    """The head's logits ``[rows, vocab_size]`` (model dtype) of final hidden states ``[rows, hidden]``.

    At tensor parallelism > 1 the head is vocab-parallel: each rank holds a contiguous
    shard of the (padded) vocabulary. Each rank computes its shard's logits and the TP
    group all-gathers them, as the LogitsProcessor does; a collective, so every rank
    calls this with the same rows. Every rank gets all the logits."""
    tp_size = getattr(lm_head, "tp_size", 1)
    if tp_size == 1:
        return torch.nn.functional.linear(hidden_states, lm_head.weight[:vocab_size])
    group = compat.tp_group()
    shard = getattr(lm_head, "shard_indices", None)
    if getattr(lm_head, "use_attn_tp_group", False) or group.world_size != tp_size:
        raise RuntimeError(
            f"the head is sharded over {tp_size} ranks but not over the TP group ({group.world_size} ranks; "
            "attention data parallelism?): gathering its logits is not supported here"
        )
    if shard is not None and shard.num_added_elements_padded:
        raise RuntimeError("the head has added (LoRA) vocabulary shards: gathering its logits is not supported here")
    local = torch.nn.functional.linear(hidden_states, lm_head.weight)
    return group.all_gather(local.contiguous(), dim=-1)[:, :vocab_size]


def extend_batch(model_runner, seqs: Sequence[Sequence[int]]):
    """A ScheduleBatch prepared to prefill ``seqs`` in one EXTEND forward, from empty KV pools
    (what was there is freed)."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    model_runner.req_to_token_pool.clear()
    model_runner.token_to_kv_pool_allocator.clear()
    params = SamplingParams(temperature=0, max_new_tokens=1 << 20)
    return compat.new_schedule_batch(model_runner, [compat.new_req(i, ids, params) for i, ids in enumerate(seqs)])


def prefill(model_runner, seqs: Sequence[Sequence[int]], *, all_positions: bool = False) -> Forward:
    """Prefill ``seqs`` in one EXTEND forward through ModelRunner.forward, from empty KV pools."""
    return run_batch(
        model_runner, extend_batch(model_runner, seqs), all_positions=all_positions, lengths=[len(s) for s in seqs]
    )


def _runner_forward(model_runner, forward_batch, all_positions: bool) -> tuple[Any, Optional[torch.Tensor], Any]:
    """ModelRunner.forward: the LogitsProcessor's output and, when ``all_positions``, the final
    hidden states it was handed (every token's in an EXTEND batch) and the head."""
    seen: dict[str, Any] = {}

    def record(module, args, kwargs):
        seen["hidden_states"], seen["lm_head"] = args[1], args[2]

    processor = model_runner.model.logits_processor
    handle = processor.register_forward_pre_hook(record, with_kwargs=True) if all_positions else None
    try:
        with torch.no_grad():
            out = model_runner.forward(forward_batch)
    finally:
        if handle is not None:
            handle.remove()
    return compat.logits_output_of(out), seen.get("hidden_states"), seen.get("lm_head")


def run_batch(model_runner, batch, *, all_positions: bool = False, lengths: Optional[list[int]] = None) -> Forward:
    """Run ``batch`` (prepared for extend or decode) through ModelRunner.forward."""
    logits_output, hidden_states, lm_head = _runner_forward(
        model_runner, compat.forward_batch_of(model_runner, batch), all_positions
    )
    return Forward(batch, logits_output, lengths or [1] * len(batch.reqs), hidden_states, lm_head)


def final_hidden_states(model_runner, forward_batch, *, engine=None, keep_kv: bool = True) -> tuple[torch.Tensor, Any]:
    """The final hidden states of every token of an EXTEND ``forward_batch`` and the head.

    Through ``engine`` (a :class:`sglang.overlay.dense.DenseEngine` of the runner's model) where
    it takes the batch (whole prompts on the GPU in half precision: no attention-backend metadata,
    no LogitsProcessor, and no K/V writes when ``keep_kv`` is False), else through
    ModelRunner.forward (which always writes the K/V)."""
    if engine is not None:
        hidden_states = engine.forward(forward_batch, model_runner.token_to_kv_pool, write_kv=keep_kv)
        if hidden_states is not None:
            return hidden_states, model_runner.model.lm_head
    _, hidden_states, lm_head = _runner_forward(model_runner, forward_batch, all_positions=True)
    return hidden_states, lm_head


def score(model_runner, seqs: Sequence[Sequence[int]], *, engine=None) -> Forward:
    """One EXTEND forward of ``seqs`` for the final hidden states of every token
    (``every_hidden_state()``, ``all_logits()``), from empty KV pools, keeping no K/V
    (:func:`final_hidden_states`; the dense engine takes the token ids without a batch,
    ``DenseEngine.score``): nothing decodes after it, so ``batch`` and ``logits_output`` are None."""
    lengths = [len(s) for s in seqs]
    hidden_states = None if engine is None else engine.score(seqs)
    if hidden_states is not None:
        return Forward(None, None, lengths, hidden_states, model_runner.model.lm_head)
    forward_batch = compat.forward_batch_of(model_runner, extend_batch(model_runner, seqs))
    hidden_states, lm_head = final_hidden_states(model_runner, forward_batch, engine=engine, keep_kv=False)
    return Forward(None, None, lengths, hidden_states, lm_head)


def decode(model_runner, batch, next_ids: torch.Tensor) -> Forward:
    """One DECODE forward of ``batch`` (after ``prefill`` or ``decode``) feeding ``next_ids``,
    one token id per sequence, as an int64 tensor on the runner's device (no host sync)."""
    batch.output_ids = next_ids
    batch.input_ids = next_ids
    batch.prepare_for_decode()
    return run_batch(model_runner, batch)


def target_logprobs(hidden_states: torch.Tensor, lm_head, vocab_size: int, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under the logits of final hidden state ``hidden_states[i]`` (fp32 ``[rows]``).

    The logits are computed in the model's dtype and normalized in fp32, as ``log_softmax(logits.float())``
    does, but without materializing them in fp32 (``sglang.overlay.logprobs``). At tensor
    parallelism > 1 from the gathered logits (:func:`head_logits`, a collective of the TP group)."""
    from sglang.overlay.logprobs import gather_logprobs

    return gather_logprobs(head_logits(hidden_states, lm_head, vocab_size), targets)
