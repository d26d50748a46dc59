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
  demo [X]            run the demo (native OPT vs HuggingFace) in matrix's shared venvs
  matrix [X ...]      fetch, apply, byte-compile and test each release (--newest: PyPI's newest)
  export-pr UPSTREAM  one upstream PR branch per change from tag vX; --check runs upstream's own checks

Everything the tool knows about releases comes from patches/releases.toml.
Exit status: 0 success, 1 failure (the message says what to do), 2 unsupported release
(also: venv / demo of a release that does not run on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import export_pr
from .apply import apply, revert, status
from .cache import Cache
from .envs import make_venv, run_demo
from .errors import OverlayError
from .gitutil import log
from .matrix import FULL, RELEASE, matrix, newest_release, require_newest_supported, test_level
from .patches import check, checkout, export_patches
from .releases import REPO, Overlay


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="overlay.py", description=__doc__.split("\n\n")[0])
    top.add_argument("--overlay-root", type=Path, default=REPO, help=argparse.SUPPRESS)
    sub = top.add_subparsers(dest="verb", required=True, metavar="VERB")
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
    p = sub.add_parser("demo", help="run the demo (native OPT vs HuggingFace) on X, in matrix's shared venvs")
    p.add_argument("version", nargs="?")
    p.add_argument("--venvs", type=Path, help="where the shared venvs live, as for matrix (default: CACHE/venvs)")
    p.add_argument("--verbose", action="store_true",
                   help="show every upstream message (default: drop those sglang.overlay.quiet.NOISE lists)")
    p = sub.add_parser("export-pr", help="upstream PR branches in UPSTREAM from tag vX, one per change (nothing is pushed)")
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
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one verb; returns the exit status. An OverlayError is printed as ``error: ...``.

    A reader that closes stdout early (``overlay.py releases | head -1``) ends the verb quietly,
    exit 1 (Python docs, "Note on SIGPIPE"): no BrokenPipeError traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as exc:  # noqa: BLE001 - only the tool's own errors are turned into messages
        if not _is_overlay_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


def _is_overlay_error(exc: BaseException) -> bool:
    """An OverlayError, also one from a second copy of this package (imported under another name)."""
    return isinstance(exc, OverlayError) or any(c.__name__ == "OverlayError" for c in type(exc).__mro__)


def _run(args: argparse.Namespace) -> int:
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
        return run_demo(args.version or overlay.default, overlay, cache, venvs, verbose=args.verbose)
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
    return 0
