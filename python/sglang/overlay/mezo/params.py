"""Where each HF parameter lives in a loaded SGLang model, and at which global offsets MeZO's z is drawn.

HF ``AutoModelForCausalLM.named_parameters()`` order gives every parameter p a
base offset (the elements of the parameters before it; a tied ``lm_head`` is not
repeated). On this rank p is held by one SGLang parameter: all of it or a block
of its rows (replicated; q/k/v in a fused ``qkv_proj``, gate/up in
``gate_up_proj``, a vocabulary shard, column-parallel rows under tensor
parallelism, GQA k/v heads replicated over the ranks), a block of its columns
(row-parallel layers under tensor parallelism: each row of the shard is a run of
the HF row), or its transpose (GPT-2's Conv1D weights). ``Placement`` says which,
so that ``noise.NoisePass`` draws each element's z at its HF offset on every
layout, and the trainer can read and write the HF tensor.

No table per model family says this: the model's own weight loading does
(:func:`place`). For each group of parameters (one decoder layer; then those of
no layer), the SGLang parameters' data are swapped for fp32 shadows filled with
NaN, and the model's ``load_weights`` loads, one HF parameter at a time, a probe
of its shape whose values are each element's row index, then one of column
indices; where the values land, and which values they are, place every element.
The real weights are never written (the shadows are dropped, the data put back).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """This rank's part of one HF parameter: ``view``, a contiguous region of the SGLang parameter
    ``sglang_name`` (rows ``param_rows`` of it), and the global offset ``base`` of its element 0. The HF
    offsets of its elements run on from ``base`` in order, except: ``rows`` = (row length here, row length
    in HF): each row of the view is a run of an HF row (a column shard); ``transposed``: the view is the HF
    tensor transposed (``view[j, i]`` is HF ``[i, j]``; ``base`` is then the HF tensor's own). The view holds
    HF's values plus ``shift``."""

    view: torch.Tensor
    base: int
    rows: Optional[tuple[int, int]] = None
    sglang_name: str = ""
    hf_base: int = 0  # the global offset of the HF parameter's element 0
    transposed: bool = False
    param_rows: tuple[int, int] = (0, 0)
    shift: float = 0.0  # the loader stores HF's value + shift (Gemma's norm weights: 1 + w)


def hf_model(hf_config: Any) -> torch.nn.Module:
    """HF's model of ``hf_config`` (``AutoModelForCausalLM``) on the meta device: its parameters' names,
    shapes and order, and its modules."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def hf_parameter_shapes(hf_config: Any) -> list[tuple[str, torch.Size]]:
    """HF ``named_parameters()`` names and shapes, in order (a tied head once)."""
    return [(name, param.shape) for name, param in hf_model(hf_config).named_parameters()]


def no_weight_decay(hf_config: Any) -> set[str]:
    """The HF parameters MeZO's weight decay skips: biases and every normalization layer's parameters
    (by the HF module's class: LayerNorm, RMSNorm, ...), as HF's Trainer and the MeZO paper do."""
    model = hf_model(hf_config)
    out = set()
    for module_name, module in model.named_modules():
        norm = "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            if norm or name == "bias":
                out.add(f"{module_name}.{name}" if module_name else name)
    return out


def place(model: torch.nn.Module, hf_config: Any, tp_rank: int = 0, tp_size: int = 1) -> dict[str, Placement]:
    """Every HF parameter's placement on this rank, in HF order (module docstring).

    Raises ValueError naming an HF parameter that the model's loader puts nowhere, or in two places, or in a
    shape this cannot describe, and an SGLang parameter part of which no HF parameter covers (vocabulary
    padding aside)."""
    shapes = hf_parameter_shapes(hf_config)
    bases, offset = {}, 0
    for name, shape in shapes:
        bases[name], offset = offset, offset + math.prod(shape)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    shape_of = dict(shapes)
    groups: dict[Optional[int], list[str]] = {}
    for name, _ in shapes:
        groups.setdefault(_layer(name), []).append(name)
    found: dict[str, _Layout] = {}
    for layer in sorted(groups, key=lambda k: (k is None, k or 0)):
        with _shadows(params, {n for n in params if _layer(n) == layer}) as shadows:
            for hf_name in groups[layer]:
                found[hf_name] = _probe(model, hf_name, tuple(shape_of[hf_name]), shadows, layer, tp_size)
    _check_coverage(params, modules, found, hf_config)
    return {name: found[name].placement(params[found[name].sglang_name].data, bases[name]) for name, _ in shapes}


def _layer(name: str) -> Optional[int]:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


class _shadows:
    """Meanwhile, fp32 NaN shadows in place of the data of the parameters named in ``group``, and an empty
    tensor in place of every other parameter's (a probe that lands outside its group fails loudly instead
    of writing a real weight); the data put back after."""

    def __init__(self, params: dict[str, torch.nn.Parameter], group: set[str]) -> None:
        self.params, self.group = params, group
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        shadows = {}
        for name, param in self.params.items():
            self.saved[name] = param.data
            if name in self.group:
                shadows[name] = param.data = torch.full(param.shape, math.nan, dtype=torch.float32, device=param.device)
            else:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        return shadows

    def __exit__(self, *exc: object) -> None:
        for name, data in self.saved.items():
            self.params[name].data = data


def _load_probe(model: torch.nn.Module, hf_name: str, probe: torch.Tensor, group: Optional[int]) -> None:
    try:
        with torch.no_grad():
            model.load_weights([(hf_name, probe)])
    except Exception as error:  # noqa: BLE001 - any failure of the model's loader: say which parameter
        where = f"layer {group}'s parameters" if group is not None else "the parameters of no layer"
        raise ValueError(
            f"HF parameter {hf_name!r}: the model's load_weights failed to place it among {where} "
            f"({type(error).__name__}: {error}); MeZO cannot tell where its elements live"
        ) from error


@dataclass(frozen=True)
class _Layout:
    """Where an HF parameter landed: rows r0:r1 and columns c0:c1 of SGLang parameter ``sglang_name`` (as a 2-D
    [rows, the rest] view) hold HF rows R0.. and columns C0.. (of ``hf_cols``), or their transpose."""

    sglang_name: str
    r0: int
    r1: int
    c0: int
    c1: int
    R0: int
    C0: int
    hf_cols: int
    transposed: bool
    shift: float

    def placement(self, param: torch.Tensor, base: int) -> Placement:
        if self.transposed:
            return Placement(param, base, None, self.sglang_name, base, True, (0, param.shape[0]), self.shift)
        view = param.narrow(0, self.r0, self.r1 - self.r0)
        first = base + self.R0 * self.hf_cols + self.C0
        rows = None if self.c1 - self.c0 == self.hf_cols else (self.c1 - self.c0, self.hf_cols)
        return Placement(view, first, rows, self.sglang_name, base, False, (self.r0, self.r1), self.shift)


def _probe(
    model: torch.nn.Module,
    hf_name: str,
    shape: tuple[int, ...],
    shadows: dict[str, torch.Tensor],
    group: Optional[int],
    tp_size: int,
) -> _Layout:
    """Load HF parameter ``hf_name``'s probes into the shadows (each cleared after): where it lands.

    Three probes: zeros (what the loader writes whatever the values: its padding fills, and a shift it adds,
    e.g. Gemma's norm weights are stored as 1 + w), then each element's row index + 1, then its column
    index + 1. An element is the HF parameter's where the index probes change it."""
    hf_rows = shape[0]
    hf_cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    _load_probe(model, hf_name, torch.zeros(shape, dtype=torch.float32), group)
    hits = [(name, s) for name, s in shadows.items() if not bool(torch.isnan(s).all())]
    if not hits:
        raise ValueError(
            f"HF parameter {hf_name!r}: the model's load_weights puts it nowhere on this rank, so MeZO cannot place "
            "its elements (is the checkpoint of the runner's model family?)"
        )
    if len(hits) > 1:
        raise ValueError(
            f"HF parameter {hf_name!r} lands in {len(hits)} SGLang parameters ({', '.join(n for n, _ in hits)}): "
            "MeZO places each HF parameter in one"
        )
    ((sglang_name, shadow),) = hits
    flat = shadow.view(shadow.shape[0], -1) if shadow.dim() > 1 else shadow.view(-1, 1)
    fills = flat.clone()
    flat.fill_(math.nan)
    row_probe = torch.arange(1, hf_rows + 1, dtype=torch.float32).view(-1, *([1] * (len(shape) - 1)))
    _load_probe(model, hf_name, row_probe.expand(shape).contiguous(), group)
    written = ~torch.isnan(flat) & (flat != fills)
    rows = torch.nonzero(written.any(1)).flatten()
    cols = torch.nonzero(written.any(0)).flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    unlike = ValueError(
        f"HF parameter {hf_name!r} lands in SGLang parameter {sglang_name!r} {tuple(shadow.shape)} in a pattern "
        "MeZO's placement does not describe (a block of whole rows, a column shard, or the whole transpose, "
        "each with at most a constant added)"
    )
    if r1 - r0 != rows.numel() or c1 - c0 != cols.numel() or not bool(written[r0:r1, c0:c1].all()):
        raise unlike
    shift = fills[r0:r1, c0:c1]
    if not bool((shift == shift[0, 0]).all()):
        raise unlike
    hf_row = flat[r0:r1, c0:c1] - shift
    flat.fill_(math.nan)
    transposed = False
    if hf_cols > 1:
        col_probe = torch.arange(1, hf_cols + 1, dtype=torch.float32).expand(hf_rows, hf_cols).reshape(shape)
        _load_probe(model, hf_name, col_probe.contiguous(), group)
        hf_col = flat[r0:r1, c0:c1] - shift
        flat.fill_(math.nan)
        transposed = bool((hf_row[:, :1] != hf_row).any())  # the HF row changes along a row of the shadow
        if transposed:
            hf_row, hf_col = hf_row.T, hf_col.T
    else:
        hf_col = torch.ones_like(hf_row)
    # hf_row[i, j] must be R0 + 1 + i and hf_col[i, j] C0 + 1 + j (in the HF tensor's orientation).
    n_rows, n_cols = hf_row.shape
    R0, C0 = int(hf_row[0, 0]) - 1, int(hf_col[0, 0]) - 1
    arange = lambda start, n: torch.arange(start, start + n, dtype=torch.float32, device=hf_row.device)  # noqa: E731
    if not (
        bool((hf_row == arange(R0 + 1, n_rows)[:, None]).all())
        and bool((hf_col == arange(C0 + 1, n_cols)[None, :]).all())
    ):
        raise unlike
    if transposed and (
        (r0, c0, r1, c1) != (0, 0, *flat.shape) or (n_rows, n_cols) != (hf_rows, hf_cols) or tp_size > 1
    ):
        raise unlike
    if not transposed and c1 - c0 != flat.shape[1]:
        raise unlike  # a block of columns of the SGLang parameter: its rows are not contiguous there
    return _Layout(sglang_name, r0, r1, c0, c1, R0, C0, hf_cols, transposed, float(shift[0, 0]))


def _check_coverage(params: dict, modules: dict, layouts: dict[str, _Layout], hf_config: Any) -> None:
    """Every SGLang parameter is covered by HF parameters once, vocabulary padding rows aside."""
    rectangles: dict[str, list[tuple[int, int, int, int]]] = {name: [] for name in params}
    for layout in layouts.values():
        rectangles[layout.sglang_name].append((layout.r0, layout.r1, layout.c0, layout.c1))
    for name, param in params.items():
        rows = param.shape[0] if param.dim() else 1
        indices = getattr(modules.get(name.rsplit(".", 1)[0]), "shard_indices", None)
        if indices is not None:  # a vocabulary shard: the rows past the real vocabulary are padding
            rows = indices.num_org_elements
        width = math.prod(param.shape[1:]) if param.dim() > 1 else 1
        want, count = rows * width, sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in rectangles[name])
        overlap = any(
            a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]
            for i, a in enumerate(rectangles[name])
            for b in rectangles[name][i + 1 :]
        )
        if overlap or count != want:
            raise ValueError(
                f"SGLang parameter {name!r} {tuple(param.shape)}: HF parameters cover {count} of its {want} elements"
                + (" (some twice)" if overlap else "")
                + "; MeZO would leave the rest untrained. Is the checkpoint's config.json the runner's model?"
            )


def gather(placements: dict[str, Placement], hf_config: Any, tp_size: int) -> dict[str, torch.Tensor]:
    """Every HF parameter whole, on the CPU. At tensor parallelism > 1 a collective of the TP group (every
    rank calls it): each element comes from the lowest rank holding it, exactly."""
    shapes = dict(hf_parameter_shapes(hf_config))
    out: dict[str, torch.Tensor] = {}
    for name, p in placements.items():
        shape = shapes[name]
        whole_here = p.rows is None and p.base == p.hf_base and p.view.numel() == math.prod(shape)
        if whole_here and (tp_size == 1 or not p.transposed):  # every rank holds all of it (replicated)
            view = (p.view.T if p.transposed else p.view).detach()
            value = view.float() - p.shift if p.shift else view
            out[name] = value.to("cpu", p.view.dtype, copy=True).contiguous().view(shape)
            continue
        device = p.view.device
        whole = torch.zeros(math.prod(shape), dtype=torch.float32, device=device)
        mine = torch.zeros(math.prod(shape), dtype=torch.bool, device=device)
        index = _offsets(p) - p.hf_base
        whole[index] = p.view.detach().reshape(-1).float() - p.shift
        mine[index] = True
        if tp_size > 1:
            from sglang.overlay import compat

            group = compat.tp_group()
            rank = torch.where(mine, group.rank_in_group, tp_size).to(torch.int32)
            torch.distributed.all_reduce(rank, op=torch.distributed.ReduceOp.MIN, group=group.device_group)
            whole[rank != group.rank_in_group] = 0.0
            torch.distributed.all_reduce(whole, group=group.device_group)
        out[name] = whole.view(shape).to(p.view.dtype).cpu()
    return out


def _offsets(p: Placement) -> torch.Tensor:
    """The HF global offsets of the view's elements, in the view's order (int64, on its device)."""
    device = p.view.device
    if p.transposed:
        out_rows, in_cols = p.view.shape[0], math.prod(p.view.shape[1:])
        return p.base + (
            torch.arange(in_cols, device=device)[None, :] * out_rows + torch.arange(out_rows, device=device)[:, None]
        ).reshape(-1)
    if p.rows is None:
        return p.base + torch.arange(p.view.numel(), device=device)
    length, stride = p.rows
    count = p.view.numel() // length
    return p.base + (
        torch.arange(count, device=device)[:, None] * stride + torch.arange(length, device=device)[None, :]
    ).reshape(-1)


def hf_parameter_views(model: torch.nn.Module, hf_config: Any) -> dict[str, torch.Tensor]:
    """Every HF parameter, in HF order, as a view of the SGLang parameter that holds it (one rank)."""
    return {name: p.view for name, p in place(model, hf_config).items()}


def local_part(placement: Placement, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole HF parameter ``full``, laid out as ``placement.view`` holds it."""
    flat = full.reshape(-1)
    index = (_offsets(placement) - placement.hf_base).to(flat.device)
    part = flat[index].view(placement.view.shape)
    return part.float() + placement.shift if placement.shift else part
