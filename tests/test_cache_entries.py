"""The cache under concurrent runs (issue 35, item 6: two cold `demo`s started 1 s or 30 s apart both failed,
the second had deleted the first's half-built venv), and transformers layers built without pip trying to
uninstall the base's copies. CPU-only, no sglang, no network; a few seconds each (a venv with pip takes ~3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pip
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from overlay_tool.envs import VENV_MARKER, install_layer, site_packages, venv_entry, venv_python  # noqa: E402
from overlay_tool.errors import OverlayError  # noqa: E402
from overlay_tool.locks import lock_file  # noqa: E402

# Each child builds one cache entry through the tool's own code. Its build step stops for a while once
# under way (after touching SIGNAL), long enough for the second child to start against the same entry.
CHILD = r"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, os.environ["SCRIPTS"])
kind, root, signal = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

if kind == "venv":
    from overlay_tool.envs import venv_entry
    entry = root / "venvs" / "entry"
    with venv_entry(entry, {"test": 1}, "a test venv", with_pip=False) as python:
        if python is None:
            print("reused", os.stat(entry).st_ino)
            sys.exit(0)
        (entry / "half-built").write_text(str(os.getpid()))  # as pip's half-installed torch
        signal.touch()
        time.sleep(2)
        if not (entry / "half-built").is_file() or (entry / "half-built").read_text() != str(os.getpid()):
            sys.exit("this run's half-built venv was deleted under it")
        print("built", os.stat(entry).st_ino)
else:
    import overlay_tool.cache as cache
    real_git = cache.git
    def slow_git(*args, **kwargs):
        if args[0] == "init":  # the tree is being built
            signal.touch()
            time.sleep(2)
        return real_git(*args, **kwargs)
    cache.git = slow_git
    repo = cache.Cache(root).release_tree("1.0")
    print("tree", os.stat(repo / ".git").st_ino)
"""


def _fake_wheel(path: Path, files: dict[str, str], name: str, version: str) -> Path:
    """A minimal pure-Python wheel that pip installs."""
    info = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


@pytest.mark.parametrize("kind", ["venv", "release tree"])
def test_two_runs_building_one_entry_at_once_both_succeed_and_leave_one_whole_entry(kind: str, tmp_path: Path) -> None:
    root = tmp_path / "cache"  # an empty SGLANG_OVERLAY_CACHE
    entry = root / "venvs" / "entry" if kind == "venv" else root / "releases" / "1.0"
    if kind == "venv":  # what a killed run leaves: a venv without its marker; the first run removes it
        entry.mkdir(parents=True)
        (entry / "pyvenv.cfg").write_text("home = /nowhere\n")
    else:
        (root / "wheels").mkdir(parents=True)
        _fake_wheel(root / "wheels" / "sglang-1.0-py3-none-any.whl", {"sglang/version.py": "v = 1\n"}, "sglang", "1.0")
    env = {**os.environ, "SCRIPTS": str(REPO / "scripts"), "PYTHONDONTWRITEBYTECODE": "1"}
    signal = tmp_path / "under-way"
    argv = [sys.executable, "-c", CHILD, kind.split()[0], str(root), str(signal)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not signal.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert signal.exists(), first.communicate()
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    (out1, err1), (out2, err2) = first.communicate(timeout=120), second.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    # Both got the entry the first built (same inode: not rebuilt or replaced), and the second said it waited.
    word = "built" if kind == "venv" else "tree"
    assert out1.split() == [word, str(os.stat(entry if kind == "venv" else entry / ".git").st_ino)]
    assert out2.split()[1] == out1.split()[1]
    what = "a test venv" if kind == "venv" else "the sglang 1.0 release tree"
    assert f"waiting for another overlay.py (pid {first.pid}) building {what}" in err2, err2
    if kind == "venv":
        assert out2.split()[0] == "reused" and err1.count("creating ") == 1 and "creating " not in err2
        assert json.loads((entry / VENV_MARKER).read_text()) == {"deps": {"test": 1}}
        assert (
            subprocess.run(
                [str(venv_python(entry)), "-c", "import sys; assert sys.prefix != sys.base_prefix"]
            ).returncode
            == 0
        )
    else:
        assert sorted(p.name for p in entry.parent.iterdir()) == [".1.0.lock", "1.0"]  # no staging left
    assert lock_file(entry).read_text() == ""  # nobody holds it


def test_a_folder_that_is_not_a_venv_is_never_deleted(tmp_path: Path) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(OverlayError, match="is not a venv .*nothing was deleted"):
        with venv_entry(mine, {"test": 1}, "a test venv"):
            pass
    assert (mine / "notes.txt").read_text() == "mine\n"


def test_a_layer_shadows_the_base_without_pip_trying_to_uninstall_the_base_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """The base holds transformers 9.0 (xgrammar and compressed_tensors pull in the newest); the layer pins 1.0.
    A plain `pip install` in the layer saw the base's copy through the layer's .pth and printed "Not uninstalling
    transformers at .../base-..., outside environment ..." while building every layer."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("1.0", "9.0"):
        _fake_wheel(
            wheels / f"transformers-{version}-py3-none-any.whl",
            {"transformers/__init__.py": f"__version__ = {version!r}\n"},
            "transformers",
            version,
        )
    _fake_wheel(wheels / "basepkg-1.0-py3-none-any.whl", {"basepkg.py": "HERE = 'base'\n"}, "basepkg", "1.0")
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    base, layer = tmp_path / "base", tmp_path / "layer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
    subprocess.run(  # the base's packages, installed by this interpreter's pip into the base's site-packages
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site_packages(venv_python(base))),
            str(wheels / "transformers-9.0-py3-none-any.whl"),
            str(wheels / "basepkg-1.0-py3-none-any.whl"),
        ],
        check=True,
    )
    # The layer's pip: a copy of this interpreter's (what ensurepip installs, in 0.3 s instead of 3-13 s).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(layer)], check=True)
    shutil.copytree(Path(pip.__file__).parent, site_packages(venv_python(layer)) / "pip")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("transformers==1.0\n")
    capfd.readouterr()
    install_layer(venv_python(layer), venv_python(base), ["transformers==1.0"], constraints)
    err = capfd.readouterr().err
    assert "Not uninstalling" not in err and "outside environment" not in err, err
    probe = "import transformers, basepkg; print(transformers.__version__, basepkg.HERE)"
    assert subprocess.run([str(venv_python(layer)), "-c", probe], capture_output=True, text=True).stdout == "1.0 base\n"
    installed = sorted(p.name for p in site_packages(venv_python(layer)).glob("*.dist-info"))
    assert installed == ["transformers-1.0.dist-info"]
    assert (site_packages(venv_python(base)) / "transformers-9.0.dist-info").is_dir()  # the base is untouched


def test_a_damaged_release_tree_is_built_again(tmp_path: Path) -> None:
    """A tree that is not whole (an older tool's half-built one, or damaged) is replaced, not an error."""
    from overlay_tool.cache import Cache

    cache = Cache(tmp_path / "cache")
    (cache.root / "releases" / "1.0" / ".git").mkdir(parents=True)  # not a repository
    (cache.root / "wheels").mkdir()
    _fake_wheel(
        cache.root / "wheels" / "sglang-1.0-py3-none-any.whl", {"sglang/version.py": "v = 1\n"}, "sglang", "1.0"
    )
    repo = cache.release_tree("1.0")
    assert (repo / "python" / "sglang" / "version.py").read_text() == "v = 1\n"
    assert subprocess.run(["git", "tag"], cwd=repo, capture_output=True, text=True).stdout == "v1.0\n"
