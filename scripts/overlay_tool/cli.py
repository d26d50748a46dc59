"""sglang-overlay: keep a small patch set and new files on top of upstream SGLang releases.

Verbs (``python scripts/overlay.py VERB --help`` for each):
  releases            the supported releases and their patch variant
  fetch X             release X's upstream tree into the cache; prints its path
  apply TARGET        apply the overlay to an upstream checkout or an installed sglang
  revert TARGET       restore the exact upstream bytes
  status TARGET       applied, not applied, or partly applied
  checkout X DIR      a patched upstream git checkout to edit patches in
  refresh CHECKOUT    regenerate patches/<variant>/ from a patched checkout
  check [X ...]       fail when patches/ is stale or does not apply (default: every release)
  venv X DIR          a CPU virtual environment with release X, patched
  demo [X]            run the demo (native OPT vs HuggingFace) in matrix's shared venvs
  matrix [X ...]      fetch, apply, byte-compile and test each release (--newest: PyPI's newest)
  export-pr UPSTREAM  one upstream PR branch per change from tag vX; --check runs upstream's own checks
  lint [--fix]        ruff over the project's own code (pyproject.toml's [tool.ruff])

Each verb is a small class registered with ``@verb`` below: its arguments and its ``run``.
Everything the tool knows about releases comes from patches/releases.toml.
Exit status: 0 success, 1 failure (the message says what to do), 2 unsupported release
(also: venv / demo of a release that does not run on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

from . import export_pr
from .apply import apply, revert, status
from .cache import Cache
from .envs import make_venv, run_demo
from .errors import OverlayError
from .gitutil import log
from .lint import lint
from .matrix import FULL, RELEASE, default_jobs, matrix, newest_release, require_newest_supported, test_level
from .patches import check, checkout, export_patches
from .releases import REPO, Overlay


@dataclass
class Context:
    """What every verb runs against: the overlay, the release cache, where the shared venvs live."""

    overlay: Overlay
    cache: Cache
    venvs: Path


class Verb:
    """One verb of the command line: ``name``, its one-line ``help``, its arguments, and ``run``
    (returns the exit status)."""

    name: ClassVar[str]
    help: ClassVar[str]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        raise NotImplementedError


VERBS: dict[str, Verb] = {}


def verb(cls: type[Verb]) -> type[Verb]:
    """Register a verb (in the order of the command line's help)."""
    VERBS[cls.name] = cls()
    return cls


def _say_what_fetching_costs(versions: Sequence[str], cache: Cache, verb: str) -> None:
    """Before a verb fetches many releases (``check``, ``matrix --all`` on a cold cache): how many, how much."""
    notice = cache.fetch_notice(versions, verb)
    if notice:
        log(notice)


def _venvs_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--venvs", type=Path, help=f"where the shared {what} live (default: CACHE/venvs)")


@verb
class Releases(Verb):
    name, help = "releases", "list the supported releases and their patch variant"

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        overlay = ctx.overlay
        for version in overlay.versions():
            r = overlay.releases[version]
            cpu = f"CPU tests: {test_level(r, overlay)}" if r.cpu else f"apply+compile only ({r.cpu_note})"
            default = " (default)" if version == overlay.default else ""
            print(f"{version:12} variant {r.variant:16} transformers {r.transformers:8} {cpu}{default}")
        return 0


@verb
class Fetch(Verb):
    name, help = "fetch", "fetch release X into the cache; print its upstream tree"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("version")

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        ctx.overlay.release(args.version)
        print(ctx.cache.release_tree(args.version) / "python" / "sglang")
        return 0


class _TargetVerb(Verb):
    """A verb on TARGET, an upstream checkout or an installed sglang package directory."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("target", type=Path)


@verb
class Apply(_TargetVerb):
    name, help = "apply", "apply the overlay (TARGET: upstream checkout or installed sglang package dir)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--check", action="store_true", help="verify only; write nothing")

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        print(apply(args.target, ctx.overlay, ctx.cache, check_only=args.check))
        return 0


@verb
class Revert(_TargetVerb):
    name, help = "revert", "restore upstream's bytes (TARGET: upstream checkout or installed sglang package dir)"

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        print(revert(args.target, ctx.overlay, ctx.cache))
        return 0


@verb
class Status(_TargetVerb):
    name, help = "status", "applied, not applied or partly applied (TARGET: upstream checkout or sglang dir)"

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        print(status(args.target, ctx.overlay, ctx.cache)[1])
        return 0


@verb
class Checkout(Verb):
    name, help = "checkout", "a patched upstream git checkout of X in DIR (one commit per patch)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("version")
        parser.add_argument("dest", type=Path)

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        print(checkout(args.version, args.dest.resolve(), ctx.overlay, ctx.cache))
        return 0


@verb
class Refresh(Verb):
    name, help = "refresh", "regenerate patches/<variant>/ from a patched upstream git checkout"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkout", type=Path)

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        for path in export_patches(args.checkout.resolve(), ctx.overlay):
            print(path.relative_to(ctx.overlay.root))
        return 0


@verb
class Check(Verb):
    name, help = "check", "fail when patches/ is stale or does not apply"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("versions", nargs="*", help="releases (default: every supported release)")

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        versions = args.versions or ctx.overlay.versions()
        for version in versions:
            ctx.overlay.release(version)
        _say_what_fetching_costs(versions, ctx.cache, self.name)
        problems = check(versions, ctx.overlay, ctx.cache)
        for problem in problems:
            print(problem)
        if problems:
            return 1
        print("patches are up to date and apply cleanly")
        return 0


@verb
class Venv(Verb):
    name, help = "venv", "a CPU venv in DIR with release X patched; prints its python"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("version")
        parser.add_argument("dest", type=Path)

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        print(make_venv(args.version, args.dest.resolve(), ctx.overlay, ctx.cache))
        return 0


@verb
class Demo(Verb):
    name, help = "demo", "run the demo (native OPT vs HuggingFace) on X, in matrix's shared venvs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("version", nargs="?")
        _venvs_argument(parser, "venvs, as for matrix,")
        parser.add_argument(
            "--verbose",
            action="store_true",
            help="show every upstream message (default: drop those sglang.overlay.quiet.NOISE lists)",
        )

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        return run_demo(args.version or ctx.overlay.default, ctx.overlay, ctx.cache, ctx.venvs, verbose=args.verbose)


@verb
class ExportPr(Verb):
    name, help = "export-pr", "upstream PR branches in UPSTREAM from tag vX, one per change (nothing is pushed)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        export_pr.add_arguments(parser)

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        print(export_pr.export_pr_from_args(args, ctx.overlay, ctx.cache))
        return 0


@verb
class Matrix(Verb):
    name, help = "matrix", "for each release: fetch, apply, byte-compile, run the CPU tests"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("versions", nargs="*", help="releases (default: every supported release)")
        parser.add_argument("--all", action="store_true", help="every supported release (the default without versions)")
        parser.add_argument(
            "--newest",
            action="store_true",
            help="ask PyPI for the newest sglang release; fail unless it is supported; test it "
            "(with versions or --all: check, then test those)",
        )
        parser.add_argument(
            "--level",
            choices=[FULL, RELEASE],
            help="run this test level on every CPU-capable release (default: full on the default "
            "release, release elsewhere)",
        )
        _venvs_argument(parser, "test venvs")
        parser.add_argument("--pytest-args", default="-q", help="arguments for pytest (one string)")
        parser.add_argument(
            "--jobs",
            type=int,
            default=default_jobs(),
            help="rows at a time (default: 2 on a machine with 2 CPUs or more, else 1); with more than one, "
            "a row's test output is printed whole when the row ends",
        )

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        versions = list(args.versions)
        if args.newest:
            newest = require_newest_supported(ctx.overlay, newest_release())
            log(f"sglang {newest}, the newest release on PyPI, is supported")
            if not versions and not args.all:
                versions = [newest]
        versions = versions or ctx.overlay.versions()
        for version in versions:
            ctx.overlay.release(version)
        _say_what_fetching_costs(versions, ctx.cache, self.name)
        return matrix(
            versions, ctx.overlay, ctx.cache, ctx.venvs, args.pytest_args.split(), level=args.level, jobs=args.jobs
        )


@verb
class Lint(Verb):
    name, help = "lint", "ruff over the project's own code (pyproject.toml's [tool.ruff]; CI's full row runs it)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fix", action="store_true", help="apply ruff's safe fixes and format first")
        _venvs_argument(parser, "venvs (the linter's among them)")

    def run(self, args: argparse.Namespace, ctx: Context) -> int:
        problems = lint(ctx.overlay, ctx.venvs, fix=args.fix)
        for problem in problems:
            print(problem)
        if problems:
            return 1
        print("the project's own code is lint-clean and formatted")
        return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="overlay.py", description=__doc__.split("\n\n")[0])
    top.add_argument("--overlay-root", type=Path, default=REPO, help=argparse.SUPPRESS)
    sub = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, command in VERBS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
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
        cache = Cache()
        venvs = (getattr(args, "venvs", None) or cache.root / "venvs").resolve()
        return VERBS[args.verb].run(args, Context(Overlay.load(args.overlay_root), cache, venvs))
    except Exception as exc:  # noqa: BLE001 - only the tool's own errors are turned into messages
        if not _is_overlay_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


def _is_overlay_error(exc: BaseException) -> bool:
    """An OverlayError, also one from a second copy of this package (imported under another name)."""
    return isinstance(exc, OverlayError) or any(c.__name__ == "OverlayError" for c in type(exc).__mro__)
