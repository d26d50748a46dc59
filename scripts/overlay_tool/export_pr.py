"""``overlay.py export-pr UPSTREAM --base vX --branch NAME``: the upstream layer as a PR branch.

The branch starts at tag vX of the SGLang checkout UPSTREAM and holds one commit
per logical change (export_changes.CHANGES): the change's new files, taken from
this repository's history with git-filter-repo (their paths already match
upstream's), together with the hook patches of vX's variant that wire them into
upstream files. Only the upstream layer ships: the fork layer (python/sglang/overlay/)
and the overlay's tests never do (export_changes says why). When a change's files
have several commits in the overlay history they are squashed into one commit:
its author is the author of the earliest of them (with that commit's date), the
message lists every original commit (short hash, subject, author) and carries a
``Co-authored-by:`` trailer for each other author, patch authors included.

The branch is built in a temporary worktree; UPSTREAM's own checkout is never
touched. Every commit is checked (its diff applies to its parent, its Python
files byte-compile; whether it also applies to vX alone is reported), the branch
is checked to ship no fork-layer file and no reference to ``sglang.overlay``,
and, with --run-tests / --test-python, the overlay's tests of the exported changes
run against the tip's python/ tree with the fork layer added. Only then is the
branch ref written. Nothing is pushed: the push and ``gh pr create`` commands are printed.

Needs git-filter-repo (``pip install git-filter-repo``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .cache import Cache
from .envs import make_venv
from .errors import OverlayError, UnsupportedRelease
from .export_changes import (CHANGES, FORK_LAYER, PR_TITLE_PARTS, TESTS_NOT_EXPORTED, TIP_TESTS, UPSTREAM_REPO,
                             Change, exported_files, fork_layer_leaks, is_fork_layer)
from .gitutil import git, git_ok, run
from .releases import Overlay, Release


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("upstream", type=Path, help="an SGLang git checkout (clean, with tag vX)")
    parser.add_argument("--base", required=True, help="release tag to start from, e.g. v0.5.23")
    parser.add_argument("--branch", required=True, help="name of the branch to create")
    parser.add_argument("--force", action="store_true", help="replace an existing branch of that name")
    parser.add_argument("--source-repo", type=Path, default=None,
                        help="the sglang-overlay git repository to take history from (default: this one)")
    tests = parser.add_mutually_exclusive_group()
    tests.add_argument("--run-tests", action="store_true",
                       help=f"run the overlay's tests of the exported changes ({', '.join(TIP_TESTS)}) against "
                            "the tip's python/ tree plus the fork layer, in release X's CPU venv (built when missing)")
    tests.add_argument("--test-python", type=Path, default=None,
                       help="run those tests at the tip with this python instead")


def export_pr_from_args(args: argparse.Namespace, overlay: Overlay, cache: Cache) -> str:
    return export_pr(args.upstream, args.base, args.branch, force=args.force, overlay=overlay, cache=cache,
                     source_repo=args.source_repo or overlay.root, run_tests=args.run_tests,
                     test_python=args.test_python)


@dataclass
class PatchInfo:
    path: Path
    author: tuple[str, str]
    subject: str
    body: str
    paths: list[str]


@dataclass
class Planned:
    change: Change
    files: list[str] = field(default_factory=list)  # upstream paths, from the filtered history
    patches: list[PatchInfo] = field(default_factory=list)


@dataclass
class Made:
    sha: str
    title: str
    author: str
    files: list[str]


def export_pr(upstream: Path, base: str, branch: str, *, force: bool, overlay: Overlay, cache: Cache,
              source_repo: Path, run_tests: bool = False, test_python: Optional[Path] = None) -> str:
    """Create ``branch`` in ``upstream`` at tag ``base``; returns the summary + push and PR commands."""
    upstream = upstream.resolve()
    source_repo = source_repo.resolve()
    release = _release_of(base, overlay)
    if run_tests and not test_python:
        overlay.cpu_release(release.version, "export-pr --run-tests")  # refuse before any work
    tag = f"v{release.version}"
    _check_upstream(upstream, tag, branch, force)
    filter_repo = require_filter_repo()
    _check_source(source_repo)
    _check_identity(upstream)
    base_rev = git("rev-parse", f"refs/tags/{tag}^{{commit}}", cwd=upstream).strip()

    with tempfile.TemporaryDirectory(prefix="sglang-overlay-export-") as tmp_name:
        tmp = Path(tmp_name)
        filtered, commit_map = _filtered_history(source_repo, tmp, filter_repo)
        plan = _plan(filtered, overlay.patches(release), tmp)
        work = tmp / "worktree"
        git("worktree", "add", "-q", "--detach", str(work), base_rev, cwd=upstream)
        try:
            made = _build(work, filtered, commit_map, plan, tmp)
            if not made:
                raise OverlayError(f"nothing to export: the overlay adds nothing to sglang {release.version}")
            independent = _verify(work, base_rev, made, tmp)
            _check_upstream_layer(work, base_rev)
            tests_line = "not run (pass --run-tests, or --test-python PY)"
            if run_tests or test_python:
                python = test_python or make_venv(release.version, cache.root / "venvs" / release.version,
                                                  overlay, cache)
                tests_line = _run_tip_tests(work, Path(python), source_repo, release)
            git("branch", "-f", branch, "HEAD", cwd=work)
        finally:
            git("worktree", "remove", "--force", str(work), cwd=upstream, check=False)
            git("worktree", "prune", cwd=upstream, check=False)

    return _report(upstream, tag, branch, made, independent, tests_line)


def _release_of(base: str, overlay: Overlay) -> Release:
    m = re.fullmatch(r"v(\d[\w.+-]*)", base)
    if not m:
        raise UnsupportedRelease(
            f"--base {base!r} is not a release tag vX; supported: "
            + ", ".join(f"v{v}" for v in overlay.versions()))
    return overlay.release(m.group(1))


def _check_upstream(upstream: Path, tag: str, branch: str, force: bool) -> None:
    top = run(["git", "rev-parse", "--show-toplevel"], cwd=upstream if upstream.is_dir() else None, check=False)
    if not upstream.is_dir() or top.returncode != 0 or Path(top.stdout.strip()).resolve() != upstream:
        raise OverlayError(f"{upstream} is not the top of a git checkout of SGLang; clone "
                           f"https://github.com/{UPSTREAM_REPO} and point at it")
    dirty = git("status", "--porcelain", cwd=upstream).strip()
    if dirty:
        raise OverlayError(f"{upstream} has uncommitted changes or untracked files; commit or stash them first:\n"
                           + "\n".join("  " + line for line in dirty.splitlines()[:20]))
    if not git_ok("rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}", cwd=upstream):
        raise OverlayError(f"{upstream} has no tag {tag}: `git -C {upstream} fetch "
                           f"https://github.com/{UPSTREAM_REPO} tag {tag}` first")
    if not git_ok("check-ref-format", "--branch", branch, cwd=upstream):
        raise OverlayError(f"{branch!r} is not a valid branch name")
    if git_ok("show-ref", "--verify", "-q", f"refs/heads/{branch}", cwd=upstream):
        if not force:
            raise OverlayError(f"branch {branch} already exists in {upstream}; pass --force to replace it, "
                               "or choose another --branch")
        current = run(["git", "symbolic-ref", "-q", "--short", "HEAD"], cwd=upstream, check=False).stdout.strip()
        if current == branch:
            raise OverlayError(f"branch {branch} is checked out in {upstream}; check out another branch before "
                               "replacing it with --force")


def require_filter_repo() -> str:
    """The git-filter-repo executable (on PATH or beside this python), or an OverlayError."""
    exe = shutil.which("git-filter-repo", path=os.pathsep.join([os.environ.get("PATH", ""),
                                                              str(Path(sys.executable).parent)]))
    if exe and run([exe, "--version"], check=False).returncode == 0:
        return exe
    raise OverlayError("export-pr needs git-filter-repo, which is not installed (or does not run): "
                       "`python3 -m pip install git-filter-repo` (it must end up on PATH), then run again")


def _check_source(source_repo: Path) -> None:
    if not git_ok("rev-parse", "--verify", "-q", "HEAD", cwd=source_repo if source_repo.is_dir() else None):
        raise OverlayError(f"{source_repo} is not a git repository with commits (the overlay's history "
                           "comes from there; pass --source-repo)")
    dirty = git("status", "--porcelain", "--", "python/sglang", "tests", "patches", cwd=source_repo).strip()
    if dirty:
        raise OverlayError(f"{source_repo} has uncommitted changes to the overlay (exported from its history, so "
                           "they would be left out); commit them first:\n"
                           + "\n".join("  " + line for line in dirty.splitlines()[:20]))


def _check_identity(upstream: Path) -> None:
    if not git_ok("var", "GIT_COMMITTER_IDENT", cwd=upstream):
        raise OverlayError(f"git has no committer identity in {upstream}: set user.name and user.email "
                           "(`git config --global user.name ...`), then run again")


def _filtered_history(source_repo: Path, tmp: Path, filter_repo: str) -> tuple[Path, dict[str, str]]:
    """A clone of ``source_repo`` rewritten to hold the upstream layer's files only (same paths)."""
    keep = exported_files(git("ls-tree", "-r", "--name-only", "HEAD", "--", "python/sglang",
                              cwd=source_repo).splitlines())
    clone = tmp / "filtered"
    git("clone", "-q", "--no-local", str(source_repo), str(clone), cwd=tmp)
    if not keep:
        return clone, {}
    paths = tmp / "paths.txt"
    paths.write_text("".join(f"{p}\n" for p in keep))
    run([filter_repo, "--force", "--quiet", "--paths-from-file", str(paths)], cwd=clone)
    commit_map = {}
    map_file = clone / ".git" / "filter-repo" / "commit-map"
    for line in map_file.read_text().splitlines()[1:]:
        old, new = line.split()
        if set(new) != {"0"}:
            commit_map[new] = old
    return clone, commit_map


def _parse_patch(patch: Path, tmp: Path) -> PatchInfo:
    msg, diff = tmp / "mailinfo.msg", tmp / "mailinfo.diff"
    with open(patch, "rb") as f:
        proc = subprocess.run(["git", "mailinfo", "-k", str(msg), str(diff)], stdin=f, capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise OverlayError(f"{patch} is not a git format-patch file: {proc.stderr.strip()}")
    info = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    body = "\n".join(line for line in msg.read_text().splitlines()
                     if not line.startswith("Upstream-Status:")).strip()
    paths = sorted(set(re.findall(r"^diff --git a/(\S+) b/", diff.read_text(), re.M)))
    return PatchInfo(patch, (info.get("Author", ""), info.get("Email", "")), info.get("Subject", patch.stem),
                     body, paths)


def _plan(filtered: Path, patches: list[Path], tmp: Path) -> list[Planned]:
    planned = [Planned(c) for c in CHANGES]
    has_head = git_ok("rev-parse", "-q", "--verify", "HEAD", cwd=filtered)
    files = git("ls-tree", "-r", "--name-only", "HEAD", cwd=filtered).splitlines() if has_head else []
    stray = []
    for rel in files:
        owner = next((p for p in planned if rel.startswith(p.change.files)), None)
        if owner is None:
            stray.append(rel)
        else:
            owner.files.append(rel)
    if stray:
        raise OverlayError("these overlay files belong to no logical change of the PR:\n  " + "\n  ".join(stray)
                           + "\nAdd their path to a change in CHANGES in scripts/overlay_tool/export_changes.py "
                           "(or to FORK_LAYER if they are the fork's, never exported)")
    extra: list[Planned] = []
    for patch in patches:
        info = _parse_patch(patch, tmp)
        owner = next((p for p in planned if any(re.search(rf"\b{re.escape(w)}\b", info.subject, re.I)
                                                for w in p.change.keywords)), None)
        owner = owner or next((p for p in planned if any(path.startswith(p.change.hooks) for path in info.paths)),
                              None)
        if owner is None:
            extra.append(Planned(Change(f"patch-{patch.stem}", info.subject, "", ()), patches=[info]))
        else:
            owner.patches.append(info)
    return planned + extra


def _history(filtered: Path, files: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(filtered sha, author name, author email, author date, subject), oldest first."""
    if not files:
        return []
    out = git("log", "--reverse", "--format=%H%x00%an%x00%ae%x00%aI%x00%s", "HEAD", "--", *files, cwd=filtered)
    return [tuple(line.split("\0")) for line in out.splitlines() if line]  # type: ignore[misc]


def _build(work: Path, filtered: Path, commit_map: dict[str, str], plan: list[Planned], tmp: Path) -> list[Made]:
    made = []
    for item in plan:
        if not item.files and not item.patches:
            continue
        for info in item.patches:
            proc = run(["git", "apply", "--index", "--whitespace=nowarn", str(info.path)], cwd=work, check=False)
            if proc.returncode != 0:
                raise OverlayError(f"{info.path.name} does not apply on top of the previous commits of the PR "
                                   f"({item.change.title}):\n{proc.stderr.strip()}\nNo branch was written.")
        for rel in item.files:
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(filtered / rel, target)
            git("add", "--", rel, cwd=work)
        if git_ok("diff", "--cached", "--quiet", cwd=work):
            continue  # already upstream's bytes
        message, author, date = _message(item, _history(filtered, item.files), commit_map)
        msg_file = tmp / "message.txt"
        msg_file.write_text(message)
        env = {"GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1]}
        if date:
            env["GIT_AUTHOR_DATE"] = date
        git("commit", "-q", "--no-verify", "-F", str(msg_file), cwd=work, env=env)
        sha = git("rev-parse", "HEAD", cwd=work).strip()
        made.append(Made(sha, message.splitlines()[0], f"{author[0]} <{author[1]}>",
                         git("diff", "--name-only", f"{sha}^", sha, cwd=work).split()))
    return made


def _message(item: Planned, history: list, commit_map: dict[str, str]) -> tuple[str, tuple[str, str], str]:
    authors: list[tuple[str, str]] = [(h[1], h[2]) for h in history] + [p.author for p in item.patches]
    author = authors[0]
    date = history[0][3] if history else ""
    change = item.change
    if change.key.startswith("patch-") and len(item.patches) == 1 and not item.files:
        parts = [item.patches[0].subject, item.patches[0].body]
    else:
        parts = [change.title, change.description]
        for info in item.patches:
            parts.append(f"Hook into upstream ({info.subject}):\n"
                         + "\n".join(f"  {path}" for path in info.paths)
                         + (f"\n\n{info.body}" if info.body else ""))
        if history:
            lines = [f"  {commit_map.get(h[0], h[0])[:12]} {h[4]} ({h[1]})" for h in history]
            parts.append("Squashed from the sglang-overlay history of these files:\n" + "\n".join(lines))
    coauthors = []
    for a in authors:
        if a != author and a not in coauthors:
            coauthors.append(a)
    if coauthors:
        parts.append("\n".join(f"Co-authored-by: {n} <{e}>" for n, e in coauthors))
    return "\n\n".join(p.strip() for p in parts if p.strip()) + "\n", author, date


def _verify(work: Path, base_rev: str, made: list[Made], tmp: Path) -> dict[str, bool]:
    """Each commit's diff applies to its parent and its Python files byte-compile.

    Returns, per commit, whether it also applies to the base alone."""
    independent = {}
    for commit in made:
        diff = tmp / "commit.diff"
        diff.write_bytes(subprocess.run(["git", "diff", "--binary", f"{commit.sha}^", commit.sha], cwd=work,
                                        capture_output=True, check=True).stdout)
        for onto, required in ((f"{commit.sha}^", True), (base_rev, False)):
            env = {"GIT_INDEX_FILE": str(tmp / "check.index")}
            git("read-tree", onto, cwd=work, env=env)
            ok = run(["git", "apply", "--cached", "--check", str(diff)], cwd=work, env=env, check=False)
            if required and ok.returncode != 0:
                raise OverlayError(f"commit {commit.sha[:12]} ({commit.title}) does not apply to its parent:\n"
                                   f"{ok.stderr.strip()}")
            if not required:
                independent[commit.sha] = ok.returncode == 0
        for rel in commit.files:
            if not rel.endswith(".py"):
                continue
            blob = subprocess.run(["git", "show", f"{commit.sha}:{rel}"], cwd=work, capture_output=True)
            if blob.returncode != 0:
                continue  # deleted in this commit
            try:
                compile(blob.stdout, rel, "exec", dont_inherit=True)
            except SyntaxError as exc:
                raise OverlayError(f"{rel} does not compile at commit {commit.sha[:12]} ({commit.title}): "
                                   f"{exc}") from None
    return independent


def _check_upstream_layer(work: Path, base_rev: str) -> None:
    """The branch ships no fork-layer file and adds no line that refers to ``sglang.overlay``."""
    changes = []
    for rel in git("diff", "--name-only", base_rev, "HEAD", cwd=work).split():
        diff = git("diff", "-U0", base_rev, "HEAD", "--", rel, cwd=work)
        added = "\n".join(line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
        changes.append((rel, added))
    problems = fork_layer_leaks(changes)
    if problems:
        raise OverlayError("the branch would ship fork-layer code (python/sglang/overlay/ stays in the fork); "
                           "no branch was written:\n  " + "\n  ".join(problems)
                           + "\nMove the code into the upstream layer without the reference, or keep it in the fork.")


def _run_tip_tests(work: Path, python: Path, source_repo: Path, release: Release) -> str:
    """The overlay's tests of the exported changes against the tip's python/ tree + the fork layer."""
    tests = [t for t in TIP_TESTS if (source_repo / t).is_file()]
    if not tests:
        return f"none to run ({', '.join(TIP_TESTS)} are not in {source_repo})"
    fork = [rel for rel in git("ls-files", "--", *FORK_LAYER, cwd=source_repo).splitlines() if is_fork_layer(rel)]
    for rel in fork:  # untracked in the temporary worktree: the branch's commits do not change
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_repo / rel, work / rel)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(work / "python"),
                                                                      os.environ.get("PYTHONPATH")])),
           "SGLANG_OVERLAY_RELEASE": release.version, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=source_repo,
                          env=env, capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
    if proc.returncode != 0:
        raise OverlayError(f"the overlay's tests fail at the tip ({python} -m pytest {' '.join(tests)}, the tip's "
                           f"python/ with the fork layer added); no branch was written:\n{tail}")
    return (f"{' '.join(tests)} passed at the tip with the fork layer added ({python}): "
            f"{tail.splitlines()[-1] if tail else ''}")


def _report(upstream: Path, tag: str, branch: str, made: list[Made], independent: dict[str, bool],
            tests_line: str) -> str:
    common = Path(git("rev-parse", "--git-common-dir", cwd=upstream).strip())
    common = common if common.is_absolute() else upstream / common
    body_file = common / f"sglang-overlay-pr-{re.sub(r'[^A-Za-z0-9._-]+', '-', branch)}.md"
    by_title = {c.title: c for c in CHANGES}
    title = ", ".join(PR_TITLE_PARTS.get(by_title[m.title].key, m.title) if m.title in by_title else m.title
                      for m in made)
    title = title[:1].upper() + title[1:]
    body = [f"Based on `{tag}`. One commit per logical change; each applies on its parent and byte-compiles.",
            "", "## Commits", ""]
    for m in made:
        msg = git("log", "-1", "--format=%B", m.sha, cwd=upstream).strip()
        body += [f"### {m.title}", "", msg.split("\n", 1)[1].strip() if "\n" in msg else "", ""]
    body += ["## Tests", "", f"This PR adds no tests yet: {TESTS_NOT_EXPORTED}.",
             f"The overlay's tests of these changes ({', '.join(TIP_TESTS)}): {tests_line}.", ""]
    body_file.write_text("\n".join(body))
    lines = [f"Branch {branch} in {upstream}: {len(made)} commit(s) on {tag}"]
    for m in made:
        alone = "yes" if independent.get(m.sha) else "no (needs the commits before it)"
        lines.append(f"  {m.sha[:12]} {m.title}\n      author {m.author}; {len(m.files)} file(s); "
                     f"applies to {tag} alone: {alone}")
    lines += [
        "Checks: every commit applies to its parent (git apply --check) and its Python files byte-compile; "
        "no file of the fork layer (python/sglang/overlay/) and no reference to sglang.overlay is exported.",
        f"Tests: {TESTS_NOT_EXPORTED}.",
        f"Overlay tests at the tip ({', '.join(TIP_TESTS)}): {tests_line}",
        f"PR description: {body_file}",
        "",
        "Nothing was pushed. To open the PR:",
        f"  git -C {upstream} push <your-fork-remote> {branch}",
        f"  gh pr create --repo {UPSTREAM_REPO} --base main --head <your-github-user>:{branch} "
        f"--title {_shell_quote(title)} --body-file {body_file}",
        f"The branch starts at {tag}; if upstream main has moved, rebase first: "
        f"`git -C {upstream} rebase --onto origin/main {tag} {branch}`.",
    ]
    return "\n".join(lines)


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
