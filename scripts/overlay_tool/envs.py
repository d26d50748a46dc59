"""CPU virtual environments: one per release (``venv``), and for ``matrix`` and ``demo`` a shared
base venv (CPU torch, torchvision, the runtime packages) with one thin layer per transformers pin,
sglang coming from a patched release tree on PYTHONPATH (``patched_tree``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .apply import apply, status
from .cache import Cache
from .errors import OverlayError
from .gitutil import log, read_bytes, run, sha256
from .releases import Overlay

VENV_MARKER = "sglang-overlay.json"
TORCHVISION_SHIM = "sglang_overlay_torchvision"


def venv_python(directory: Path) -> Path:
    return directory / "bin" / "python"


def site_packages(python: Path) -> Path:
    out = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    return Path(out.strip())


def install_torchvision_shim(python: Path, overlay: Overlay) -> None:
    """scripts/venv_support's torchvision shim in the venv, loaded by a .pth line (README, Troubleshooting)."""
    sp = site_packages(python)
    shutil.copyfile(overlay.root / "scripts" / "venv_support" / f"{TORCHVISION_SHIM}.py", sp / f"{TORCHVISION_SHIM}.py")
    (sp / f"{TORCHVISION_SHIM}.pth").write_text(f"import {TORCHVISION_SHIM}; {TORCHVISION_SHIM}.install()\n")


def runtime_deps(overlay: Overlay) -> dict:
    """What every CPU test environment shares, whatever the release."""
    runtime = overlay.runtime
    return {
        "torch": runtime["torch"],
        "torchvision": runtime["torchvision"],
        "packages": list(runtime["packages"]),
        "shim": sha256((overlay.root / "scripts" / "venv_support" / f"{TORCHVISION_SHIM}.py").read_bytes()),
    }


def make_venv(version: str, directory: Path, overlay: Overlay, cache: Cache) -> Path:
    """A venv where ``import sglang`` is release ``version`` with the overlay applied, on CPU.

    A release that does not run on CPU is refused (NotOnCPU) before anything is downloaded or created."""
    release = overlay.cpu_release(version, "venv")
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


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


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
    # The kernels extra: the base venv's newest transformers pulls the newest `kernels`, which older pins
    # import when present and cannot use (transformers 5.12.1 with kernels 0.19: "Either a revision or a
    # version must be specified" at import); the layer carries the kernels its own pin declares.
    deps = {**runtime_deps(overlay), "transformers": transformers, "extras": ["kernels"], "base": str(base_python)}
    directory = envs / f"transformers-{transformers}-{_digest(deps)}"
    started = time.monotonic()
    python = _new_venv(directory, deps, f"transformers {transformers} on the shared base venv")
    if python is None:
        return venv_python(directory)
    (site_packages(python) / "sglang_overlay_base.pth").write_text(
        f"import site; site.addsitedir({str(site_packages(base_python))!r})\n"
    )
    constraints = directory / "constraints.txt"
    constraints.write_text(f"torch=={deps['torch']}\ntransformers=={transformers}\n")
    run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--progress-bar",
            "off",
            "-c",
            str(constraints),
            f"transformers[{','.join(deps['extras'])}]=={transformers}",
        ],
        capture=False,
    )
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


def run_demo(version: str, overlay: Overlay, cache: Cache, envs: Path, verbose: bool = False) -> int:
    """scripts/demo.py on release ``version``, in the environment ``matrix`` tests it in: the shared base
    venv + the layer of its transformers pin, its patched tree first on PYTHONPATH; the demo's exit status.

    A release that does not run on CPU is refused (NotOnCPU) before anything is downloaded or created."""
    release = overlay.cpu_release(version, "demo")
    python = make_deps_env(release.transformers, overlay, envs)
    with tempfile.TemporaryDirectory(prefix="sglang-overlay-demo-") as tmp:
        path = patched_tree(version, Path(tmp) / version, overlay, cache)
        env = {
            **os.environ,
            "SGLANG_OVERLAY_RELEASE": version,
            "PYTHONPATH": os.pathsep.join([str(path), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        log(f"demo: sglang {version} (patched tree {path}) on {python}")
        return subprocess.call(
            [str(python), str(overlay.root / "scripts" / "demo.py"), *(["--verbose"] if verbose else [])], env=env
        )
