"""CUDA graphs of the dense engine's decoder for batches of whole prompts seen before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from sglang.overlay import compat
from sglang.overlay.dense import DenseEngine, DensePrefill


def enable_graphs(engine: DenseEngine, max_graphs: int) -> None:
    """Replay CUDA graphs of the engine's decoder for batches whose lengths were seen before, keeping
    at most ``max_graphs`` (PrefillGraphs); 0 turns them off and frees them."""
    if max_graphs < 0:
        raise ValueError(f"max_graphs must be >= 0, got {max_graphs}")
    engine.close()
    if max_graphs:
        engine.graphs = PrefillGraphs(max_graphs)


class _ModuleTreeChanges:
    """How many submodule and Parameter assignments (``module.x = ...``) the
    process has made while any PrefillGraphs is alive, counted by torch's
    global registration hooks: the graphs walk their decoder's module tree
    again only after one, not on every call. The hooks are removed when the
    last PrefillGraphs is closed."""

    count = 0
    _users = 0
    _handles: list = []

    @classmethod
    def watch(cls) -> None:
        if cls._users == 0:
            cls._handles = [
                nn.modules.module.register_module_module_registration_hook(cls._bump),
                nn.modules.module.register_module_parameter_registration_hook(cls._bump),
            ]
        cls._users += 1

    @classmethod
    def unwatch(cls) -> None:
        cls._users -= 1
        if cls._users == 0:
            for handle in cls._handles:
                handle.remove()
            cls._handles = []

    @classmethod
    def _bump(cls, module: nn.Module, name: str, value: object) -> None:
        cls.count += 1


@dataclass
class _PrefillGraph:
    """A captured decoder and the tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    plan: DensePrefill
    output: torch.Tensor


class PrefillGraphs:
    """CUDA graphs of the decoder for batches of whole prompts seen before.

    A batch that the dense engine runs (whole prompts on the GPU in half
    precision, one TP and PP rank) runs eagerly the first time its sequence
    lengths are seen; the second time the decoder is captured for those
    lengths, and from then on replayed: one launch instead of about fifteen
    per layer, which is most of a small model's time (benchmarks/NOTES.md).
    Token ids, positions and KV slots are copied into the graph's inputs,
    the K/V go to the pool (unless the plan skips them: a graph of its own),
    and the output is copied out. Parameters are read where they are, so
    in-place weight updates (MeZO, load_weights) are seen; assigning a module
    or a Parameter (LoRA wrapping, set_embed) drops every graph: the decoder's
    module tree is compared after any such assignment in the process
    (_ModuleTreeChanges; assigning ``param.data`` is not detected). At most
    ``max_graphs`` are kept, least recently used first out; they share one
    memory pool. Off unless ``enable_graphs`` is called.
    """

    def __init__(self, max_graphs: int) -> None:
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[tuple[int, ...], bool], _PrefillGraph] = {}
        self.seen: dict[tuple[tuple[int, ...], bool], None] = {}
        self.pool = None
        self.stream: Optional[torch.cuda.Stream] = None
        self.fingerprint: Optional[tuple] = None
        self.changes_seen: Optional[tuple] = None
        self.closed = False
        _ModuleTreeChanges.watch()

    def close(self) -> None:
        """Drop every graph and stop watching module assignments."""
        if not self.closed:
            self.closed = True
            self.clear()
            _ModuleTreeChanges.unwatch()

    @staticmethod
    def _fingerprint(decoder: nn.Module) -> tuple:
        """Every module and Parameter object of the decoder (a flat walk:
        ``modules()`` costs several times more)."""
        ids, stack = [], [decoder]
        while stack:
            module = stack.pop()
            ids.append(id(module))
            ids.extend(map(id, module._parameters.values()))
            ids.append(id(getattr(module, "weight", None)))
            stack.extend(module._modules.values())
        return tuple(ids)

    def clear(self) -> None:
        """Drop every graph and their memory pool."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def run(
        self,
        engine: DenseEngine,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        prefill: DensePrefill,
    ) -> Optional[torch.Tensor]:
        """The decoder's output from a graph, or None to run it eagerly."""
        if compat.tp_group().world_size != 1:
            return None
        # set_embed assigns a plain tensor (no registration): seen by its id.
        changes = (_ModuleTreeChanges.count, id(engine.decoder.embed_tokens.weight))
        if changes != self.changes_seen:
            self.changes_seen = changes
            fingerprint = self._fingerprint(engine.decoder)
            if fingerprint != self.fingerprint:
                self.clear()
                self.fingerprint = fingerprint
        key = (prefill.lens, prefill.write_kv)
        entry = self.graphs.pop(key, None)
        if entry is None:
            if key not in self.seen:
                self.seen[key] = None
                while len(self.seen) > 4 * self.max_graphs:
                    del self.seen[next(iter(self.seen))]
                return None
            while len(self.graphs) >= self.max_graphs:
                del self.graphs[next(iter(self.graphs))]
            if not self.graphs:
                # A pool whose graphs are all gone is not captured into again.
                self.pool = None
            entry = self._capture(engine, input_ids, positions, prefill)
        self.graphs[key] = entry
        entry.input_ids.copy_(input_ids)
        entry.positions.copy_(positions)
        if prefill.write_kv:
            entry.plan.out_cache_loc.copy_(prefill.out_cache_loc)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(
        self,
        engine: DenseEngine,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        prefill: DensePrefill,
    ) -> _PrefillGraph:
        static_ids, static_positions = input_ids.clone(), positions.clone()
        plan = prefill.static_copy()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        # Warm up on the capture stream, so that per-stream library state
        # (cuBLAS / cuDNN workspaces) exists before the capture.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            engine.run(static_ids, static_positions, plan)
        torch.cuda.current_stream().wait_stream(self.stream)
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                output = engine.run(static_ids, static_positions, plan)
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the prefill CUDA graph of {type(engine.model).__name__} for lengths {prefill.lens} "
                f"failed: {e}; run without prefill graphs (RunnerConfig(prefill_graphs=0))"
            ) from e
        return _PrefillGraph(graph, static_ids, static_positions, plan, output)
