#!/usr/bin/env python3
"""sglang-overlay: keep a small patch set and new files on top of upstream SGLang releases.

Verbs (``python scripts/overlay.py VERB --help`` for each):
  releases            the supported releases and their patch variant
  fetch X             release X's upstream tree into the cache; prints its path
  apply TARGET        apply the overlay to an upstream checkout or an installed sglang
  revert TARGET       restore the exact upstream bytes
  status TARGET       applied, not applied, or partly applied
  checkout X DIR      a patched upstream git checkout to edit patches in
  refresh CHECKOUT    regenerate patches/<variant>/ from a patched checkout
  check [X ...]       fail when patches/ is stale or does not apply
  venv X DIR          a CPU virtual environment with release X, patched
  demo [X]            set up the venv and run the demo (native OPT vs HuggingFace)
  matrix [X ...]      fetch, apply, byte-compile and test each release (--newest: PyPI's newest)
  export-pr UPSTREAM  an upstream PR branch from tag vX (git-filter-repo)

Everything the tool knows about releases comes from patches/releases.toml.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        sys.exit("scripts/overlay.py needs Python 3.11+ (tomllib), or `pip install tomli` on 3.10")

REPO = Path(__file__).resolve().parent.parent
PACKAGE_PREFIX = "python/sglang/"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "SGLang upstream",
    "GIT_AUTHOR_EMAIL": "upstream@sglang.invalid",
    "GIT_COMMITTER_NAME": "sglang-overlay",
    "GIT_COMMITTER_EMAIL": "overlay@sglang-overlay.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}
# `git am` takes the author from each patch; the committer side is fixed.
COMMITTER_IDENTITY = {k: v for k, v in GIT_IDENTITY.items() if k.startswith("GIT_COMMITTER")}
VENV_MARKER = "sglang-overlay.json"


class OverlayError(Exception):
    """A failure the user can act on; the message says what to do."""

    exit_code = 1


class UnsupportedRelease(OverlayError):
    exit_code = 2


# --------------------------------------------------------------------------- releases


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
            data = tomllib.loads(path.read_text())
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
    parts = re.findall(r"\d+|[a-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


# --------------------------------------------------------------------------- helpers


def run(cmd: Sequence[str], cwd: Optional[Path] = None, env: Optional[dict] = None, check: bool = True,
        capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(cmd), cwd=cwd, env={**os.environ, **(env or {})}, text=True,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip() if capture else ""
        raise OverlayError(f"`{' '.join(cmd)}` failed (exit {proc.returncode})" + (f":\n{detail}" if detail else ""))
    return proc


def git(*args: str, cwd: Path, env: Optional[dict] = None, check: bool = True) -> str:
    return run(["git", *args], cwd=cwd, env=env, check=check).stdout


def sha256(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else hashlib.sha256(data).hexdigest()


def read_bytes(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- release cache


class Cache:
    """Upstream releases from PyPI wheels, as git repositories shaped like upstream's.

    ``<root>/wheels/`` holds the downloaded wheels, ``<root>/releases/X/`` a git
    repository with ``python/sglang/...`` committed once and tagged ``vX``.
    The root is $SGLANG_OVERLAY_CACHE, else $XDG_CACHE_HOME/sglang-overlay, else
    ~/.cache/sglang-overlay.
    """

    def __init__(self, root: Optional[Path] = None) -> None:
        if root is None:
            env = os.environ.get("SGLANG_OVERLAY_CACHE")
            xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            root = Path(env) if env else Path(xdg) / "sglang-overlay"
        self.root = root

    def wheel(self, version: str) -> Path:
        wheels = self.root / "wheels"
        found = self._find_wheel(wheels, version)
        if found:
            return found
        wheels.mkdir(parents=True, exist_ok=True)
        log(f"downloading sglang=={version} from PyPI into {wheels}")
        proc = run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
             "-d", str(wheels), f"sglang=={version}"],
            check=False, capture=False,
        )
        found = self._find_wheel(wheels, version)
        if proc.returncode != 0 or not found:
            raise OverlayError(
                f"could not download the sglang {version} wheel from PyPI (pip exit {proc.returncode}); "
                f"check the network, or put the wheel into {wheels} by hand"
            )
        return found

    @staticmethod
    def _find_wheel(wheels: Path, version: str) -> Optional[Path]:
        matches = sorted(wheels.glob(f"sglang-{version}-*.whl"))
        return matches[0] if matches else None

    def release_tree(self, version: str) -> Path:
        """The cached upstream git repository of ``version`` (fetched when missing)."""
        repo = self.root / "releases" / version
        if (repo / ".git").is_dir() and git("tag", "--list", f"v{version}", cwd=repo).strip():
            return repo
        wheel = self.wheel(version)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self._mkdir(self.root / "releases")))
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.startswith("sglang/") and not m.endswith("/")]
                if not members:
                    raise OverlayError(f"{wheel} holds no sglang/ package")
                for member in members:
                    target = staging / "python" / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(member))
            git("init", "-q", "-b", "main", cwd=staging)
            git("add", "-A", cwd=staging)
            git("commit", "-q", "--no-verify", "-m", f"sglang {version}\n\nUpstream source from {wheel.name} (PyPI).",
                cwd=staging, env=GIT_IDENTITY)
            git("tag", f"v{version}", cwd=staging)
            if repo.exists():
                shutil.rmtree(repo)
            staging.rename(repo)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return repo

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path


# --------------------------------------------------------------------------- targets


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
        return self.package_dir / rel[len(PACKAGE_PREFIX):]

    def version(self) -> str:
        for name in ("_version.py", "version.py"):
            text = read_bytes(self.package_dir / name)
            if text is None:
                continue
            m = re.search(r"""^__version__\s*(?:=\s*version\s*)?=\s*['"]([^'"]+)['"]""", text.decode(), re.M)
            if m:
                return m.group(1)
        raise OverlayError(f"cannot read the sglang release from {self.package_dir}/version.py")


# --------------------------------------------------------------------------- the plan


PATCHED, PRISTINE, MODIFIED = "applied", "upstream", "modified"


@dataclass
class FilePlan:
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


def patched_files(overlay: Overlay, release: Release, upstream_tree: Path) -> dict[str, tuple[Optional[bytes], Optional[bytes]]]:
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


def plan_for(target: Target, overlay: Overlay, cache: Cache,
             upstream: Optional[Path] = None) -> tuple[Release, list[FilePlan]]:
    """What the overlay does to ``target``; ``upstream`` (a tree holding python/sglang)
    defaults to the cached release."""
    release = overlay.release(target.version())
    tree = upstream or cache.release_tree(release.version)
    plans = [
        FilePlan(rel, upstream, patched, read_bytes(target.file(rel)))
        for rel, (upstream, patched) in sorted(patched_files(overlay, release, tree).items())
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


# --------------------------------------------------------------------------- verbs


def apply(target_path: Path, overlay: Overlay, cache: Cache, check_only: bool = False,
          upstream: Optional[Path] = None) -> str:
    target = Target.resolve(target_path)
    release, plans = plan_for(target, overlay, cache, upstream)
    modified = [p.rel for p in plans if p.state == MODIFIED]
    if modified:
        raise OverlayError(
            f"{target.path} has local edits where the overlay lands; nothing was written:\n  "
            + "\n  ".join(modified)
            + "\nRestore those files to sglang " + release.version + "'s bytes (or reinstall it) and apply again."
        )
    todo = [p for p in plans if p.state == PRISTINE]
    if not todo:
        return f"sglang {release.version} at {target.path}: overlay already applied (nothing to do)"
    if check_only:
        return (f"sglang {release.version} at {target.path}: overlay applies cleanly "
                f"({len(todo)} file(s) to write, variant {release.variant})")
    write_atomically([(target.file(p.rel), p.patched) for p in todo])
    return f"sglang {release.version} at {target.path}: overlay applied ({len(todo)} file(s), variant {release.variant})"


def revert(target_path: Path, overlay: Overlay, cache: Cache) -> str:
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
    git("commit", "-q", "--allow-empty", "-m", "overlay: add the overlay's new files\n\n"
        "Not exported as a patch: these files live in the overlay repository at the same paths.",
        cwd=dest, env=GIT_IDENTITY)
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
        raise OverlayError(f"{checkout_dir} is not a git checkout of upstream (make one with `overlay.py checkout X DIR`)")
    release = overlay.release(target.version())
    base_release = overlay.variants[release.variant].base
    if release.version != base_release and out_dir is None:
        raise OverlayError(
            f"variant {release.variant} is generated from sglang {base_release}, its base; this checkout is "
            f"{release.version}. Refresh from `overlay.py checkout {base_release} DIR`, or give "
            f"{release.version} a variant of its own in patches/releases.toml"
        )
    if git("status", "--porcelain", "--untracked-files=no", cwd=checkout_dir).strip():
        raise OverlayError(f"{checkout_dir} has uncommitted changes: commit them (one commit per patch) and refresh again")
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
        text = git("format-patch", "-1", sha, "--stdout", "--zero-commit", "--no-signature", "--no-stat",
                   "--keep-subject", "--full-index", "--", ".", *excludes, cwd=checkout_dir)
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


# --------------------------------------------------------------------------- venvs


def venv_python(directory: Path) -> Path:
    return directory / "bin" / "python"


def site_packages(python: Path) -> Path:
    out = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    return Path(out.strip())


TORCHVISION_SHIM = "sglang_overlay_torchvision"


def install_torchvision_shim(python: Path, overlay: Overlay) -> None:
    """scripts/venv_support's torchvision shim in the venv, loaded by a .pth line (README, Troubleshooting)."""
    sp = site_packages(python)
    shutil.copyfile(overlay.root / "scripts" / "venv_support" / f"{TORCHVISION_SHIM}.py", sp / f"{TORCHVISION_SHIM}.py")
    (sp / f"{TORCHVISION_SHIM}.pth").write_text(f"import {TORCHVISION_SHIM}; {TORCHVISION_SHIM}.install()\n")


def make_venv(version: str, directory: Path, overlay: Overlay, cache: Cache) -> Path:
    """A venv where ``import sglang`` is release ``version`` with the overlay applied, on CPU."""
    release = overlay.release(version)
    runtime = overlay.runtime
    python = venv_python(directory)
    deps = {**runtime_deps(overlay), "transformers": release.transformers, "sglang": version}
    marker = directory / VENV_MARKER
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if recorded and recorded.get("deps") == deps and python.exists():
        if recorded.get("overlay") != overlay.fingerprint(release):
            sp = site_packages(python)
            revert_to_upstream(sp / "sglang", version, cache)
            log(apply(sp / "sglang", overlay, cache))
            marker.write_text(json.dumps({"deps": deps, "overlay": overlay.fingerprint(release)}, indent=1))
        log(f"venv {directory} is ready for sglang {version}")
        return python
    if directory.exists():
        shutil.rmtree(directory)
    log(f"creating venv {directory} for sglang {version} (CPU torch {runtime['torch']})")
    run([sys.executable, "-m", "venv", str(directory)], capture=False)
    constraints = directory / "constraints.txt"
    constraints.write_text(f"torch=={runtime['torch']}\ntransformers=={release.transformers}\n")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "on", "-c", str(constraints)]
    started = time.monotonic()
    run(pip + [f"torch=={runtime['torch']}"], capture=False)
    run(pip + [f"transformers=={release.transformers}", *runtime["packages"]], capture=False)
    run(pip + ["--no-deps", f"torchvision=={runtime['torchvision']}", str(cache.wheel(version))], capture=False)
    install_torchvision_shim(python, overlay)
    log(apply(site_packages(python) / "sglang", overlay, cache))
    marker.write_text(json.dumps({"deps": deps, "overlay": overlay.fingerprint(release)}, indent=1))
    log(f"venv {directory} built in {time.monotonic() - started:.0f} s")
    return python


def revert_to_upstream(package_dir: Path, version: str, cache: Cache) -> None:
    """Put every file of the installed package back to ``version``'s bytes, whatever overlay was applied."""
    tree = cache.release_tree(version) / "python" / "sglang"
    for path in package_dir.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and not (tree / path.relative_to(package_dir)).exists():
            path.unlink()
    for src in tree.rglob("*"):
        if src.is_file():
            dst = package_dir / src.relative_to(tree)
            if read_bytes(dst) != src.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)


# --------------------------------------------------------------------------- matrix

# What `matrix` does per release:
# - full (the default release): the whole CPU suite, against the fork wheel that
#   setup.py builds (`pip wheel --no-deps`, installed with `--no-deps --target`);
# - release (every other release that runs on CPU): the tests whose outcome
#   depends on the sglang release (RELEASE_TESTS), against its patched tree;
#   the tool's own tests and the fork build do not, and run once, under full;
# - compile: apply + byte-compile only (releases that do not run on CPU).
FULL, RELEASE, COMPILE = "full", "release", "compile"
RELEASE_TESTS = ["tests/test_opt.py", "tests/test_reuse_distributed.py", "tests/test_standalone.py",
                 "tests/test_mezo.py"]
PYPI_JSON = "https://pypi.org/pypi/sglang/json"


def test_level(release: Release, overlay: Overlay) -> str:
    """full on the default release, release on the other CPU releases, compile elsewhere."""
    if not release.cpu:
        return COMPILE
    return FULL if release.version == overlay.default else RELEASE


def runtime_deps(overlay: Overlay) -> dict:
    """What every CPU test environment shares, whatever the release."""
    runtime = overlay.runtime
    return {
        "torch": runtime["torch"],
        "torchvision": runtime["torchvision"],
        "packages": list(runtime["packages"]),
        "shim": sha256((overlay.root / "scripts" / "venv_support" / f"{TORCHVISION_SHIM}.py").read_bytes()),
    }


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def dependency_groups(versions: Iterable[str], overlay: Overlay) -> dict[str, list[str]]:
    """The releases that run tests, grouped by the environment they share (one per transformers pin).

    sglang itself is never installed in these environments: each release's
    patched tree goes first on PYTHONPATH, so releases whose pins agree share one.
    """
    groups: dict[str, list[str]] = {}
    for version in versions:
        release = overlay.release(version)
        if test_level(release, overlay) != COMPILE:
            groups.setdefault(release.transformers, []).append(version)
    return groups


def _ready(directory: Path, deps: dict) -> bool:
    marker = directory / VENV_MARKER
    try:
        return json.loads(marker.read_text()).get("deps") == deps and venv_python(directory).exists()
    except (OSError, ValueError):
        return False


def _new_venv(directory: Path, deps: dict, what: str) -> Optional[Path]:
    """None when ``directory`` is a ready venv for ``deps``; else an empty venv there, and its python."""
    if _ready(directory, deps):
        return None
    if directory.exists():
        shutil.rmtree(directory)
    log(f"creating {directory}: {what}")
    run([sys.executable, "-m", "venv", str(directory)], capture=False)
    return venv_python(directory)


def make_base_env(overlay: Overlay, envs: Path) -> Path:
    """The venv every test environment builds on: CPU torch, torchvision, the runtime packages, the shim."""
    deps = runtime_deps(overlay)
    directory = envs / f"base-{_digest(deps)}"
    started = time.monotonic()
    python = _new_venv(directory, deps, f"the shared base venv (CPU torch {deps['torch']})")
    if python is None:
        return venv_python(directory)
    constraints = directory / "constraints.txt"
    constraints.write_text(f"torch=={deps['torch']}\n")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraints)]
    run(pip + [f"torch=={deps['torch']}"], capture=False)
    run(pip + [*deps["packages"], "setuptools", "wheel"], capture=False)
    run(pip + ["--no-deps", f"torchvision=={deps['torchvision']}"], capture=False)
    install_torchvision_shim(python, overlay)
    (directory / VENV_MARKER).write_text(json.dumps({"deps": deps}, indent=1))
    log(f"base venv built in {time.monotonic() - started:.0f} s")
    return python


def make_deps_env(transformers: str, overlay: Overlay, envs: Path) -> Path:
    """A venv layered on the base venv (a .pth adds its site-packages) with ``transformers`` on top.

    Its own site-packages comes first on sys.path, so the transformers pin and
    what it needs (tokenizers, huggingface_hub, ...) shadow the base's copies;
    torch and the rest come from the base, installed once.
    """
    base_python = make_base_env(overlay, envs)
    deps = {**runtime_deps(overlay), "transformers": transformers, "base": str(base_python)}
    directory = envs / f"transformers-{transformers}-{_digest(deps)}"
    started = time.monotonic()
    python = _new_venv(directory, deps, f"transformers {transformers} on the shared base venv")
    if python is None:
        return venv_python(directory)
    (site_packages(python) / "sglang_overlay_base.pth").write_text(
        f"import site; site.addsitedir({str(site_packages(base_python))!r})\n")
    constraints = directory / "constraints.txt"
    constraints.write_text(f"torch=={deps['torch']}\ntransformers=={transformers}\n")
    run([str(python), "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraints),
         f"transformers=={transformers}"], capture=False)
    (directory / VENV_MARKER).write_text(json.dumps({"deps": deps}, indent=1))
    log(f"transformers {transformers} venv built in {time.monotonic() - started:.0f} s")
    return python


def patched_tree(version: str, dest: Path, overlay: Overlay, cache: Cache) -> Path:
    """``dest/python/sglang``: release ``version`` with the overlay applied, importable from ``dest/python``.

    Files are hard links into the release cache where possible; apply replaces
    the files it writes (never writes through a link). A minimal dist-info says
    which sglang this is, for code that reads its own metadata.
    """
    tree = cache.release_tree(version)
    try:
        shutil.copytree(tree / "python", dest / "python", ignore=shutil.ignore_patterns(".git"), copy_function=os.link)
    except OSError:
        shutil.rmtree(dest / "python", ignore_errors=True)
        shutil.copytree(tree / "python", dest / "python", ignore=shutil.ignore_patterns(".git"))
    apply(dest, overlay, cache)
    if status(dest, overlay, cache)[0] != "applied":
        raise OverlayError("apply did not leave the tree applied")
    info = dest / "python" / f"sglang-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sglang\nVersion: {version}\n")
    (info / "INSTALLER").write_text("sglang-overlay\n")
    return dest / "python"


def fork_site(version: str, dest: Path, python: Path, overlay: Overlay, cache: Cache) -> Path:
    """The fork as users get it: ``pip wheel --no-deps`` of this repository for ``version``
    (setup.py, offline from the cached upstream wheel), installed with ``--no-deps --target``."""
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": version, "SGLANG_OVERLAY_UPSTREAM": str(cache.wheel(version))}
    log(f"building the fork wheel of sglang {version} (pip wheel --no-deps .)")
    run([str(python), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest / "dist"),
         str(overlay.root)], env=env, capture=False)
    (wheel,) = (dest / "dist").glob("sglang-*.whl")
    run([str(python), "-m", "pip", "install", "--no-deps", "-q", "--target", str(dest / "site"), str(wheel)],
        capture=False)
    state, report = status(dest / "site" / "sglang", overlay, cache)
    if state != "applied":
        raise OverlayError(f"the fork wheel {wheel.name} does not hold the applied overlay:\n{report}")
    return dest / "site"


def byte_compile(version: str, overlay: Overlay, cache: Cache) -> None:
    release = overlay.release(version)
    for rel, (_, patched) in patched_files(overlay, release, cache.release_tree(version)).items():
        if rel.endswith(".py") and patched is not None:
            try:
                compile(patched, rel, "exec", dont_inherit=True)
            except SyntaxError as exc:
                raise OverlayError(f"{rel} does not compile once patched for sglang {version}: {exc}") from None


def newest_release(url: Optional[str] = None) -> str:
    """The newest sglang release on PyPI (its JSON API; $SGLANG_OVERLAY_PYPI_JSON overrides the URL)."""
    import urllib.request

    url = url or os.environ.get("SGLANG_OVERLAY_PYPI_JSON") or PYPI_JSON
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)["info"]["version"]
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot tell
        raise OverlayError(f"cannot ask PyPI for the newest sglang release ({url}): {exc}") from None


def require_newest_supported(overlay: Overlay, newest: str) -> str:
    if newest not in overlay.releases:
        raise UnsupportedRelease(
            f"sglang {newest} is the newest release on PyPI but patches/releases.toml does not list it "
            f"(newest supported: {overlay.versions()[-1]}). Add it: find the variant whose patches apply "
            f"(`scripts/overlay.py check {newest}` after listing it under that variant), or make a new variant "
            f"(`scripts/overlay.py checkout {newest} DIR`, port the hooks, `refresh DIR`), then `check` and "
            f"`matrix {newest}`, and record cpu/cpu_note in releases.toml and README."
        )
    return newest


def matrix(versions: Sequence[str], overlay: Overlay, cache: Cache, venvs: Path, pytest_args: Sequence[str],
           level: Optional[str] = None) -> int:
    """Per release: fetch, apply, byte-compile, then its tests (see ``test_level``); prints a table."""
    rows = []
    releases = [overlay.release(v) for v in versions]
    versions = sorted(versions, key=lambda v: (overlay.release(v).transformers, version_key(v)))
    envs: dict[str, Path] = {}
    for version in versions:
        release = overlay.release(version)
        lvl = test_level(release, overlay)
        if level is not None and lvl != COMPILE:
            lvl = level
        row = {"release": version, "variant": release.variant, "level": lvl,
               "apply": "-", "compile": "-", "tests": "-", "seconds": 0.0}
        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="sglang-overlay-matrix-") as tmp:
                path = patched_tree(version, Path(tmp) / version, overlay, cache)
                row["apply"] = "ok"
                byte_compile(version, overlay, cache)
                row["compile"] = "ok"
                if lvl == COMPILE:
                    row["tests"] = f"n/a: {release.cpu_note or 'does not import on CPU'}"
                else:
                    if release.transformers not in envs:
                        envs[release.transformers] = make_deps_env(release.transformers, overlay, venvs)
                    python = envs[release.transformers]
                    selection = RELEASE_TESTS if lvl == RELEASE else []
                    if lvl == FULL:
                        path = fork_site(version, Path(tmp) / "fork", python, overlay, cache)
                    log(f"== {lvl} tests against sglang {version} from {path}")
                    # The base venv's console scripts (git-filter-repo for export-pr) come after the layer's.
                    bins = [str(python.parent), str(make_base_env(overlay, venvs).parent), os.environ.get("PATH", "")]
                    env = {**os.environ, "SGLANG_OVERLAY_RELEASE": version, "PATH": os.pathsep.join(bins),
                           "PYTHONPATH": os.pathsep.join([str(path), *filter(None, [os.environ.get("PYTHONPATH")])])}
                    proc = subprocess.run([str(python), "-m", "pytest", *pytest_args, *selection],
                                          cwd=overlay.root, env=env)
                    row["tests"] = "ok" if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode})"
        except OverlayError as exc:
            log(f"sglang {version}: {exc}")
            for key in ("apply", "compile", "tests"):
                if row[key] == "-":
                    row[key] = "FAILED"
                    break
        row["seconds"] = time.monotonic() - started
        rows.append(row)
    order = {r.version: i for i, r in enumerate(releases)}
    rows.sort(key=lambda r: order[r["release"]])
    print(format_table(rows))
    total = sum(r["seconds"] for r in rows)
    print(f"{len(rows)} release(s) in {total / 60:.1f} min "
          f"({sum(r['level'] == FULL for r in rows)} full, {sum(r['level'] == RELEASE for r in rows)} release, "
          f"{sum(r['level'] == COMPILE for r in rows)} apply+compile only)")
    return 0 if all(r[k] == "ok" or r[k].startswith("n/a") for r in rows for k in ("apply", "compile", "tests")) else 1


def format_table(rows: list[dict]) -> str:
    header = ["release", "variant", "level", "apply", "compile", "tests", "seconds"]
    cells = [[str(r.get(h, "")) if h != "seconds" else f"{r[h]:.0f}" for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    fmt = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)])


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="overlay.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--overlay-root", type=Path, default=REPO, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub.add_parser("releases", help="list the supported releases and their patch variant")
    p = sub.add_parser("fetch", help="fetch release X into the cache; print its upstream tree")
    p.add_argument("version")
    for verb, text in (("apply", "apply the overlay"), ("revert", "restore upstream's bytes"),
                       ("status", "applied, not applied or partly applied")):
        p = sub.add_parser(verb, help=f"{text} (TARGET: upstream checkout or installed sglang package dir)")
        p.add_argument("target", type=Path)
        if verb == "apply":
            p.add_argument("--check", action="store_true", help="verify only; write nothing")
    p = sub.add_parser("checkout", help="a patched upstream git checkout of X in DIR (one commit per patch)")
    p.add_argument("version")
    p.add_argument("dest", type=Path)
    p = sub.add_parser("refresh", help="regenerate patches/<variant>/ from a patched upstream git checkout")
    p.add_argument("checkout", type=Path)
    p = sub.add_parser("check", help="fail when patches/ is stale or does not apply")
    p.add_argument("versions", nargs="*")
    p = sub.add_parser("venv", help="a CPU venv in DIR with release X patched; prints its python")
    p.add_argument("version")
    p.add_argument("dest", type=Path)
    p = sub.add_parser("demo", help="build the venv of X and run the demo (native OPT vs HuggingFace)")
    p.add_argument("version", nargs="?")
    p.add_argument("--venvs", type=Path, help="where the per-release venvs live (default: CACHE/venvs)")
    import export_pr

    p = sub.add_parser("export-pr", help="an upstream PR branch in UPSTREAM from tag vX (nothing is pushed)")
    export_pr.add_arguments(p)
    p = sub.add_parser("matrix", help="for each release: fetch, apply, byte-compile, run the CPU tests")
    p.add_argument("versions", nargs="*", help="releases (default: every supported release)")
    p.add_argument("--all", action="store_true", help="every supported release (the default without versions)")
    p.add_argument("--newest", action="store_true",
                   help="ask PyPI for the newest sglang release; fail unless it is supported; test it "
                        "(with versions or --all: check, then test those)")
    p.add_argument("--level", choices=[FULL, RELEASE],
                   help="run this test level on every CPU-capable release (default: full on the default "
                        "release, release elsewhere)")
    p.add_argument("--venvs", type=Path, help="where the shared test venvs live (default: CACHE/venvs)")
    p.add_argument("--pytest-args", default="-q", help="arguments for pytest (one string)")
    args = parser.parse_args(argv)

    try:
        overlay = Overlay.load(args.overlay_root)
        cache = Cache()
        venvs = (getattr(args, "venvs", None) or cache.root / "venvs").resolve()
        if args.verb == "releases":
            for version in overlay.versions():
                r = overlay.releases[version]
                cpu = f"CPU tests: {test_level(r, overlay)}" if r.cpu else f"apply+compile only ({r.cpu_note})"
                default = " (default)" if version == overlay.default else ""
                print(f"{version:12} variant {r.variant:16} transformers {r.transformers:8} {cpu}{default}")
        elif args.verb == "fetch":
            overlay.release(args.version)
            print(cache.release_tree(args.version) / "python" / "sglang")
        elif args.verb == "apply":
            print(apply(args.target, overlay, cache, check_only=args.check))
        elif args.verb == "revert":
            print(revert(args.target, overlay, cache))
        elif args.verb == "status":
            print(status(args.target, overlay, cache)[1])
        elif args.verb == "checkout":
            print(checkout(args.version, args.dest.resolve(), overlay, cache))
        elif args.verb == "refresh":
            for path in export_patches(args.checkout.resolve(), overlay):
                print(path.relative_to(overlay.root))
        elif args.verb == "check":
            problems = check(args.versions or overlay.versions(), overlay, cache)
            for problem in problems:
                print(problem)
            if problems:
                return 1
            print("patches are up to date and apply cleanly")
        elif args.verb == "venv":
            print(make_venv(args.version, args.dest.resolve(), overlay, cache))
        elif args.verb == "demo":
            version = args.version or overlay.default
            python = make_venv(version, venvs / version, overlay, cache)
            return subprocess.call([str(python), str(overlay.root / "scripts" / "demo.py")])
        elif args.verb == "export-pr":
            print(export_pr.export_pr_from_args(args, overlay, cache))
        elif args.verb == "matrix":
            versions = list(args.versions)
            if args.newest:
                newest = require_newest_supported(overlay, newest_release())
                log(f"sglang {newest}, the newest release on PyPI, is supported")
                if not versions and not args.all:
                    versions = [newest]
            versions = versions or overlay.versions()
            for version in versions:
                overlay.release(version)
            return matrix(versions, overlay, cache, venvs, args.pytest_args.split(), level=args.level)
    except OverlayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    # export_pr imports this module as "overlay": let it find this one, not a second copy.
    sys.modules.setdefault("overlay", sys.modules[__name__])
    sys.exit(main())
