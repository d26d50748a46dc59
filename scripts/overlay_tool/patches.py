"""Where maintainers edit patches: a patched checkout (checkout), patches from its commits
(refresh / export_patches), and the check that patches/ is up to date and applies (check)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from .apply import Target
from .cache import COMMITTER_IDENTITY, GIT_IDENTITY, Cache
from .errors import OverlayError
from .gitutil import git, read_bytes, run
from .releases import Overlay


def checkout(version: str, dest: Path, overlay: Overlay, cache: Cache) -> Path:
    """Clone release ``version`` into ``dest`` and commit each patch, then the overlay files."""
    release = overlay.release(version)
    tree = cache.release_tree(version)
    if dest.exists() and any(dest.iterdir()):
        raise OverlayError(f"{dest} exists and is not empty; choose a new directory")
    git("clone", "-q", str(tree), str(dest), cwd=Path.cwd())
    git("checkout", "-q", "-b", f"overlay-{version}", f"v{version}", cwd=dest)
    for patch in overlay.patches(release):
        proc = run(["git", "am", "-q", "--keep-cr", str(patch)], cwd=dest, env=COMMITTER_IDENTITY, check=False)
        if proc.returncode != 0:
            git("am", "--abort", cwd=dest, check=False)
            raise OverlayError(f"{patch.name} does not apply to sglang {version}:\n{proc.stderr.strip()}")
    for rel in overlay.overlay_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(overlay.root / rel, dest / rel)
    git("add", "-A", cwd=dest)
    git(
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "overlay: add the overlay's new files\n\n"
        "Not exported as a patch: these files live in the overlay repository at the same paths.",
        cwd=dest,
        env=GIT_IDENTITY,
    )
    return dest


def export_patches(checkout_dir: Path, overlay: Overlay, out_dir: Optional[Path] = None) -> list[Path]:
    """Write one patch per commit of ``v<release>..HEAD`` that touches upstream files.

    Overlay files (those under the repo's python/) are left out: they are kept in
    the repository, not as patches. The format is ``git format-patch`` with the
    volatile parts removed (commit hash, date, signature), so that regenerating
    from the same commits gives the same bytes.
    """
    target = Target.resolve(checkout_dir)
    if target.kind != "checkout" or not (checkout_dir / ".git").exists():
        raise OverlayError(
            f"{checkout_dir} is not a git checkout of upstream (make one with `overlay.py checkout X DIR`)"
        )
    release = overlay.release(target.version())
    base_release = overlay.variants[release.variant].base
    if release.version != base_release and out_dir is None:
        raise OverlayError(
            f"variant {release.variant} is generated from sglang {base_release}, its base; this checkout is "
            f"{release.version}. Refresh from `overlay.py checkout {base_release} DIR`, or give "
            f"{release.version} a variant of its own in patches/releases.toml"
        )
    if git("status", "--porcelain", "--untracked-files=no", cwd=checkout_dir).strip():
        raise OverlayError(
            f"{checkout_dir} has uncommitted changes: commit them (one commit per patch) and refresh again"
        )
    base = f"v{release.version}"
    overlay_files = set(overlay.overlay_files())
    changed = set(git("diff", "--name-only", base, "HEAD", cwd=checkout_dir).split())
    for rel in sorted(overlay_files & changed):
        if read_bytes(checkout_dir / rel) not in (None, (overlay.root / rel).read_bytes()):
            raise OverlayError(
                f"{rel} in {checkout_dir} differs from the overlay's copy in {overlay.root}: overlay files are "
                "edited in the overlay repository; copy your change there and refresh again"
            )
    excludes = [f":(exclude){rel}" for rel in sorted(overlay_files)]
    commits = git("rev-list", "--reverse", f"{base}..HEAD", cwd=checkout_dir).split()
    out_dir = out_dir or overlay.root / "patches" / release.variant
    patches: list[tuple[str, str]] = []
    for sha in commits:
        if not git("diff", "--name-only", f"{sha}^", sha, "--", ".", *excludes, cwd=checkout_dir).strip():
            continue
        text = git(
            "format-patch",
            "-1",
            sha,
            "--stdout",
            "--zero-commit",
            "--no-signature",
            "--no-stat",
            "--keep-subject",
            "--full-index",
            "--",
            ".",
            *excludes,
            cwd=checkout_dir,
        )
        subject = git("log", "-1", "--format=%s", sha, cwd=checkout_dir).strip()
        patches.append((subject, _stable_patch_text(text)))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for old in out_dir.glob("*.patch"):
        old.unlink()
    for index, (subject, text) in enumerate(patches, start=1):
        path = out_dir / f"{index:04d}-{_slug(subject)}.patch"
        path.write_text(text)
        written.append(path)
    return written


def _stable_patch_text(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("Date: "))


def _slug(subject: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-")[:60].rstrip("-")


def check(versions: Iterable[str], overlay: Overlay, cache: Cache) -> list[str]:
    """Problems with patches/ for ``versions``: patches that do not apply, or are stale.

    Every release's patches must apply. A variant's patches are generated from its
    base release; there, checking them out and refreshing must give the same bytes
    (a hand-edited hunk, a context that applies only at an offset, a dropped
    index line all show up as stale).
    """
    problems = []
    for version in versions:
        release = overlay.release(version)
        with tempfile.TemporaryDirectory(prefix="sglang-overlay-check-") as tmp:
            try:
                dest = checkout(version, Path(tmp) / "checkout", overlay, cache)
                if version != overlay.variants[release.variant].base:
                    continue
                fresh = export_patches(dest, overlay, Path(tmp) / "fresh")
            except OverlayError as exc:
                problems.append(f"{version}: {exc}")
                continue
            current = overlay.patches(release)
            names = ([p.name for p in current], [p.name for p in fresh])
            if names[0] != names[1] or any(a.read_bytes() != b.read_bytes() for a, b in zip(current, fresh)):
                problems.append(
                    f"{version}: patches/{release.variant}/ is stale (regenerated patches differ); run "
                    f"`scripts/overlay.py checkout {version} DIR && scripts/overlay.py refresh DIR` and commit"
                )
    return problems
