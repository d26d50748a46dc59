"""patches/releases.toml, the one source of truth: releases, patch variants, the overlay's files."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .errors import NotOnCPU, OverlayError, UnsupportedRelease

REPO = Path(__file__).resolve().parents[2]
PACKAGE_PREFIX = "python/sglang/"


def _tomllib() -> ModuleType:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise OverlayError(
                "the overlay tool needs Python 3.11+ (tomllib), or `pip install tomli` on 3.10"
            ) from None
    return tomllib


def load_toml(text: str) -> dict:
    return _tomllib().loads(text)


@dataclass(frozen=True)
class Release:
    version: str
    variant: str
    transformers: str
    upstream_torch: str
    cpu: bool
    cpu_note: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    base: str
    summary: str


@dataclass(frozen=True)
class Overlay:
    """The overlay at ``root``: patches/releases.toml, patches/<variant>/, python/."""

    root: Path
    releases: dict[str, Release]
    variants: dict[str, Variant]
    default: str
    runtime: dict = field(hash=False, compare=False)

    @classmethod
    def load(cls, root: Path = REPO) -> "Overlay":
        path = root / "patches" / "releases.toml"
        try:
            data = load_toml(path.read_text())
        except FileNotFoundError:
            raise OverlayError(f"{path} is missing: run the tool from an sglang-overlay checkout") from None
        variants = {
            name: Variant(name, v["base"], v.get("summary", "")) for name, v in data.get("variants", {}).items()
        }
        releases = {}
        for version, r in data.get("releases", {}).items():
            if r["variant"] not in variants:
                raise OverlayError(f"{path}: release {version} names unknown variant {r['variant']!r}")
            if variants[r["variant"]].base not in data["releases"]:
                raise OverlayError(f"{path}: variant {r['variant']} has a base that is not a listed release")
            releases[version] = Release(
                version=version,
                variant=r["variant"],
                transformers=r["transformers"],
                upstream_torch=r.get("upstream_torch", ""),
                cpu=bool(r.get("cpu", False)),
                cpu_note=r.get("cpu_note", ""),
            )
        return cls(root, releases, variants, data.get("default", ""), data.get("runtime", {}))

    def release(self, version: str) -> Release:
        try:
            return self.releases[version]
        except KeyError:
            raise UnsupportedRelease(
                f"sglang {version} is not a supported release; supported: {', '.join(self.versions())}. "
                "Install one of those, or add the release to patches/releases.toml with a patch variant."
            ) from None

    def versions(self) -> list[str]:
        return sorted(self.releases, key=version_key)

    def cpu_release(self, version: str, verb: str) -> Release:
        """``version``'s Release when it runs on CPU; else NotOnCPU (exit 2), saying why and what would run.

        Only releases.toml is read: ``verb`` refuses before anything is downloaded or created."""
        release = self.release(version)
        if release.cpu:
            return release
        why = release.cpu_note or "patches/releases.toml marks it cpu = false"
        torch = f" (torch {release.upstream_torch})" if release.upstream_torch else ""
        raise NotOnCPU(
            f"sglang {version} does not run on CPU ({why}), so `{verb}` builds nothing for it; nothing was "
            f"downloaded or created.\n  What runs: pick a release from {self.cpu_ranges()} (`overlay.py releases` "
            f"lists them; default {self.default}), or use {version} on a GPU machine with upstream's CUDA torch pin{torch}: "
            f"`pip install` the fork (`SGLANG_OVERLAY_BUILD_RELEASE={version} pip install .` in this repository "
            f"installs it with upstream's dependencies)."
        )

    def cpu_ranges(self) -> str:
        """The releases that run on CPU as runs of consecutive releases: ``0.5.13 to 0.5.23``."""
        runs: list[list[str]] = []
        previous_cpu = False
        for version in self.versions():
            cpu = self.releases[version].cpu
            if cpu:
                if previous_cpu:
                    runs[-1].append(version)
                else:
                    runs.append([version])
            previous_cpu = cpu
        return ", ".join(r[0] if len(r) == 1 else f"{r[0]} to {r[-1]}" for r in runs) or "none"

    def patches(self, release: Release) -> list[Path]:
        return sorted((self.root / "patches" / release.variant).glob("*.patch"))

    def overlay_files(self) -> list[str]:
        """Repo-relative paths of the new files, e.g. ``python/sglang/srt/models/opt.py``."""
        base = self.root / "python" / "sglang"
        files = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
        return sorted(files)

    def fingerprint(self, release: Release) -> str:
        """A hash of everything apply writes for ``release``."""
        h = hashlib.sha256()
        for path in self.patches(release) + [self.root / f for f in self.overlay_files()]:
            h.update(path.relative_to(self.root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()


def version_key(version: str) -> tuple:
    """Sort key of a release version: 0.5.9 < 0.5.10 < 0.5.10.post1."""
    parts = re.findall(r"\d+|[a-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)
