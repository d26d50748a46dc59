"""The PEP 517 build backend of the fork wheel (pyproject.toml: ``backend-path = ["scripts"]``).

``pip wheel .`` / ``pip install .`` build the ``sglang`` distribution of one supported upstream
release with the overlay applied, versioned ``<release>+overlay.<N>`` (a PEP 440 local label;
N is ``OVERLAY_VERSION`` in python/sglang/overlay/__init__.py).

Which release: $SGLANG_OVERLAY_BUILD_RELEASE, else the default of patches/releases.toml. Where
its upstream source comes from: $SGLANG_OVERLAY_UPSTREAM, when set, names a local sglang wheel,
sdist or upstream checkout (for offline builds); otherwise the release's PyPI wheel, downloaded
into the release cache. The dependencies are upstream's for that release, read from its wheel
metadata (or its pyproject.toml).

The wheel's ``sglang/__init__.py`` is fork/sglang_init.py (``install_light_init``): upstream's own
__init__.py, kept byte for byte as ``sglang/_upstream_init.py``, runs in it; it lets ``python -m
sglang.overlay`` work with only the standard library (README, "Installing the patched fork with
pip"). Fork-only: it lives outside python/sglang/ and patches/, so neither ``apply`` nor
``export-pr`` ever sees it.

Only the build hooks do that work (prepare_metadata_for_build_wheel, build_wheel): they stage the
patched tree under build/sglang-overlay/ with build.json (version, dependencies), then hand over
to setuptools, whose setup.py only reads the stage. Importing this module or setup.py downloads
and patches nothing. The fork has no sdist (it is built from an upstream release).
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

from .apply import Target, apply
from .cache import Cache
from .errors import OverlayError
from .gitutil import log
from .releases import Overlay, load_toml

STAGE = Path("build") / "sglang-overlay"
BUILD_INFO = "build.json"
LIGHT_INIT = Path("fork") / "sglang_init.py"
UPSTREAM_INIT = "_upstream_init.py"
T = TypeVar("T")


def upstream_source(release: str, cache: Cache, scratch: Path) -> tuple[Path, dict[str, str]]:
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
        if metadata.is_file():
            return scratch, {"METADATA": metadata.read_text()}
        return scratch, {"pyproject": (path / "pyproject.toml").read_text()}
    raise OverlayError(f"SGLANG_OVERLAY_UPSTREAM={path} is not an sglang wheel, sdist or upstream checkout")


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
    project = load_toml(metadata["pyproject"])["project"]
    return (
        project.get("dependencies", []),
        project.get("optional-dependencies", {}),
        project.get("requires-python", ""),
    )


def overlay_version(root: Path) -> str:
    """``OVERLAY_VERSION`` of the fork package (python/sglang/overlay/__init__.py)."""
    path = root / "python" / "sglang" / "overlay" / "__init__.py"
    m = re.search(r'^OVERLAY_VERSION = "([^"]+)"', path.read_text(), re.M) if path.is_file() else None
    if not m:
        raise OverlayError(f'{path} must set OVERLAY_VERSION = "N" (the +overlay.N of the fork\'s version)')
    return m.group(1)


def install_light_init(package_dir: Path, root: Path) -> None:
    """Make ``package_dir``/__init__.py the fork's wrapper; upstream's moves to _upstream_init.py."""
    init, upstream = package_dir / "__init__.py", package_dir / UPSTREAM_INIT
    if upstream.exists():
        raise OverlayError(f"{upstream} exists already: {package_dir} is not an upstream sglang package")
    init.rename(upstream)
    shutil.copyfile(root / LIGHT_INIT, init)


def _source_identity(release: str, cache: Cache) -> Optional[dict]:
    """What the stage was built from, when that can be told cheaply (a wheel or sdist file)."""
    local = os.environ.get("SGLANG_OVERLAY_UPSTREAM")
    path = Path(local).expanduser().resolve() if local else cache.wheel(release)
    if not path.is_file():
        return None
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def prepare(root: Path) -> dict:
    """Stage the patched release under ``root``/build/sglang-overlay/ (reused when it is current);
    returns build.json's content: version, install_requires, extras_require, python_requires."""
    if not (root / "patches" / "releases.toml").is_file():
        raise OverlayError(f"{root} is not an sglang-overlay checkout (no patches/releases.toml)")
    overlay = Overlay.load(root)
    release = overlay.release(os.environ.get("SGLANG_OVERLAY_BUILD_RELEASE") or overlay.default)
    cache = Cache()
    stage = root / STAGE
    stamp = {
        "release": release.version,
        "overlay": overlay.fingerprint(release),
        "overlay_version": overlay_version(root),
        "source": _source_identity(release.version, cache),
        "light_init": hashlib.sha256((root / LIGHT_INIT).read_bytes()).hexdigest(),
    }
    info_file = stage / BUILD_INFO
    if stamp["source"] is not None and info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("stamp") == stamp:
            return info
    for old in [stage, *(root / "build").glob("lib*"), *(root / "build").glob("bdist*")]:
        shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="sglang-overlay-build-") as tmp:
        pristine, metadata = upstream_source(release.version, cache, Path(tmp))
        found = Target.resolve(pristine).version()
        if found != release.version:
            raise OverlayError(
                f"the upstream source is sglang {found}, but the build asks for {release.version}: "
                "set SGLANG_OVERLAY_BUILD_RELEASE to match it"
            )
        shutil.copytree(
            pristine / "python" / "sglang",
            stage / "patched" / "python" / "sglang",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        log(apply(stage / "patched", overlay, cache, upstream=pristine))
        install_light_init(stage / "patched" / "python" / "sglang", root)
    install, extras, python_requires = requirements(metadata)
    info = {
        "stamp": stamp,
        "version": f"{release.version}+overlay.{stamp['overlay_version']}",
        "package_root": (STAGE / "patched" / "python").as_posix(),
        "install_requires": install,
        "extras_require": extras,
        "python_requires": python_requires,
    }
    info_file.write_text(json.dumps(info, indent=1))
    return info


def _prepared(hook: Callable[[], T]) -> T:
    try:
        prepare(Path.cwd())
    except OverlayError as exc:
        raise SystemExit(f"error: {exc}") from None
    return hook()


def get_requires_for_build_wheel(config_settings: Optional[dict] = None) -> list[str]:
    return []  # pyproject.toml's build-system.requires (setuptools, wheel) is all


def get_requires_for_build_sdist(config_settings: Optional[dict] = None) -> list[str]:
    return []


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Optional[dict] = None) -> str:
    from setuptools import build_meta

    return _prepared(lambda: build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings))


def build_wheel(
    wheel_directory: str, config_settings: Optional[dict] = None, metadata_directory: Optional[str] = None
) -> str:
    from setuptools import build_meta

    return _prepared(lambda: build_meta.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_sdist(sdist_directory: str, config_settings: Optional[dict] = None) -> str:
    raise SystemExit(
        "error: the sglang-overlay fork has no sdist: it is built from an upstream release. "
        "Build a wheel (`pip wheel --no-deps .`) or install from this checkout (`pip install .`)"
    )
