"""``overlay.py export-pr UPSTREAM --base vX``: one upstream PR branch per change (export_changes).

Each branch starts at tag vX of the SGLang checkout UPSTREAM and holds one commit: the change's
files, the hook patches of vX's variant that belong to it, or upstream's own opt.py with the fixes
(export_opt_fixes), plus its upstream-style unit tests. The commit's author is ``--author`` or
UPSTREAM's git identity; its message is upstream's PR template (Motivation / Modifications /
Accuracy Tests / Speed Tests and Profiling / Checklist), with what ``--check`` measured.

With ``--check`` every branch tip passes upstream's own checks first (export_check); when any
fails, no branch is written and the failing checks are printed. ``--onto REF`` also rebases each
branch onto REF (e.g. upstream's main) in a scratch worktree and reports whether it is clean.
The branches are built in temporary worktrees; UPSTREAM's checkout is never touched, nothing is
pushed. ``--make-standin`` creates tag vX when upstream has none (a release newer than every tag
there): the newest tag's repository with python/sglang replaced by the X wheel's sources, which
the output says.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from .cache import Cache
from .errors import OverlayError, UnsupportedRelease
from .export_body import Built, pr_message
from .export_changes import CHANGES, TESTS_DIR, UPSTREAM_REPO, Change, exported_test_text, fork_layer_leaks
from .export_check import make_lint_env, make_test_env, run_checks, test_environment
from .export_opt_fixes import FIXES, OPT_PATH, STRICT, fixed_opt
from .export_reuse import ENV_DOCS, ENVIRON_PATH, REUSE_PATH, declares_env, docs_with_env_row, exported_reuse
from .gitutil import git, git_ok, run
from .releases import Overlay, Release

TEMPLATE_NOTE = "upstream's .github/pull_request_template.md at the tag, filled in"
TEMPLATE_PATH = ".github/pull_request_template.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("upstream", type=Path, help="an SGLang git checkout (clean, with tag vX)")
    parser.add_argument("--base", required=True, help="release tag to start from, e.g. v0.5.18")
    parser.add_argument("--prefix", default="pr", help="branches are PREFIX/<change> (default: pr)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        choices=[c.key for c in CHANGES],
        help="export only this change (repeatable)",
    )
    parser.add_argument("--author", default=None, help="'Name <email>' (default: UPSTREAM's git identity)")
    parser.add_argument("--force", action="store_true", help="replace existing branches of those names")
    parser.add_argument(
        "--check",
        action="store_true",
        help="run upstream's linters, test collection, the exported tests and upstream's related "
        "CPU unit tests on every branch tip; write no branch when any fails",
    )
    parser.add_argument(
        "--test-python",
        type=Path,
        default=None,
        help="python for the tests of --check (default: a cached CPU venv of release X's pins)",
    )
    parser.add_argument("--onto", default=None, help="also rebase each branch onto this ref (e.g. main) and report")
    parser.add_argument(
        "--make-standin",
        action="store_true",
        help="when UPSTREAM has no tag vX, create it from the newest tag with python/sglang from "
        "the X wheel (a stand-in, said in the output)",
    )
    parser.add_argument(
        "--source-repo",
        type=Path,
        default=None,
        help="the repository to take the upstream layer from (default: this one)",
    )


def export_pr_from_args(args: argparse.Namespace, overlay: Overlay, cache: Cache) -> str:
    return export_pr(
        args.upstream,
        args.base,
        prefix=args.prefix,
        only=args.only,
        author=args.author,
        force=args.force,
        check=args.check,
        test_python=args.test_python,
        onto=args.onto,
        make_standin=args.make_standin,
        overlay=overlay,
        cache=cache,
        source_repo=args.source_repo or overlay.root,
    )


def export_pr(
    upstream: Path,
    base: str,
    *,
    overlay: Overlay,
    cache: Cache,
    source_repo: Path,
    prefix: str = "pr",
    only: Optional[list[str]] = None,
    author: Optional[str] = None,
    force: bool = False,
    check: bool = False,
    test_python: Optional[Path] = None,
    onto: Optional[str] = None,
    make_standin: bool = False,
) -> str:
    upstream, source_repo = upstream.resolve(), source_repo.resolve()
    release = _release_of(base, overlay)
    tag = f"v{release.version}"
    _check_upstream(upstream)
    notes = [_ensure_tag(upstream, release, cache, make_standin)]
    who = _author(upstream, author)
    changes = [c for c in CHANGES if not only or c.key in only]
    patches = overlay.patches(release)
    for change in changes:
        name = f"{prefix}/{change.key}"
        if not git_ok("check-ref-format", "--branch", name, cwd=upstream):
            raise OverlayError(f"{name!r} is not a valid branch name; choose another --prefix")
        if git_ok("show-ref", "--verify", "-q", f"refs/heads/{name}", cwd=upstream) and not force:
            raise OverlayError(f"branch {name} already exists in {upstream}; pass --force to replace it")
    base_rev = git("rev-parse", f"refs/tags/{tag}^{{commit}}", cwd=upstream).strip()
    envs = cache.root / "venvs"
    lint_python = make_lint_env(upstream, envs) if check else None
    tests_python = (test_python or make_test_env(release.transformers, overlay, envs)) if check else None

    built: list[Built] = []
    environment = test_environment(tests_python) if tests_python else ""
    template = git("show", f"{base_rev}:{TEMPLATE_PATH}", cwd=upstream, check=False)
    if not template.strip():
        notes.append(f"{tag} has no {TEMPLATE_PATH}: the PR bodies use its section names only")
    with tempfile.TemporaryDirectory(prefix="sglang-export-") as tmp_name:
        tmp = Path(tmp_name)
        for change in changes:
            start = base_rev
            if change.depends_on:
                below = next((b for b in built if b.change.key == change.depends_on), None)
                if below is None:
                    notes.append(
                        f"{prefix}/{change.key}: skipped: it is stacked on {prefix}/{change.depends_on}, "
                        "which is not exported in this run"
                    )
                    continue
                start = below.sha
            work = tmp / change.key
            git("worktree", "add", "-q", "--detach", str(work), start, cwd=upstream)
            try:
                item, skipped = _build(work, change, patches, source_repo, tag, release.variant, who, tmp)
                if item is None:
                    notes.append(f"{prefix}/{change.key}: skipped: {skipped}")
                    continue
                item.base_sha = start
                if lint_python and tests_python:
                    item.checks = run_checks(work, start, lint_python, tests_python)
                _amend_message(work, change, tag, item, who, template, environment, prefix)
                if onto:
                    item.rebase = _try_rebase(upstream, item.sha, start, onto, tmp / f"{change.key}-rebase")
                built.append(item)
            finally:
                git("worktree", "remove", "--force", str(work), cwd=upstream, check=False)
        git("worktree", "prune", cwd=upstream, check=False)
    if not built:
        raise OverlayError(f"nothing to export onto {tag}")
    failed = [b for b in built if any(not c.ok for c in b.checks)]
    report = _report(upstream, tag, prefix, built, notes, check, onto)
    if failed:
        raise OverlayError(
            report
            + "\n\nNo branch was written: upstream's checks fail on "
            + ", ".join(f"{prefix}/{b.change.key}" for b in failed)
            + ". Fix what the failing checks above say, then run again."
        )
    for b in built:
        git("branch", "-f", f"{prefix}/{b.change.key}", b.sha, cwd=upstream)
        body = upstream / git("rev-parse", "--git-common-dir", cwd=upstream).strip() / f"pr-{b.change.key}.md"
        body.write_text(git("log", "-1", "--format=%b", b.sha, cwd=upstream))
    return report


def _release_of(base: str, overlay: Overlay) -> Release:
    m = re.fullmatch(r"v(\d[\w.+-]*)", base)
    if not m:
        raise UnsupportedRelease(
            f"--base {base!r} is not a release tag vX; supported: " + ", ".join(f"v{v}" for v in overlay.versions())
        )
    return overlay.release(m.group(1))


def _check_upstream(upstream: Path) -> None:
    top = run(["git", "rev-parse", "--show-toplevel"], cwd=upstream if upstream.is_dir() else None, check=False)
    if not upstream.is_dir() or top.returncode != 0 or Path(top.stdout.strip()).resolve() != upstream:
        raise OverlayError(
            f"{upstream} is not the top of a git checkout of SGLang; clone "
            f"https://github.com/{UPSTREAM_REPO} (or a fork with its tags) and point at it"
        )


def _author(upstream: Path, author: Optional[str]) -> tuple[str, str]:
    if author:
        m = re.fullmatch(r"\s*(.+?)\s*<([^<>@\s]+@[^<>\s]+)>\s*", author)
        if not m:
            raise OverlayError(f"--author {author!r} is not 'Name <email>'")
        who = (m.group(1), m.group(2))
    else:
        name = git("config", "user.name", cwd=upstream, check=False).strip()
        email = git("config", "user.email", cwd=upstream, check=False).strip()
        if not name or not email:
            raise OverlayError(
                f"no author: pass --author 'Name <email>' or set user.name and user.email "
                f"in {upstream} (git config user.name ...)"
            )
        who = (name, email)
    if who[1].endswith(".invalid") or "sglang-overlay" in who[1]:
        raise OverlayError(f"author {who[0]} <{who[1]}> is a placeholder; pass your own --author")
    return who


def _ensure_tag(upstream: Path, release: Release, cache: Cache, make_standin: bool) -> str:
    """Tag vX exists (made as a stand-in when asked); says whether its python/sglang is PyPI's."""
    tag = f"v{release.version}"
    tree = cache.release_tree(release.version) / "python" / "sglang"
    if not git_ok("rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}", cwd=upstream):
        if not make_standin:
            raise OverlayError(
                f"{upstream} has no tag {tag}: fetch it (`git -C {upstream} fetch "
                f"https://github.com/{UPSTREAM_REPO} tag {tag}`), or pass --make-standin"
            )
        newest = git("describe", "--tags", "--abbrev=0", "--match", "v[0-9]*", cwd=upstream).strip()
        with tempfile.TemporaryDirectory(prefix="sglang-standin-") as tmp:
            work = Path(tmp) / "w"
            git("worktree", "add", "-q", "--detach", str(work), newest, cwd=upstream)
            try:
                shutil.rmtree(work / "python" / "sglang")
                shutil.copytree(tree, work / "python" / "sglang", ignore=shutil.ignore_patterns("*.so", "_version.py"))
                git("add", "-A", "python/sglang", cwd=work)
                git(
                    "commit",
                    "-q",
                    "--no-verify",
                    "-m",
                    f"Stand-in for {tag}: {newest} with python/sglang from the sglang {release.version} wheel",
                    cwd=work,
                )
                git("tag", tag, "HEAD", cwd=work)
            finally:
                git("worktree", "remove", "--force", str(work), cwd=upstream, check=False)
        return (
            f"{tag} is a STAND-IN made here: {newest}'s repository (tests, CI files, linter pins) with "
            f"python/sglang replaced by the sglang {release.version} wheel's sources"
        )
    same, differ = _compare_tree(upstream, tag, tree)
    if git("log", "-1", "--format=%s", tag, cwd=upstream).startswith("Stand-in for"):
        return f"{tag} is a stand-in made earlier (its commit says from which tag); python/sglang = the wheel's"
    if differ:
        return (
            f"WARNING: python/sglang at {tag} differs from the sglang {release.version} wheel in "
            f"{len(differ)} file(s), e.g. {', '.join(differ[:3])}"
        )
    return f"python/sglang at {tag} is byte-identical to the sglang {release.version} wheel ({same} files)"


def _compare_tree(upstream: Path, tag: str, tree: Path) -> tuple[int, list[str]]:
    listed = {}
    for line in git("ls-tree", "-r", tag, "--", "python/sglang", cwd=upstream).splitlines():
        meta, path = line.split("\t", 1)
        listed[path[len("python/sglang/") :]] = meta.split()[2]
    files = sorted(
        p.relative_to(tree).as_posix()
        for p in tree.rglob("*")
        if p.is_file() and p.suffix != ".so" and p.name != "_version.py" and "__pycache__" not in p.parts
    )
    proc = subprocess.run(
        ["git", "hash-object", "--stdin-paths"],
        cwd=tree,
        input="".join(f"{tree / f}\n" for f in files),
        capture_output=True,
        text=True,
        check=True,
    )
    hashes = proc.stdout.split()
    differ = [f for f, h in zip(files, hashes) if listed.get(f) != h]
    return len(files) - len(differ), differ


def change_patches(change: Change, patches: list[Path]) -> list[Path]:
    """The variant patches that belong to ``change``: a subject word of its ``patch_words`` (self-PP
    patches only to the self-PP change)."""
    chosen = []
    for patch in patches:
        subject = _patch_subject(patch)
        if any(re.search(rf"\b{re.escape(w)}\b", subject, re.I) for w in change.patch_words):
            if change.key != "self-pp-teardown" and re.search(r"\bself-pp\b", subject, re.I):
                continue
            chosen.append(patch)
    return chosen


def _build(
    work: Path,
    change: Change,
    patches: list[Path],
    source: Path,
    tag: str,
    variant: str,
    who: tuple[str, str],
    tmp: Path,
) -> tuple[Optional[Built], str]:
    """The change's commit in ``work``: (the Built item, "") or (None, why nothing of it applies)."""
    notes: list[str] = []
    chosen = change_patches(change, patches)
    for patch in chosen:
        proc = run(["git", "apply", "--index", "--whitespace=nowarn", str(patch)], cwd=work, check=False)
        if proc.returncode != 0:
            raise OverlayError(f"{patch} does not apply to {tag}:\n{proc.stderr.strip()}\nNo branch was written.")
    if change.patch_words and not chosen and not change.files:
        return None, f"the {variant} variant of {tag} has no {change.key} patch (nothing to fix at this tag)"
    for rel in change.files:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        text = (source / rel).read_text()
        if rel == REUSE_PATH:
            environ = work / ENVIRON_PATH
            if not environ.is_file() or not declares_env(environ.read_text()):
                return None, (
                    f"{ENVIRON_PATH} at {tag} does not declare the variable (the {variant} patches add it "
                    "from 0.5.3.post2 on; before that the release has no srt/environ.py)"
                )
            text = exported_reuse(text, rel)
        (work / rel).write_text(text)
        git("add", "--", rel, cwd=work)
    if change.env_docs:
        page = next((p for p in ENV_DOCS if (work / p).is_file()), None)
        updated = docs_with_env_row((work / page).read_text(), page) if page else None
        if updated is None:
            notes.append(
                f"docs: no environment-variables page with a distributed section at {tag} "
                f"({' or '.join(ENV_DOCS)}); the variable's row was not added"
            )
        else:
            (work / page).write_text(updated)
            git("add", "--", page, cwd=work)
    if change.opt:
        path = work / OPT_PATH
        if not path.is_file():
            return None, f"{OPT_PATH} does not exist at {tag} (releases before 0.5.2 have none)"
        path.write_text(fixed_opt(path.read_text(), tag, FIXES if change.opt == "fixes" else STRICT))
        git("add", "--", OPT_PATH, cwd=work)
    if git_ok("diff", "--cached", "--quiet", cwd=work):
        return None, f"nothing of it applies to {tag}"
    for rel in change.tests:
        source_test = source / TESTS_DIR / rel
        if not source_test.is_file():
            raise OverlayError(f"{source_test} is missing: every exported change ships its tests")
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(exported_test_text(source_test.read_text(), variant, rel))
        git("add", "--", rel, cwd=work)
    _check_leaks(work)
    item = Built(change, "", notes=notes)
    _commit(work, f"{change.title}\n\n(the description is written after the checks)\n", who, tmp)
    item.sha = git("rev-parse", "HEAD", cwd=work).strip()
    numstat = git("diff", "--numstat", "HEAD^", "HEAD", cwd=work).splitlines()
    item.files = len(numstat)
    item.added = sum(int(n.split()[0]) for n in numstat)
    item.deleted = sum(int(n.split()[1]) for n in numstat)
    return item, ""


def _patch_subject(patch: Path) -> str:
    m = re.search(r"^Subject: (.*(?:\n [^\n]*)*)", patch.read_text(), re.M)
    return " ".join(m.group(1).split()) if m else patch.stem


def _check_leaks(work: Path) -> None:
    diff = git("diff", "--cached", "-U0", cwd=work)
    changes = []
    for part in re.split(r"^diff --git ", diff, flags=re.M)[1:]:
        path = part.split()[1][2:]
        added = "\n".join(ln[1:] for ln in part.splitlines() if ln.startswith("+") and not ln.startswith("+++"))
        changes.append((path, added))
    problems = fork_layer_leaks(changes)
    if problems:
        raise OverlayError(
            "the branch would ship code of this repository rather than upstream's:\n  "
            + "\n  ".join(problems)
            + "\nRemove the reference from the exported file."
        )


def _commit(work: Path, message: str, who: tuple[str, str], tmp: Path, amend: bool = False) -> None:
    msg = tmp / "message.txt"
    msg.write_text(message)
    env = {
        "GIT_AUTHOR_NAME": who[0],
        "GIT_AUTHOR_EMAIL": who[1],
        "GIT_COMMITTER_NAME": who[0],
        "GIT_COMMITTER_EMAIL": who[1],
    }
    git("commit", "-q", "--no-verify", *(["--amend"] if amend else []), "-F", str(msg), cwd=work, env=env)


def _amend_message(
    work: Path,
    change: Change,
    tag: str,
    item: Built,
    who: tuple[str, str],
    template: str,
    environment: str,
    prefix: str,
) -> None:
    message = pr_message(change, tag, item, template, environment, prefix, work)
    _commit(work, message, who, work.parent, amend=True)
    item.sha = git("rev-parse", "HEAD", cwd=work).strip()


def _try_rebase(upstream: Path, sha: str, base_rev: str, onto: str, scratch: Path) -> str:
    target = git("rev-parse", "--verify", f"{onto}^{{commit}}", cwd=upstream).strip()
    older = (
        f"; NOTE {target[:12]} is an ancestor of the base, i.e. older than it: this moves the branch back, "
        "not forward (pass a main newer than the tag)"
        if git_ok("merge-base", "--is-ancestor", target, base_rev, cwd=upstream)
        else ""
    )
    git("worktree", "add", "-q", "--detach", str(scratch), sha, cwd=upstream)
    try:
        proc = run(
            ["git", "rebase", "-q", "--onto", target, base_rev],
            cwd=scratch,
            check=False,
            env={"GIT_COMMITTER_NAME": "x", "GIT_COMMITTER_EMAIL": "x@x"},
        )
        if proc.returncode != 0:
            conflicts = git("diff", "--name-only", "--diff-filter=U", cwd=scratch).split()
            run(["git", "rebase", "--abort"], cwd=scratch, check=False)
            return f"CONFLICTS onto {onto} ({target[:12]}): {', '.join(conflicts) or proc.stderr.strip()[:200]}" + older
        return f"rebases cleanly onto {onto} ({target[:12]})" + older
    finally:
        git("worktree", "remove", "--force", str(scratch), cwd=upstream, check=False)


def _report(
    upstream: Path, tag: str, prefix: str, built: list[Built], notes: list[str], check: bool, onto: Optional[str]
) -> str:
    lines = [f"export-pr onto {tag} in {upstream}:", *[f"  {n}" for n in notes]]
    for b in built:
        lines.append(f"{prefix}/{b.change.key}: {b.sha[:12]} {b.change.title}")
        stacked = f"; stacked on {prefix}/{b.change.depends_on}" if b.change.depends_on else ""
        lines.append(
            f"  {b.files} file(s), +{b.added} -{b.deleted} lines{stacked}; author "
            + git("log", "-1", "--format=%an <%ae>", b.sha, cwd=upstream).strip()
        )
        lines += [f"  NOTE {n}" for n in b.notes]
        if b.rebase:
            lines.append(f"  {b.rebase}")
        if check:
            for c in b.checks:
                lines.append(c.line())
                for test, (tip, at_base) in c.outcomes.items():
                    where = "base" if not b.change.depends_on else b.change.depends_on
                    lines.append(f"      {test}: {tip}; at the {where}: {at_base}")
                if not c.ok:
                    lines += ["      " + ln for ln in c.output.splitlines()]
    if not check:
        lines.append("Checks: not run (pass --check).")
    lines += [
        "",
        "Nothing was pushed. Per branch: `git push <your-fork> BRANCH`, then `gh pr create --repo "
        f"{UPSTREAM_REPO} --base main --head <you>:BRANCH --title ... --body-file "
        f"<git-dir>/pr-<change>.md` (the body is the commit message, in {TEMPLATE_NOTE}).",
    ]
    return "\n".join(lines)
