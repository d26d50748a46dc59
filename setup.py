"""setuptools' half of the fork build; ``pip install .`` / ``pip wheel .`` run it.

pyproject.toml names the in-tree build backend (scripts/overlay_tool/build_backend.py). Its
build hooks fetch the chosen upstream release and stage it, patched, under build/sglang-overlay/
with build.json (version ``<release>+overlay.<N>``, upstream's dependencies); this file only
reads that stage. It downloads and patches nothing, and does nothing when imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGE = Path("build") / "sglang-overlay"


def main() -> None:
    from setuptools import Distribution, find_namespace_packages, setup

    info_file = ROOT / STAGE / "build.json"
    if not info_file.is_file():
        sys.exit(
            "error: nothing is staged: build the fork with `pip wheel --no-deps .` or `pip install .` "
            "(the build backend in pyproject.toml stages the patched release first)"
        )
    info = json.loads(info_file.read_text())
    package_root = ROOT / info["package_root"]

    class BinaryDistribution(Distribution):
        """Releases from 0.5.11 ship compiled extensions inside the package."""

        def has_ext_modules(self) -> bool:
            return any((package_root / "sglang").rglob("*.so"))

    setup(
        name="sglang",
        version=info["version"],
        description="SGLang with the sglang-overlay patch set (distributed reuse, native OPT)",
        long_description=(ROOT / "README.md").read_text(),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        distclass=BinaryDistribution,
        zip_safe=False,
        package_dir={"": info["package_root"]},
        packages=find_namespace_packages(where=str(package_root), include=["sglang", "sglang.*"]),
        package_data={"": ["*"]},
        install_requires=info["install_requires"],
        extras_require=info["extras_require"],
        python_requires=info["python_requires"] or None,
    )


if __name__ == "__main__":
    main()
