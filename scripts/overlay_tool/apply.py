"""Applying the overlay to a target, reverting it, and saying which state a target is in."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .cache import Cache
from .errors import OverlayError
from .gitutil import read_bytes, run, sha256
from .releases import PACKAGE_PREFIX, Overlay, Release


@dataclass(frozen=True)
class Target:
    """An upstream checkout (holds python/sglang) or an installed sglang package directory."""

    path: Path
    package_dir: Path
    kind: str

    @classmethod
    def resolve(cls, path: Path) -> "Target":
        path = path.resolve()
        if (path / "python" / "sglang" / "version.py").is_file():
            return cls(path, path / "python" / "sglang", "checkout")
        if path.name == "sglang" and (path / "version.py").is_file():
            return cls(path, path, "package")
        if (path / "sglang" / "version.py").is_file():
            return cls(path, path / "sglang", "package")
        raise OverlayError(
            f"{path} is neither an upstream checkout (with python/sglang/version.py) nor an installed "
            "sglang package directory (with version.py); point at one of those"
        )

    def file(self, rel: str) -> Path:
        """The target path of repo-relative ``python/sglang/...`` path ``rel``."""
        assert rel.startswith(PACKAGE_PREFIX), rel
        return self.package_dir / rel[len(PACKAGE_PREFIX) :]

    def version(self) -> str:
        for name in ("_version.py", "version.py"):
            text = read_bytes(self.package_dir / name)
            if text is None:
                continue
            m = re.search(r"""^__version__\s*(?:=\s*version\s*)?=\s*['"]([^'"]+)['"]""", text.decode(), re.M)
            if m:
                return m.group(1)
        raise OverlayError(f"cannot read the sglang release from {self.package_dir}/version.py")


PATCHED, PRISTINE, MODIFIED = "applied", "upstream", "modified"


@dataclass
class FilePlan:
    """One file the overlay touches: upstream's bytes, the overlay's, and the target's now (None: absent)."""

    rel: str
    upstream: Optional[bytes]
    patched: Optional[bytes]
    current: Optional[bytes] = None

    @property
    def state(self) -> str:
        if self.current == self.patched:
            return PATCHED
        if self.current == self.upstream:
            return PRISTINE
        return MODIFIED


def patch_paths(patch: Path) -> list[str]:
    paths = re.findall(r"^diff --git a/(\S+) b/(\S+)$", patch.read_text(), re.M)
    return sorted({p for pair in paths for p in pair})


def patched_files(
    overlay: Overlay, release: Release, upstream_tree: Path
) -> dict[str, tuple[Optional[bytes], Optional[bytes]]]:
    """rel path -> (upstream bytes, patched bytes) for every file the overlay touches.

    Patches are checked one by one with ``git apply --check`` in a scratch copy of
    the upstream files first; a patch that does not apply raises before anything
    is written anywhere.
    """
    patches = overlay.patches(release)
    touched = sorted({p for patch in patches for p in patch_paths(patch)})
    with tempfile.TemporaryDirectory(prefix="sglang-overlay-") as scratch:
        scratch_dir = Path(scratch)
        for rel in touched:
            src = upstream_tree / rel
            if src.is_file():
                (scratch_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, scratch_dir / rel)
        for patch in patches:
            proc = run(["git", "apply", "--check", "--verbose", str(patch)], cwd=scratch_dir, check=False)
            if proc.returncode != 0:
                raise OverlayError(
                    f"patch {patch.relative_to(overlay.root)} does not apply to sglang {release.version}:\n"
                    f"{proc.stderr.strip()}\nNothing was written. Regenerate the variant's patches with "
                    f"`scripts/overlay.py checkout {release.version} DIR` + `refresh DIR`."
                )
            run(["git", "apply", str(patch)], cwd=scratch_dir)
        result = {rel: (read_bytes(upstream_tree / rel), read_bytes(scratch_dir / rel)) for rel in touched}
    for rel in overlay.overlay_files():
        result[rel] = (read_bytes(upstream_tree / rel), (overlay.root / rel).read_bytes())
    return result


def plan_for(
    target: Target, overlay: Overlay, cache: Cache, upstream: Optional[Path] = None
) -> tuple[Release, list[FilePlan]]:
    """What the overlay does to ``target``; ``upstream`` (a tree holding python/sglang)
    defaults to the cached release."""
    release = overlay.release(target.version())
    tree = upstream or cache.release_tree(release.version)
    plans = [
        FilePlan(rel, upstream_bytes, patched, read_bytes(target.file(rel)))
        for rel, (upstream_bytes, patched) in sorted(patched_files(overlay, release, tree).items())
    ]
    return release, plans


def write_atomically(writes: list[tuple[Path, Optional[bytes]]]) -> None:
    """Write (or delete, for None) every path; on any failure restore what was there."""
    done: list[tuple[Path, Optional[bytes]]] = []
    try:
        for path, data in writes:
            before = read_bytes(path)
            if data is None:
                if path.exists():
                    path.unlink()
                    _drop_bytecode(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.sglang-overlay.tmp")
                tmp.write_bytes(data)
                if path.exists():
                    shutil.copymode(path, tmp)
                os.replace(tmp, path)
            done.append((path, before))
    except BaseException:
        for path, before in reversed(done):
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)
        raise


def _drop_bytecode(path: Path) -> None:
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink()


def apply(
    target_path: Path, overlay: Overlay, cache: Cache, check_only: bool = False, upstream: Optional[Path] = None
) -> str:
    """Apply the overlay to ``target_path``: every patch and file is checked first, then written."""
    target = Target.resolve(target_path)
    release, plans = plan_for(target, overlay, cache, upstream)
    modified = [p.rel for p in plans if p.state == MODIFIED]
    if modified:
        raise OverlayError(
            f"{target.path} has local edits where the overlay lands; nothing was written:\n  "
            + "\n  ".join(modified)
            + "\nRestore those files to sglang "
            + release.version
            + "'s bytes (or reinstall it) and apply again."
        )
    todo = [p for p in plans if p.state == PRISTINE]
    if not todo:
        return f"sglang {release.version} at {target.path}: overlay already applied (nothing to do)"
    if check_only:
        return (
            f"sglang {release.version} at {target.path}: overlay applies cleanly "
            f"({len(todo)} file(s) to write, variant {release.variant})"
        )
    write_atomically([(target.file(p.rel), p.patched) for p in todo])
    return (
        f"sglang {release.version} at {target.path}: overlay applied ({len(todo)} file(s), variant {release.variant})"
    )


def revert(target_path: Path, overlay: Overlay, cache: Cache) -> str:
    """Restore upstream's exact bytes (verified by sha256) and remove the files the overlay added."""
    target = Target.resolve(target_path)
    release, plans = plan_for(target, overlay, cache)
    modified = [p.rel for p in plans if p.state == MODIFIED]
    if modified:
        raise OverlayError(
            f"{target.path} has files that are neither upstream's nor the overlay's; nothing was reverted:\n  "
            + "\n  ".join(modified)
            + "\nSave your edits elsewhere, restore the files (or reinstall sglang), then revert."
        )
    todo = [p for p in plans if p.state == PATCHED and p.patched != p.upstream]
    write_atomically([(target.file(p.rel), p.upstream) for p in todo])
    for p in plans:
        if sha256(read_bytes(target.file(p.rel))) != sha256(p.upstream):
            raise OverlayError(f"after revert, {target.file(p.rel)} does not match sglang {release.version}")
    return f"sglang {release.version} at {target.path}: reverted to upstream ({len(todo)} file(s) restored)"


def status(target_path: Path, overlay: Overlay, cache: Cache) -> tuple[str, str]:
    """Returns (state, report): state is 'applied', 'not applied', 'partly applied' or 'modified'."""
    target = Target.resolve(target_path)
    release, plans = plan_for(target, overlay, cache)
    states = {p.state for p in plans if p.patched != p.upstream}
    if MODIFIED in states:
        state = "modified"
    elif states <= {PATCHED}:
        state = "applied"
    elif states == {PRISTINE}:
        state = "not applied"
    else:
        state = "partly applied"
    lines = [f"sglang {release.version} at {target.path} ({target.kind}, variant {release.variant}): {state}"]
    lines += [f"  {p.state:9} {p.rel}" for p in plans]
    return state, "\n".join(lines)
