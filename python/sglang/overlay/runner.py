"""``StandaloneRunner``: SGLang's forward pass in-process, without a server.

For work that needs logits of a model many times from Python (zeroth-order
training such as MeZO, evaluation loops, tests), this builds a ``ModelRunner``
for a model path with defaults that work on CPU and GPU, scores batches of
token sequences, and tears the runner down::

    from sglang.overlay import RunnerConfig, StandaloneRunner

    with StandaloneRunner(RunnerConfig(model_path="/path/to/opt")) as runner:
        logits = runner.logits([[2, 100, 200], [2, 5]])       # every position
        loss = runner.loss(prompts=[[2, 100]], targets=[[200, 300]])

Each scoring call starts from empty KV pools, and this path has no radix
cache: K/V computed before an in-place weight change are never read after it.
Scoring calls keep no K/V at all; for the native OPT they run on the dense
scoring engine (``sglang.overlay.dense``) where it takes the batch.

Code that holds an update of the weights not yet written (MeZO's deferred
update) registers a sync with ``register_weight_sync``: the runner calls it
before every forward it serves and before handing out ``model``, so nothing
reads weights with an update pending.

Several runners can live in one process: ``distributed="reuse"`` builds a
runner on the torch.distributed and model-parallel groups that already exist
(``sglang.srt.distributed.reuse.allow_reuse``). Runners do not share KV pools;
each holds its own weights and pools. A runner destroys only the distributed
state that runners created: a world or groups the caller made survive.

Tensor parallelism: one process per rank, each building its own runner with
``RunnerConfig(tp_size=N, tp_rank=r, dist_port=PORT)`` (one port that all ranks
share; on CUDA rank r uses GPU r). The ranks build and score in lockstep: every
rank calls the same methods with the same sequences, since each forward (and
the gather of the vocab-parallel head in ``logits`` / ``token_logprobs``) is a
collective over the TP group. Each rank gets the full results.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from sglang.overlay import compat, inputs, quiet
from sglang.overlay.config import RunnerConfig, SettingError, make_server_args
from sglang.overlay.dense import DenseEngine, to_device
from sglang.overlay.dense_llama import LlamaEngine
from sglang.overlay.dense_opt import OPTEngine
from sglang.overlay.forward import decode, prefill, score, target_logprobs
from sglang.overlay.graphs import enable_graphs


@dataclass
class _Created:
    """The distributed state that runners of this process created (and may destroy)."""

    world: bool = False
    groups: bool = False


# Prefill CUDA graphs kept when RunnerConfig.prefill_graphs is None and the dense engine takes the model.
DEFAULT_PREFILL_GRAPHS = 8
MAX_PREFILL_GRAPHS = 64  # what fit_prefill_graphs keeps at most (they share one memory pool)

_LIVE_RUNNERS: list["StandaloneRunner"] = []
_CREATED = _Created()


class StandaloneRunner:
    """A ModelRunner built in-process for one model (see the module docstring)."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config.resolved()
        self._weight_syncs: list[Callable[[], None]] = []
        if self.config.server_args.get("tp_size", self.config.tp_size) != self.config.tp_size:
            # make_server_args lets server_args override any field; a runner takes its ranks from the config.
            raise ValueError(
                f"server_args sets tp_size={self.config.server_args['tp_size']!r}, the config tp_size="
                f"{self.config.tp_size}: set it with RunnerConfig(tp_size=...) (with tp_rank and dist_port), "
                "not through server_args"
            )
        if self.config.distributed == "fresh" and compat.distributed_exists():
            raise ValueError(
                "torch.distributed or SGLang's model-parallel groups already exist in this process: build "
                "with RunnerConfig(distributed='reuse') to reuse them, or close the other runners first"
            )
        if self.config.distributed == "reuse" and torch.distributed.is_initialized():
            world = (torch.distributed.get_world_size(), torch.distributed.get_rank())
            if world != (self.config.tp_size, self.config.tp_rank):
                raise ValueError(
                    f"distributed='reuse' keeps the existing torch.distributed world (world size {world[0]}, rank "
                    f"{world[1]}), which is not this runner's layout (tp_size={self.config.tp_size}, tp_rank="
                    f"{self.config.tp_rank}): build with RunnerConfig(tp_size={world[0]}, tp_rank={world[1]}) or "
                    "close the other runners first"
                )
        world_before = torch.distributed.is_initialized()
        groups_before = compat.model_parallel_exists()
        try:
            with quiet.scope(self.config.log_level):  # drops upstream's noise (quiet.NOISE) unless "verbose"
                self.server_args = make_server_args(self.config)
                with self._reuse_allowed():
                    self.runner = compat.build_model_runner(
                        self.server_args,
                        tp_rank=self.config.tp_rank,
                        dist_port=self.config.dist_port,
                        gpu_id=self.config.first_gpu + self.config.tp_rank,
                    )
        except BaseException as error:
            # A failed build leaves nothing behind: the distributed state it created goes, so the next
            # runner builds (other live runners' state stays).
            _destroy(
                groups=not groups_before and compat.model_parallel_exists(),
                world=not world_before and torch.distributed.is_initialized(),
            )
            explained = _explain(error, self.config)
            if explained is None:
                raise
            raise explained from error
        _CREATED.world |= not world_before and torch.distributed.is_initialized()
        _CREATED.groups |= not groups_before and compat.model_parallel_exists()
        _LIVE_RUNNERS.append(self)
        runner = self.runner
        self.limits = inputs.Limits(
            vocab_size=runner.model_config.vocab_size,
            context_len=runner.model_config.context_len,
            kv_tokens=runner.max_total_num_tokens,
            max_requests=runner.req_to_token_pool.size,
            page_size=compat.page_size(runner),
        )
        self.engine = attach_engine(self.runner.model) if self.config.dense_engine else None
        graphs = self.config.prefill_graphs
        if graphs is None:  # the default: on where the engine takes the model, on CUDA
            graphs = DEFAULT_PREFILL_GRAPHS if self.engine is not None and self.config.device == "cuda" else 0
        if graphs:
            if self.engine is None:
                self.close()
                raise ValueError(
                    f"{type(self.runner.model).__name__} has no prefill CUDA graphs here: they are the dense "
                    "engine's, which takes OPT, Llama, Mistral, Qwen2 and Qwen3 without quantization on one "
                    "tensor-parallel rank (and dense_engine=True); build with prefill_graphs=0"
                )
            enable_graphs(self.engine, graphs)

    def _reuse_allowed(self):
        if self.config.distributed != "reuse":
            return contextlib.nullcontext()
        from sglang.srt.distributed.reuse import allow_reuse

        return allow_reuse()

    def register_weight_sync(self, sync: Callable[[], None]) -> None:
        """Call ``sync()`` before every forward this runner serves and before ``model`` is handed out: the
        owner of an update not yet written to the weights (a MeZO trainer's deferred update) writes it."""
        self._weight_syncs.append(sync)

    def _sync_weights(self) -> None:
        for sync in self._weight_syncs:
            sync()

    @property
    def model(self) -> torch.nn.Module:
        """The SGLang model, its weights as they are (every registered sync applied first)."""
        self._sync_weights()
        return self.runner.model

    @property
    def hf_config(self) -> Any:
        """The model's HF config, as SGLang loaded it."""
        return self.runner.model_config.hf_config

    @property
    def vocab_size(self) -> int:
        return self.runner.model_config.vocab_size

    def logits(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """fp32 logits at every position: one ``[len(seq), vocab]`` tensor per sequence."""
        seqs = self._checked(seqs, "seqs")
        self._sync_weights()
        padded = self._padded(seqs)
        out: list[torch.Tensor] = []
        for part in self._batches([len(s) for s in padded], "seqs"):
            logits = score(self.runner, [padded[i] for i in part], engine=self.engine).all_logits(self.vocab_size)
            out += [row[: len(seqs[i])] for i, row in zip(part, logits)]
        return out

    @staticmethod
    def scored_length(prompt: Sequence[int], target: Sequence[int]) -> int:
        """The tokens a forward runs to score ``target`` after ``prompt`` (``token_logprobs``, ``loss``): all but
        the target's last, whose position would only predict what follows the target."""
        return len(prompt) + len(target) - 1

    def fit_prefill_graphs(self, batches: Sequence[Sequence[int]]) -> None:
        """Keep enough prefill graphs for forwards of these sequence lengths (one list per batch, as they will
        run: ``scored_length`` for scoring), each padded to its bucket: a trainer that cycles through its data
        replays a graph a step instead of capturing one. Nothing where prefill graphs are off; at most
        MAX_PREFILL_GRAPHS."""
        if self.engine is None or self.engine.graphs is None:
            return
        shapes = {(len(lengths), self._bucketed(max(lengths))) for lengths in batches if lengths}
        graphs = self.engine.graphs
        graphs.max_graphs = min(max(graphs.max_graphs, len(shapes) + 2), MAX_PREFILL_GRAPHS)

    def _bucketed(self, length: int) -> int:
        bucket = self.config.graph_bucket
        return min(-(-length // bucket) * bucket, self.limits.context_len) if bucket else length

    def _padded(self, seqs: list[list[int]]) -> list[list[int]]:
        """``seqs`` padded at their end (token 0) to one length, the longest rounded up to a multiple of
        ``graph_bucket`` (at most the context length), where prefill graphs are on: batches of similar
        lengths then share a graph. Causal attention leaves the real tokens' scores as they were."""
        if not self.config.graph_bucket or self.engine is None or self.engine.graphs is None:
            return seqs
        length = self._bucketed(max(len(s) for s in seqs))
        return [s + [0] * (length - len(s)) for s in seqs]

    def token_logprobs(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log p(target[t] | prompt, target[:t]) for every target token, one tensor per pair."""
        prompts = inputs.sequences(prompts, "prompts", self.limits)
        targets = inputs.sequences(targets, "targets", self.limits)
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: give one target per prompt")
        inputs.within_context([len(p) + len(t) for p, t in zip(prompts, targets)], "prompts + targets", self.limits)
        self._sync_weights()
        # scored_length tokens each: the target's last is never an input (its position would predict what
        # follows the target).
        seqs = self._padded([p + t[:-1] for p, t in zip(prompts, targets)])
        out: list[torch.Tensor] = []
        for part in self._batches([len(s) for s in seqs], "prompts + targets"):
            out += self._token_logprobs([prompts[i] for i in part], [targets[i] for i in part], [seqs[i] for i in part])
        return out

    def _token_logprobs(
        self, prompts: list[list[int]], targets: list[list[int]], seqs: list[list[int]]
    ) -> list[torch.Tensor]:
        """The targets' log-probs from one forward of ``seqs`` (each prompt + target but its last token, maybe
        padded after)."""
        fwd = score(self.runner, seqs, engine=self.engine)
        rows, start = [], 0
        for prompt, target, length in zip(prompts, targets, fwd.lengths):
            rows.extend(range(start + len(prompt) - 1, start + len(prompt) - 1 + len(target)))
            start += length
        hidden = fwd.every_hidden_state()
        rows, ids = to_device([rows, [t for target in targets for t in target]], hidden.device)
        logprobs = target_logprobs(hidden[rows], fwd.lm_head, self.vocab_size, ids)
        return list(torch.split(logprobs, [len(t) for t in targets]))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations: ``max_new_tokens`` token ids after each prompt (no stop tokens).

        One prefill, then one decode forward per token for the whole batch (the decode CUDA graph
        when the runner has one); the token ids stay on the device until the end. A batch larger
        than the KV pool runs in parts (the same tokens: greedy decoding is per sequence)."""
        prompts = inputs.sequences(prompts, "prompts", self.limits)
        max_new_tokens = inputs.positive_int(max_new_tokens, "max_new_tokens")
        totals = [len(p) + max_new_tokens for p in prompts]
        inputs.within_context(totals, "prompts", self.limits, what=f"tokens with max_new_tokens={max_new_tokens}")
        self._sync_weights()
        out: list[list[int]] = []
        for part in self._batches(totals, "prompts"):
            out += self._generate([prompts[i] for i in part], max_new_tokens)
        return out

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        vocab = self.vocab_size
        fwd = prefill(self.runner, prompts)
        ids = fwd.next_token_logits[:, :vocab].argmax(-1)
        out = [ids]
        for _ in range(max_new_tokens - 1):
            ids = decode(self.runner, fwd.batch, ids).next_token_logits[:, :vocab].argmax(-1)
            out.append(ids)
        return torch.stack(out, 1).tolist()

    def _checked(self, seqs, name: str) -> list[list[int]]:
        seqs = inputs.sequences(seqs, name, self.limits)
        inputs.within_context([len(s) for s in seqs], name, self.limits)
        return seqs

    def _batches(self, lengths: list[int], name: str) -> list[range]:
        return inputs.batches([self.limits.slots(n) for n in lengths], name, self.limits)

    def loss(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean negative log-likelihood over all target tokens of the batch (fp32 scalar)."""
        return -torch.cat(self.token_logprobs(prompts, targets)).mean()

    def close(self) -> None:
        """Release this runner. The last one alive destroys the model-parallel groups and the
        torch.distributed world, each only if runners created it."""
        if self not in _LIVE_RUNNERS:
            return
        _LIVE_RUNNERS.remove(self)
        self._weight_syncs.clear()
        if self.engine is not None:
            self.engine.close()
        self.runner.req_to_token_pool.clear()
        self.runner.token_to_kv_pool_allocator.clear()
        if not _LIVE_RUNNERS:
            _destroy(groups=_CREATED.groups, world=_CREATED.world)
            _CREATED.world = _CREATED.groups = False
        del self.runner

    def __enter__(self) -> "StandaloneRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_engine(model: torch.nn.Module) -> Optional[DenseEngine]:
    """The dense scoring engine of the family that takes ``model`` (sglang.overlay.dense), or None."""
    for family in (OPTEngine, LlamaEngine):
        engine = family.attach(model)
        if engine is not None:
            return engine
    return None


def _destroy(groups: bool, world: bool) -> None:
    """Destroy SGLang's model-parallel groups and the torch.distributed world, each where asked."""
    from sglang.srt.distributed import parallel_state

    if groups:
        parallel_state.destroy_model_parallel()
    if world:
        parallel_state.destroy_distributed_environment()


def _explain(error: BaseException, config: RunnerConfig) -> Optional[BaseException]:
    """Upstream's error of a failed build in the caller's terms (None: it says what to do already)."""
    text = str(error)
    if isinstance(error, (ValueError, RuntimeError)) and "--mem-fraction-static" in text:
        where = "the machine's free memory" if config.device == "cpu" else "the GPU's free memory"
        return SettingError(
            f"the model's weights leave no memory for the KV cache with {{setting}}: SGLang sizes the KV pool "
            f"from {where}, which other processes share; raise it (SGLang said: {text})",
            "mem_fraction_static",
            config.mem_fraction_static,
        )
    return None
