"""Shared fixtures. Tests marked ``sglang`` need a patched SGLang release.

``python scripts/overlay.py matrix`` runs this suite once per supported release,
inside that release's venv, with ``SGLANG_OVERLAY_RELEASE`` set. Outside the
matrix those tests are skipped with a message saying how to run them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RELEASE = os.environ.get("SGLANG_OVERLAY_RELEASE")


def pytest_configure(config: pytest.Config) -> None:
    if RELEASE:
        import sglang

        if sglang.__version__ != RELEASE:
            raise pytest.UsageError(
                f"SGLANG_OVERLAY_RELEASE={RELEASE} but `import sglang` is {sglang.__version__} "
                f"from {Path(sglang.__file__).parent}: run the tests with that release's venv python"
            )


def _variant_base(release: str) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from overlay_tool.releases import Overlay

    overlay = Overlay.load(Path(__file__).resolve().parents[1])
    return overlay.variants[overlay.release(release).variant].base


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if RELEASE:
        # ``variant_base``: tests of what a patch variant adds (the reuse hooks) in depth run on the variant's
        # base release (the default release is one); the variant's other releases run its cheapest check.
        marked = [item for item in items if "variant_base" in item.keywords]
        base = _variant_base(RELEASE) if marked else RELEASE
        if base != RELEASE:
            skip = pytest.mark.skip(reason=f"runs on {base}, the base release of this release's patch variant")
            for item in marked:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a patched SGLang release: run `python scripts/overlay.py matrix`")
    for item in items:
        if "sglang" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.runtime import make_tiny_opt

    return make_tiny_opt(tmp_path_factory.mktemp("tiny_opt"))


@pytest.fixture
def build():
    """Builds StandaloneRunners on CPU; closes them after the test."""
    from sglang.overlay import RunnerConfig, StandaloneRunner

    built = []

    def _build(model_dir: Path):
        built.append(StandaloneRunner(RunnerConfig(model_path=str(model_dir), device="cpu")))
        return built[-1]

    yield _build
    for runner in built:
        runner.close()
