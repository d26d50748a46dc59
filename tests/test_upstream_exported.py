"""The upstream-style tests that ``export-pr`` ships, run on this release as its branches would have it.

Each file of ``upstream/test/registered/unit/`` is written as ``export-pr`` writes it for this
release's variant (``export_changes.exported_test_text``: runtime-context releases publish the
widths) into a copy of the release's patched tree whose ``opt.py`` is upstream's own with the
``opt-fixes`` and ``opt-strict-loading`` edits (``export_opt_fixes.fixed_opt``) and whose ``reuse.py`` is
the one export-pr ships (``export_reuse.exported_reuse``), and run as upstream runs it:
``python3 test/registered/unit/...`` from the root, in the test venv ``export-pr --check`` uses
(matrix's environment plus what upstream's test utilities import).

They run on each variant's base release (the release its patches are made from, one per API
era), about 35 s a row; the other releases of a variant share its patches and test texts.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.variant_base]  # the exported tests run on each variant's base

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from overlay_tool import export_changes, export_check, export_opt_fixes, export_pr, export_reuse  # noqa: E402
from overlay_tool.cache import Cache  # noqa: E402
from overlay_tool.releases import Overlay, Release  # noqa: E402

OVERLAY = Overlay.load(ROOT)
TESTS = sorted({rel for change in export_changes.CHANGES for rel in change.tests})


@pytest.fixture(scope="module")
def release() -> Release:
    return OVERLAY.release(os.environ["SGLANG_OVERLAY_RELEASE"])


@pytest.fixture(scope="module")
def branch_root(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with ``python/`` (this release, the exported changes applied) and the exported tests."""
    import sglang

    root = tmp_path_factory.mktemp("branch")
    tree = Path(sglang.__file__).resolve().parents[1]
    shutil.copytree(tree, root / "python", copy_function=os.link, ignore=shutil.ignore_patterns("__pycache__"))
    tag = f"v{release.version}"
    opt = root / export_opt_fixes.OPT_PATH
    upstream_opt = Cache().release_tree(release.version) / export_opt_fixes.OPT_PATH
    opt.unlink()  # a hard link into the release cache: replace it, never write through it
    fixed = export_opt_fixes.fixed_opt(upstream_opt.read_text(), tag)
    opt.write_text(export_opt_fixes.fixed_opt(fixed, tag, export_opt_fixes.STRICT))
    reuse = root / export_reuse.REUSE_PATH
    reuse.unlink()  # this repository's multi-release file -> the file export-pr ships for this variant
    reuse.write_text(export_reuse.exported_reuse((ROOT / export_reuse.REUSE_PATH).read_text()))
    for rel in TESTS:
        text = (ROOT / export_changes.TESTS_DIR / rel).read_text()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(export_changes.exported_test_text(text, release.variant, rel))
    return root


@pytest.fixture(scope="module")
def upstream_test_python(release: Release) -> Path:
    return export_check.make_test_env(release.transformers, OVERLAY, Cache().root / "venvs")


@pytest.mark.parametrize("rel", TESTS)
def test_exported_test_passes(rel: str, release: Release, branch_root: Path, upstream_test_python: Path) -> None:
    change = next(c for c in export_changes.CHANGES if rel in c.tests)
    if not (change.opt or change.files or export_pr.change_patches(change, OVERLAY.patches(release))):
        pytest.skip(f"no branch ships {rel} onto this release: its variant has no {change.key} patch")
    ok, output = export_check.run_test_file(branch_root, rel, upstream_test_python)
    assert ok, f"python3 {rel} failed on the exported changes:\n{output}"
    assert "Ran 0 tests" not in output and "OK" in output, output
