"""The release cache: upstream wheels from PyPI, and release trees shaped like upstream's repository."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .errors import OverlayError
from .gitutil import git, log, run
from .locks import entry_lock

# The identity of the commits the tool makes itself (release trees, checkouts).
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
# What fetching one release costs, on average (all 52 on a cold cache: 386 MB of wheels, 2.4 GB of release
# trees; `check` took 3 min on a quiet machine, 10 min at load average 5 on 2 cores), for what `check` and
# `matrix` say before they start.
WHEEL_MB, TREE_MB, FETCH_S = 7.4, 46, 3.5


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
        """The cached PyPI wheel of ``version`` (downloaded when missing; one run at a time, see ``locks``)."""
        wheels = self.root / "wheels"
        found = self._find_wheel(wheels, version)
        if found:
            return found
        with entry_lock(wheels / f"sglang-{version}", f"the sglang {version} wheel"):
            found = self._find_wheel(wheels, version)  # another run may have downloaded it meanwhile
            if found:
                return found
            log(f"downloading sglang=={version} from PyPI into {wheels}")
            # Into a scratch folder, then renamed into place: a wheel in wheels/ is always whole.
            with tempfile.TemporaryDirectory(prefix=f".download-{version}-", dir=wheels) as tmp:
                proc = run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary=:all:",
                        "--progress-bar",
                        "on",
                        "-d",
                        tmp,
                        f"sglang=={version}",
                    ],
                    check=False,
                    capture=False,
                )
                got = self._find_wheel(Path(tmp), version)
                if proc.returncode != 0 or not got:
                    raise OverlayError(
                        f"could not download the sglang {version} wheel from PyPI (pip exit {proc.returncode}); "
                        f"check the network, or put the wheel into {wheels} by hand"
                    )
                os.replace(got, wheels / got.name)
            return wheels / got.name

    @staticmethod
    def _find_wheel(wheels: Path, version: str) -> Optional[Path]:
        matches = sorted(wheels.glob(f"sglang-{version}-*.whl"))
        return matches[0] if matches else None

    def release_tree(self, version: str) -> Path:
        """The cached upstream git repository of ``version`` (fetched when missing; one run at a time).

        Built in a scratch folder beside it and renamed into place, so a tree in releases/ is whole."""
        repo = self.root / "releases" / version
        if self._tree_ready(repo, version):
            return repo
        with entry_lock(repo, f"the sglang {version} release tree"):
            if self._tree_ready(repo, version):  # another run built it meanwhile
                return repo
            self._build_tree(repo, version)
        return repo

    @staticmethod
    def _tree_ready(repo: Path, version: str) -> bool:
        return (repo / ".git").is_dir() and bool(git("tag", "--list", f"v{version}", cwd=repo, check=False).strip())

    def _build_tree(self, repo: Path, version: str) -> None:
        wheel = self.wheel(version)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=repo.parent))
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
            git(
                "commit",
                "-q",
                "--no-verify",
                "-m",
                f"sglang {version}\n\nUpstream source from {wheel.name} (PyPI).",
                cwd=staging,
                env=GIT_IDENTITY,
            )
            git("tag", f"v{version}", cwd=staging)
            if repo.exists():  # not a whole tree (an older tool's, or damaged); this run holds the lock
                shutil.rmtree(repo)
            staging.rename(repo)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    def missing(self, versions: Iterable[str]) -> tuple[list[str], list[str]]:
        """Of ``versions``, those whose release tree is not in the cache yet, and of those, the ones
        whose wheel must be downloaded too."""
        trees = [v for v in versions if not self._tree_ready(self.root / "releases" / v, v)]
        return trees, [v for v in trees if not self._find_wheel(self.root / "wheels", v)]

    def fetch_notice(self, versions: Sequence[str], verb: str) -> Optional[str]:
        """What fetching ``versions`` will cost when some are not in the cache yet, said before ``verb``
        starts (None when every release tree is there)."""
        trees, wheels = self.missing(versions)
        if not trees:
            return None
        download = (
            f"downloads {len(wheels)} wheel(s) from PyPI (about {len(wheels) * WHEEL_MB:.0f} MB), " if wheels else ""
        )
        return (
            f"{verb}: {len(trees)} of the {len(versions)} release(s) are not in the cache ({self.root}) yet: "
            f"fetching them {download}takes about {len(trees) * (WHEEL_MB + TREE_MB) / 1000:.1f} GB on disk and "
            f"about {max(1, round(len(trees) * FETCH_S / 60))} min on a quiet machine. `{verb} X ...` works on the "
            "releases named only"
        )
