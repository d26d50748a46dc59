"""The release matrix: per release fetch, apply, byte-compile, then its CPU tests; the newest-release
check against PyPI; the table.

What ``matrix`` does per release:
- full (the default release): the whole CPU suite, against the fork wheel that
  the build backend builds (``pip wheel --no-deps``, installed with ``--no-deps --target``);
- release (every other release that runs on CPU): the tests whose outcome
  depends on the sglang release (RELEASE_TESTS), against its patched tree;
  the tool's own tests and the fork build do not, and run once, under full;
- compile: apply + byte-compile only (releases that do not run on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .apply import patched_files, status
from .cache import Cache
from .envs import make_base_env, make_deps_env, patched_tree
from .errors import OverlayError, UnsupportedRelease
from .gitutil import log, run
from .releases import Overlay, Release, version_key

FULL, RELEASE, COMPILE = "full", "release", "compile"
RELEASE_TESTS = [
    "tests/test_opt.py",
    "tests/test_reuse_distributed.py",
    "tests/test_standalone.py",
    "tests/test_runner_inputs.py",
    "tests/test_mezo.py",
    "tests/test_families.py",
    "tests/test_upstream_exported.py",
]
PYPI_JSON = "https://pypi.org/pypi/sglang/json"


def test_level(release: Release, overlay: Overlay) -> str:
    """full on the default release, release on the other CPU releases, compile elsewhere."""
    if not release.cpu:
        return COMPILE
    return FULL if release.version == overlay.default else RELEASE


test_level.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported by one


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


def fork_site(version: str, dest: Path, python: Path, overlay: Overlay, cache: Cache) -> Path:
    """The fork as users get it: ``pip wheel --no-deps`` of this repository for ``version``
    (the build backend, offline from the cached upstream wheel), installed with ``--no-deps --target``."""
    env = {**os.environ, "SGLANG_OVERLAY_BUILD_RELEASE": version, "SGLANG_OVERLAY_UPSTREAM": str(cache.wheel(version))}
    log(f"building the fork wheel of sglang {version} (pip wheel --no-deps .)")
    run(
        [
            str(python),
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dest / "dist"),
            str(overlay.root),
        ],
        env=env,
        capture=False,
    )
    (wheel,) = (dest / "dist").glob("sglang-*.whl")
    run(
        [str(python), "-m", "pip", "install", "--no-deps", "-q", "--target", str(dest / "site"), str(wheel)],
        capture=False,
    )
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


def default_jobs() -> int:
    """Rows at a time: 2 where the machine has 2 CPUs or more (a row's pytest is mostly one busy process)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def matrix(
    versions: Sequence[str],
    overlay: Overlay,
    cache: Cache,
    venvs: Path,
    pytest_args: Sequence[str],
    level: Optional[str] = None,
    jobs: int = 1,
) -> int:
    """Per release: fetch, apply, byte-compile, then its tests (see ``test_level``); prints a table.

    ``jobs`` rows run at a time, the full row first (the longest); with more than one, each row's test
    output is kept and printed whole when the row ends, and each pytest gets its share of the CPUs
    (``OMP_NUM_THREADS``, unless set)."""
    if jobs < 1:
        raise OverlayError(f"--jobs must be at least 1, got {jobs}")
    releases = [overlay.release(v) for v in versions]
    levels = {}
    for release in releases:
        lvl = test_level(release, overlay)
        levels[release.version] = level if level is not None and lvl != COMPILE else lvl
    ordered = sorted(versions, key=lambda v: (levels[v] != FULL, overlay.release(v).transformers, version_key(v)))
    envs: dict[str, Path] = {}
    envs_lock = threading.Lock()
    print_lock = threading.Lock()
    threads = None if jobs == 1 or "OMP_NUM_THREADS" in os.environ else str(max(1, (os.cpu_count() or 1) // jobs))

    def deps_env(release: Release) -> Path:
        with envs_lock:
            if release.transformers not in envs:
                envs[release.transformers] = make_deps_env(release.transformers, overlay, venvs)
            return envs[release.transformers]

    def run_row(version: str) -> dict:
        release = overlay.release(version)
        lvl = levels[version]
        row = {
            "release": version,
            "variant": release.variant,
            "level": lvl,
            "apply": "-",
            "compile": "-",
            "tests": "-",
            "seconds": 0.0,
        }
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
                    python = deps_env(release)
                    selection = RELEASE_TESTS if lvl == RELEASE else []
                    if lvl == FULL:
                        path = fork_site(version, Path(tmp) / "fork", python, overlay, cache)
                    log(f"== {lvl} tests against sglang {version} from {path}")
                    # The base venv's console scripts (git-filter-repo for export-pr) come after the layer's.
                    bins = [str(python.parent), str(make_base_env(overlay, venvs).parent), os.environ.get("PATH", "")]
                    env = {
                        **os.environ,
                        "SGLANG_OVERLAY_RELEASE": version,
                        "PATH": os.pathsep.join(bins),
                        "PYTHONPATH": os.pathsep.join([str(path), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    }
                    if threads:
                        env["OMP_NUM_THREADS"] = threads
                    command = [str(python), "-m", "pytest", *pytest_args, *selection]
                    if jobs == 1:
                        returncode = subprocess.run(command, cwd=overlay.root, env=env).returncode
                    else:  # the row's output in one piece, when it ends
                        proc = subprocess.run(
                            command, cwd=overlay.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                        )
                        returncode = proc.returncode
                        with print_lock:
                            print(f"== {lvl} tests against sglang {version}: output", flush=True)
                            sys.stdout.write(proc.stdout.decode(errors="replace"))
                            sys.stdout.flush()
                    row["tests"] = "ok" if returncode == 0 else f"FAILED (pytest exit {returncode})"
        except OverlayError as exc:
            log(f"sglang {version}: {exc}")
            for key in ("apply", "compile", "tests"):
                if row[key] == "-":
                    row[key] = "FAILED"
                    break
        row["seconds"] = time.monotonic() - started
        return row

    rows, started = [], time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_row, version) for version in ordered]
        for future in as_completed(futures):
            rows.append(future.result())
            with print_lock:
                print(format_progress(len(rows), len(ordered), rows[-1]), flush=True)
    order = {r.version: i for i, r in enumerate(releases)}
    rows.sort(key=lambda r: order[r["release"]])
    print(format_table(rows))
    total = sum(r["seconds"] for r in rows)
    print(
        f"{len(rows)} release(s) in {(time.monotonic() - started) / 60:.1f} min ({total / 60:.1f} min of rows, "
        f"{jobs} at a time; "
        f"{sum(r['level'] == FULL for r in rows)} full, {sum(r['level'] == RELEASE for r in rows)} release, "
        f"{sum(r['level'] == COMPILE for r in rows)} apply+compile only)"
    )
    return 0 if all(r[k] == "ok" or r[k].startswith("n/a") for r in rows for k in ("apply", "compile", "tests")) else 1


def format_progress(k: int, n: int, row: dict) -> str:
    """The line printed when a row finishes: ``[3/52] 0.5.17 ok 81 s``, or the step that failed
    (``[4/52] 0.5.18 tests FAILED (pytest exit 1) 95 s``)."""
    failed = next(
        (
            f"{key} {row[key]}"
            for key in ("apply", "compile", "tests")
            if not (row[key] == "ok" or row[key].startswith("n/a"))
        ),
        None,
    )
    result = failed or ("ok (apply+compile only)" if row["level"] == COMPILE else "ok")
    return f"[{k}/{n}] {row['release']} {result} {row['seconds']:.0f} s"


def format_table(rows: list[dict]) -> str:
    header = ["release", "variant", "level", "apply", "compile", "tests", "seconds"]
    cells = [[str(r.get(h, "")) if h != "seconds" else f"{r[h]:.0f}" for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    fmt = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)])
