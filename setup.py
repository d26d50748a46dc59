"""``pip install .``: the patched SGLang fork.

Builds the ``sglang`` distribution of one supported upstream release with the
overlay applied, versioned ``<release>+overlay.<N>`` (a PEP 440 local label).

Which release: $SGLANG_OVERLAY_BUILD_RELEASE, else the default of
patches/releases.toml. Where its upstream source comes from:
$SGLANG_OVERLAY_UPSTREAM, when set, names a local sglang wheel, sdist or
upstream checkout (for offline builds); otherwise the release's PyPI wheel,
downloaded into the release cache (see README). The dependencies are upstream's
for that release, read from its wheel metadata (or its pyproject.toml).
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from setuptools import Distribution, find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
import overlay as tool  # noqa: E402

STAGE = Path("build") / "sglang-overlay"


class BinaryDistribution(Distribution):
    """Releases from 0.5.11 ship compiled extensions inside the package."""

    def has_ext_modules(self) -> bool:
        return any((ROOT / STAGE / "patched" / "python" / "sglang").rglob("*.so"))


def upstream_source(release: str, cache: tool.Cache, scratch: Path) -> tuple[Path, dict[str, str]]:
    """(a directory holding python/sglang, core metadata) of ``release``."""
    local = os.environ.get("SGLANG_OVERLAY_UPSTREAM")
    path = Path(local).expanduser().resolve() if local else cache.wheel(release)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.startswith("sglang/") and not member.endswith("/"):
                    target = scratch / "python" / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(member))
            metadata = next(m for m in zf.namelist() if m.endswith(".dist-info/METADATA"))
            return scratch, {"METADATA": zf.read(metadata).decode()}
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tf:
            tf.extractall(scratch / "sdist", filter="data")
        (top,) = (scratch / "sdist").iterdir()
        path = top
    if (path / "python" / "sglang" / "version.py").is_file():
        return path, {"pyproject": (path / "python" / "pyproject.toml").read_text()}
    if (path / "sglang" / "version.py").is_file():
        (scratch / "python").mkdir(parents=True)
        shutil.copytree(path / "sglang", scratch / "python" / "sglang")
        metadata = path / "PKG-INFO"
        pyproject = path / "pyproject.toml"
        if metadata.is_file():
            return scratch, {"METADATA": metadata.read_text()}
        return scratch, {"pyproject": pyproject.read_text()}
    raise tool.OverlayError(
        f"SGLANG_OVERLAY_UPSTREAM={path} is not an sglang wheel, sdist or upstream checkout"
    )


def requirements(metadata: dict[str, str]) -> tuple[list[str], dict[str, list[str]], str]:
    """install_requires, extras_require and python_requires of the upstream release."""
    if "METADATA" in metadata:
        msg = email.parser.Parser().parsestr(metadata["METADATA"])
        install: list[str] = []
        extras: dict[str, list[str]] = {}
        for line in msg.get_all("Requires-Dist") or []:
            requirement, _, marker = line.partition(";")
            m = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", marker)
            if not m:
                install.append(line.strip())
                continue
            rest = re.sub(r"""\s*(and\s+)?extra\s*==\s*['"][^'"]+['"](\s+and)?\s*""", " ", marker).strip()
            extras.setdefault(m.group(1), []).append(requirement.strip() + (f"; {rest}" if rest else ""))
        return install, extras, msg.get("Requires-Python", "")
    project = tool.tomllib.loads(metadata["pyproject"])["project"]
    return (project.get("dependencies", []), project.get("optional-dependencies", {}),
            project.get("requires-python", ""))


def overlay_version() -> str:
    text = (ROOT / "python" / "sglang" / "overlay.py").read_text()
    return re.search(r'^OVERLAY_VERSION = "([^"]+)"', text, re.M).group(1)


def prepare() -> dict:
    overlay = tool.Overlay.load(ROOT)
    release = overlay.release(os.environ.get("SGLANG_OVERLAY_BUILD_RELEASE") or overlay.default)
    stage = ROOT / STAGE
    if stage.exists():
        shutil.rmtree(stage)
    with tempfile.TemporaryDirectory(prefix="sglang-overlay-build-") as tmp:
        pristine, metadata = upstream_source(release.version, tool.Cache(), Path(tmp))
        found = tool.Target.resolve(pristine).version()
        if found != release.version:
            raise tool.OverlayError(
                f"the upstream source is sglang {found}, but the build asks for {release.version}: "
                "set SGLANG_OVERLAY_BUILD_RELEASE to match it"
            )
        shutil.copytree(pristine / "python" / "sglang", stage / "patched" / "python" / "sglang",
                        ignore=shutil.ignore_patterns("__pycache__"))
        print(tool.apply(stage / "patched", overlay, tool.Cache(), upstream=pristine))
    install, extras, python_requires = requirements(metadata)
    package_root = STAGE / "patched" / "python"
    return dict(
        version=f"{release.version}+overlay.{overlay_version()}",
        package_dir={"": package_root.as_posix()},
        packages=find_namespace_packages(where=str(ROOT / package_root), include=["sglang", "sglang.*"]),
        package_data={"": ["*"]},
        install_requires=install,
        extras_require=extras,
        python_requires=python_requires or None,
    )


try:
    built = prepare()
except tool.OverlayError as exc:
    sys.exit(f"error: {exc}")

setup(
    name="sglang",
    description="SGLang with the sglang-overlay patch set (distributed reuse, native OPT)",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    distclass=BinaryDistribution,
    zip_safe=False,
    **built,
)
