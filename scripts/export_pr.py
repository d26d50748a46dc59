"""`overlay.py export-pr UPSTREAM --base vX --branch NAME`: the overlay as an upstream PR branch.

The branch starts at tag vX of the SGLang checkout UPSTREAM and holds one commit
per logical change (the CHANGES table below): the change's new files, taken from
this repository's history with git-filter-repo (their paths already match
upstream's; the tests move into upstream's test tree), together with the hook
patches of vX's variant that wire them into upstream files. When a change's files
have several commits in the overlay history they are squashed into one commit:
its author is the author of the earliest of them (with that commit's date), the
message lists every original commit (short hash, subject, author) and carries a
``Co-authored-by:`` trailer for each other author, patch authors included.

The branch is built in a temporary worktree; UPSTREAM's own checkout is never
touched. Every commit is checked (its diff applies to its parent, its Python
files byte-compile; whether it also applies to vX alone is reported) and,
with --run-tests / --test-python, the exported tests run at the tip. Only then
is the branch ref written. Nothing is pushed: the push and ``gh pr create``
commands are printed.

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

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlay import (  # noqa: E402
    PACKAGE_PREFIX, Cache, Overlay, OverlayError, Release, UnsupportedRelease, git, make_venv, run,
)


# --------------------------------------------------------------------------- what goes where


@dataclass(frozen=True)
class Change:
    """One commit of the PR: the overlay files under ``files`` + the hook patches it claims."""

    key: str
    title: str
    description: str
    files: tuple[str, ...]  # path prefixes (upstream paths) of the overlay files of this change
    hooks: tuple[str, ...] = ()  # path prefixes of upstream files whose patches belong here
    keywords: tuple[str, ...] = ()  # words in a patch subject that claim it first


# In commit order. A patch goes to the first change with a keyword in its subject,
# else to the first change whose hook prefixes cover a file it touches, else it
# becomes a commit of its own (its own author and message). An overlay file that
# no change covers is an error: add it here.
CHANGES: tuple[Change, ...] = (
    Change(
        "distributed-teardown",
        "distributed: destroy the self-PP group in destroy_model_parallel()",
        "destroy_model_parallel() left the self-PP group (and its process group, store and port)\n"
        "alive, so the distributed setup could not be destroyed and rebuilt in one process.",
        files=(),
        keywords=("self-pp",),
    ),
    Change(
        "distributed-reuse",
        "distributed: opt-in reuse of an existing torch.distributed / model-parallel setup",
        "With SGLANG_ALLOW_REUSE_DISTRIBUTED=1, a ModelRunner created in a process that already has\n"
        "torch.distributed and SGLang's model-parallel groups reuses them when world size, TP and PP\n"
        "match, and raises a ValueError naming both sides when they do not. Several ModelRunners can\n"
        "then live in one process (e.g. zeroth-order fine-tuning with forward passes only). Unset,\n"
        "behaviour is unchanged.",
        files=("python/sglang/srt/distributed/",),
        hooks=("python/sglang/srt/distributed/", "python/sglang/srt/model_executor/",
               "python/sglang/srt/runtime_context"),
        keywords=("reuse",),
    ),
    Change(
        "expert-location",
        "eplb: allow replacing expert-location metadata when reusing distributed",
        "With SGLANG_ALLOW_REUSE_DISTRIBUTED set, a second ModelRunner in the same process sets its own\n"
        "expert-location metadata instead of tripping the once-per-process assertion.",
        files=("python/sglang/srt/eplb/",),
        hooks=("python/sglang/srt/eplb/",),
        keywords=("expert", "eplb"),
    ),
    Change(
        "opt-model",
        "models: native OPT with HF weight names and no silent weight skips",
        "The native OPT implementation loads both `decoder.*` and `model.decoder.*` checkpoint names,\n"
        "fails on unexpected or missing weights instead of skipping them, and matches HuggingFace's\n"
        "logits on the same weights.",
        files=("python/sglang/srt/models/",),
        hooks=("python/sglang/srt/models/", "python/sglang/srt/configs/"),
        keywords=("opt",),
    ),
    Change(
        "standalone",
        "srt: an in-process runner API (build, score, destroy) without a server",
        "sglang.srt.standalone builds a ModelRunner for a model path with defaults that work on CPU\n"
        "and GPU, scores batches (logits at every position, per-token log-probs, mean NLL with a\n"
        "one-read fp32 log-sum-exp) from empty KV pools, generates greedily, and tears it down;\n"
        "distributed='reuse' builds further runners in the same process, tp_size/tp_rank one rank of\n"
        "a tensor-parallel group per process.",
        files=("python/sglang/srt/standalone.py", "python/sglang/srt/layers/target_logprobs.py"),
    ),
    Change(
        "tests",
        "test: tests for distributed reuse, the native OPT model and the in-process runner",
        "CPU pytest tests (tiny random OPT checkpoints, no downloads): several ModelRunners in one\n"
        "process with reused distributed state, the mismatch errors, native OPT against HuggingFace\n"
        "at every position, the in-process runner API. GPU tests (gpu/, skipped without CUDA):\n"
        "parity at real OPT shapes in fp16/bf16 and three runners under NCCL. Run with\n"
        "`python -m pytest {dest}`.",
        files=("test/",),
    ),
)

# Files of the overlay that are about the overlay itself (its marker module, the tests of the
# tool, of the fork build and of scripts/mezo.py, which stays outside the package), not SGLang:
# never exported. Path prefixes.
NOT_FOR_UPSTREAM = ("python/sglang/overlay.py", "tests/test_overlay_tool.py", "tests/test_export_pr.py",
                    "tests/export_fixtures/", "tests/test_fork_build.py",
                    "tests/test_mezo.py", "tests/support/mezo_reference.py")
# How the overlay's `tests/` imports its helpers, and what that becomes upstream.
TEST_SUPPORT = ("tests/support/", "tests.support", "overlay_support")
UPSTREAM_REPO = "sgl-project/sglang"
# How each change reads in the PR title (joined with commas; the tests commit is left out).
PR_TITLE_PARTS = {
    "distributed-reuse": "opt-in reuse of an existing distributed setup",
    "expert-location": "expert-location reset",
    "distributed-teardown": "self-PP group teardown",
    "opt-model": "native OPT fixes",
    "standalone": "in-process runner API",
}


def test_destination(upstream_tree: Path, base_rev: str) -> str:
    """Where the tests go in upstream's layout: test/registered/ (newer) or test/srt/ (older)."""
    if git("ls-tree", "--name-only", base_rev, "test/registered/", cwd=upstream_tree).strip():
        return "test/registered/overlay/"
    return "test/srt/overlay/"


# --------------------------------------------------------------------------- CLI glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("upstream", type=Path, help="an SGLang git checkout (clean, with tag vX)")
    parser.add_argument("--base", required=True, help="release tag to start from, e.g. v0.5.23")
    parser.add_argument("--branch", required=True, help="name of the branch to create")
    parser.add_argument("--force", action="store_true", help="replace an existing branch of that name")
    parser.add_argument("--source-repo", type=Path, default=None,
                        help="the sglang-overlay git repository to take history from (default: this one)")
    tests = parser.add_mutually_exclusive_group()
    tests.add_argument("--run-tests", action="store_true",
                       help="run the exported tests at the tip in release X's CPU venv (built when missing)")
    tests.add_argument("--test-python", type=Path, default=None,
                       help="run the exported tests at the tip with this python instead")


def export_pr_from_args(args: argparse.Namespace, overlay: Overlay, cache: Cache) -> str:
    return export_pr(args.upstream, args.base, args.branch, force=args.force, overlay=overlay, cache=cache,
                     source_repo=args.source_repo or overlay.root, run_tests=args.run_tests,
                     test_python=args.test_python)


# --------------------------------------------------------------------------- the export


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


def export_pr(upstream: Path, base: str, branch: str, *, force: bool, overlay: Overlay, cache: Cache,
              source_repo: Path, run_tests: bool = False, test_python: Optional[Path] = None) -> str:
    """Create ``branch`` in ``upstream`` at tag ``base``; returns the summary + push and PR commands."""
    upstream = upstream.resolve()
    source_repo = source_repo.resolve()
    release = _release_of(base, overlay)
    tag = f"v{release.version}"
    _check_upstream(upstream, tag, branch, force)
    filter_repo = require_filter_repo()
    _check_source(source_repo)
    _check_identity(upstream)
    base_rev = git("rev-parse", f"refs/tags/{tag}^{{commit}}", cwd=upstream).strip()
    dest = test_destination(upstream, base_rev)

    with tempfile.TemporaryDirectory(prefix="sglang-overlay-export-") as tmp_name:
        tmp = Path(tmp_name)
        filtered, commit_map = _filtered_history(source_repo, tmp, dest, filter_repo)
        plan = _plan(filtered, overlay.patches(release), tmp)
        work = tmp / "worktree"
        git("worktree", "add", "-q", "--detach", str(work), base_rev, cwd=upstream)
        try:
            made = _build(work, filtered, commit_map, plan, dest, tmp)
            if not made:
                raise OverlayError(f"nothing to export: the overlay adds nothing to sglang {release.version}")
            checks = _verify(work, base_rev, made, tmp)
            tests_line = "not run (pass --run-tests, or --test-python PY)"
            if run_tests or test_python:
                python = test_python or make_venv(release.version, cache.root / "venvs" / release.version,
                                                  overlay, cache)
                tests_line = _run_tip_tests(work, Path(python), dest, release)
            git("branch", "-f", branch, "HEAD", cwd=work)
        finally:
            git("worktree", "remove", "--force", str(work), cwd=upstream, check=False)
            git("worktree", "prune", cwd=upstream, check=False)

    return _report(upstream, tag, branch, made, checks, tests_line, dest)


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
    if run(["git", "rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}"], cwd=upstream,
           check=False).returncode != 0:
        raise OverlayError(f"{upstream} has no tag {tag}: `git -C {upstream} fetch "
                           f"https://github.com/{UPSTREAM_REPO} tag {tag}` first")
    if run(["git", "check-ref-format", "--branch", branch], cwd=upstream, check=False).returncode != 0:
        raise OverlayError(f"{branch!r} is not a valid branch name")
    if run(["git", "show-ref", "--verify", "-q", f"refs/heads/{branch}"], cwd=upstream,
           check=False).returncode == 0:
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
    if run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=source_repo if source_repo.is_dir() else None,
           check=False).returncode != 0:
        raise OverlayError(f"{source_repo} is not a git repository with commits (the overlay's history "
                           "comes from there; pass --source-repo)")
    dirty = git("status", "--porcelain", "--", "python/sglang", "tests", "patches", cwd=source_repo).strip()
    if dirty:
        raise OverlayError(f"{source_repo} has uncommitted changes to the overlay (exported from its history, so "
                           "they would be left out); commit them first:\n"
                           + "\n".join("  " + line for line in dirty.splitlines()[:20]))


def _check_identity(upstream: Path) -> None:
    if run(["git", "var", "GIT_COMMITTER_IDENT"], cwd=upstream, check=False).returncode != 0:
        raise OverlayError(f"git has no committer identity in {upstream}: set user.name and user.email "
                           "(`git config --global user.name ...`), then run again")


def _filtered_history(source_repo: Path, tmp: Path, dest: str, filter_repo: str) -> tuple[Path, dict[str, str]]:
    """A clone of ``source_repo`` rewritten to hold the exported files only, at their upstream paths."""
    keep = [p for p in git("ls-tree", "-r", "--name-only", "HEAD", "--", "python/sglang", "tests",
                           cwd=source_repo).splitlines()
            if p.startswith((PACKAGE_PREFIX, "tests/")) and not p.startswith(NOT_FOR_UPSTREAM)]
    clone = tmp / "filtered"
    git("clone", "-q", "--no-local", str(source_repo), str(clone), cwd=tmp)
    if not keep:
        return clone, {}
    support_dir, support_module, support_new = TEST_SUPPORT
    paths = tmp / "paths.txt"
    paths.write_text("".join(f"{p}\n" for p in keep)
                     + f"{support_dir}==>{dest}{support_new}/\n"
                     + f"tests/==>{dest}\n")
    replace = tmp / "replace.txt"
    replace.write_text(f"{support_module}==>{support_new}\n")
    run([filter_repo, "--force", "--quiet", "--paths-from-file", str(paths), "--replace-text", str(replace)],
        cwd=clone)
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
    files = git("ls-tree", "-r", "--name-only", "HEAD", cwd=filtered).splitlines() if \
        run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=filtered, check=False).returncode == 0 else []
    stray = []
    for rel in files:
        owner = next((p for p in planned if rel.startswith(p.change.files)), None)
        if owner is None:
            stray.append(rel)
        else:
            owner.files.append(rel)
    if stray:
        raise OverlayError("these overlay files belong to no logical change of the PR:\n  " + "\n  ".join(stray)
                           + "\nAdd their path to a change (or a new change) in CHANGES in scripts/export_pr.py")
    extra: list[Planned] = []
    for patch in patches:
        info = _parse_patch(patch, tmp)
        owner = next((p for p in planned if any(re.search(rf"\b{re.escape(w)}\b", info.subject, re.I)
                                                for w in p.change.keywords)), None)
        owner = owner or next((p for p in planned if any(path.startswith(p.change.hooks) for path in info.paths)),
                              None)
        if owner is None:
            own = Planned(Change(f"patch-{patch.stem}", info.subject, "", ()), patches=[info])
            extra.append(own)
        else:
            owner.patches.append(info)
    # Patches of their own go before the tests, which may exercise them.
    tests = [p for p in planned if p.change.key == "tests"]
    return [p for p in planned if p.change.key != "tests"] + extra + tests


@dataclass
class Made:
    sha: str
    title: str
    author: str
    files: list[str]


def _history(filtered: Path, files: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(filtered sha, author name, author email, author date, subject), oldest first."""
    if not files:
        return []
    out = git("log", "--reverse", "--format=%H%x00%an%x00%ae%x00%aI%x00%s", "HEAD", "--", *files, cwd=filtered)
    return [tuple(line.split("\0")) for line in out.splitlines() if line]  # type: ignore[misc]


def _build(work: Path, filtered: Path, commit_map: dict[str, str], plan: list[Planned], dest: str,
           tmp: Path) -> list[Made]:
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
        if run(["git", "diff", "--cached", "--quiet"], cwd=work, check=False).returncode == 0:
            continue  # already upstream's bytes
        history = _history(filtered, item.files)
        message, author, date = _message(item, history, commit_map, dest)
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


def _message(item: Planned, history: list, commit_map: dict[str, str], dest: str) -> tuple[str, tuple[str, str], str]:
    authors: list[tuple[str, str]] = [(h[1], h[2]) for h in history] + [p.author for p in item.patches]
    author = authors[0]
    date = history[0][3] if history else ""
    change = item.change
    only_patch = not change.files and len(item.patches) == 1 and not item.files
    if only_patch and change.key.startswith("patch-"):
        parts = [item.patches[0].subject, item.patches[0].body]
    else:
        parts = [change.title, change.description.format(dest=dest)]
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


@dataclass
class Checks:
    independent: dict[str, bool]


def _verify(work: Path, base_rev: str, made: list[Made], tmp: Path) -> Checks:
    """Each commit's diff applies to its parent and its Python files byte-compile; note which apply to base alone."""
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
    return Checks(independent)


def _run_tip_tests(work: Path, python: Path, dest: str, release: Release) -> str:
    if not (work / dest).is_dir():
        return "none exported"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(work / "python"),
                                                                      os.environ.get("PYTHONPATH")])),
           "SGLANG_OVERLAY_RELEASE": release.version, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", dest], cwd=work, env=env,
                          capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
    if proc.returncode != 0:
        raise OverlayError(f"the exported tests fail at the tip ({python} -m pytest {dest}); no branch was "
                           f"written:\n{tail}")
    return f"passed at the tip ({python}): {tail.splitlines()[-1] if tail else ''}"


def _report(upstream: Path, tag: str, branch: str, made: list[Made], checks: Checks, tests_line: str,
            dest: str) -> str:
    common = Path(git("rev-parse", "--git-common-dir", cwd=upstream).strip())
    common = common if common.is_absolute() else upstream / common
    body_file = common / f"sglang-overlay-pr-{re.sub(r'[^A-Za-z0-9._-]+', '-', branch)}.md"
    by_title = {c.title: c for c in CHANGES}
    title = ", ".join(PR_TITLE_PARTS.get(by_title[m.title].key, m.title) if m.title in by_title else m.title
                      for m in made if not (m.title in by_title and by_title[m.title].key == "tests"))
    title = (title[:1].upper() + title[1:]) if title else made[0].title
    body = [f"Based on `{tag}`. One commit per logical change; each applies on its parent and byte-compiles.",
            "", "## Commits", ""]
    for m in made:
        msg = git("log", "-1", "--format=%B", m.sha, cwd=upstream).strip()
        body += [f"### {m.title}", "", msg.split("\n", 1)[1].strip() if "\n" in msg else "", ""]
    body += ["## Tests", "", f"`python -m pytest {dest}` (CPU only). Exported tests: {tests_line}.", ""]
    body_file.write_text("\n".join(body))
    lines = [f"Branch {branch} in {upstream}: {len(made)} commit(s) on {tag}"]
    for m in made:
        alone = "yes" if checks.independent.get(m.sha) else "no (needs the commits before it)"
        lines.append(f"  {m.sha[:12]} {m.title}\n      author {m.author}; {len(m.files)} file(s); "
                     f"applies to {tag} alone: {alone}")
    lines += [
        "Checks: every commit applies to its parent (git apply --check) and its Python files byte-compile.",
        f"Exported tests ({dest}): {tests_line}",
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
