"""Let torchvision's pure-Python parts import on a CPU-only torch.

PyPI's torchvision wheels are CUDA builds: on a CPU build of torch their C
extension (``torchvision/_C.so``) cannot load, because it links
``libtorch_cuda.so``. torchvision is written to live without it (every C op
calls ``_assert_has_ops()`` and raises "Couldn't load custom C++ ops"), except
that ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` without checking, so
``import torchvision`` itself fails with "operator torchvision::nms does not
exist". SGLang imports ``torchvision.io.decode_jpeg`` at module top, so
``import sglang`` fails too.

This module is installed by ``scripts/overlay.py venv`` together with a
``.pth`` line that calls :func:`install`. It adds a meta-path finder that acts
once, on the first ``import torchvision``: it tries to load the real C
extension, and only if that fails does it declare the two schemas (no kernels)
so the unguarded registrations succeed. Nothing else changes: calling a C op
such as ``torchvision.ops.nms`` still raises torchvision's own error. Where the
extension loads (a matching CUDA torch), this module does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Optional, Sequence

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []


def _declare_missing_schemas(package_dirs: Sequence[str]) -> None:
    import glob
    import os

    import torch

    for directory in package_dirs:
        for path in glob.glob(os.path.join(directory, "_C*.so")):
            try:
                torch.ops.load_library(path)
                return
            except OSError:
                pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _libraries.append(library)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations:
            _declare_missing_schemas(list(spec.submodule_search_locations))
        return spec


def install() -> None:
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
