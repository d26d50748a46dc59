#!/usr/bin/env python3
"""Build the archives that carry a patched SGLang release (0.5.17 or 0.5.23) and its deps to the GPU device.

Run here (a machine with PyPI access), from anywhere:

    python3 scripts/device/stage.py                    # 0.5.17 -> .stage/device/{core,deps}.tar.xz + MANIFEST.json
    python3 scripts/device/stage.py --release 0.5.23   # the runtime-context variant, same place

Then on the device (the ``run`` tool), carrying ``.stage/device``:

    bash scripts/device/run_gpu.sh

What it does (stdlib + pip only):
1. ``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux...``
   each pinned wheel below into a wheel cache outside the repo (so it never travels);
2. unzips them into a staging site dir, dropping the big parts the tests never load
   (sgl_kernel/flash_ops, flashmla_ops, infllm_ops, sm100/; flashinfer/data but the sources its JIT builds
   common kernels from, cuda-tile, nccl4py);
3. applies the overlay to the extracted sglang package with
   ``python3 scripts/overlay.py apply <staging>/sglang`` (which verifies the upstream bytes first;
   the pristine tree comes from the cp311 wheel in the overlay cache: ``overlay.py fetch 0.5.17``);
4. packs two deterministic xz tarballs (sorted names, mtime 0, uid/gid 0) into ``.stage/device``
   (ignored by git) and writes MANIFEST.json with each wheel's name and sha256.

The device image already has torch 2.11.0+cu130, triton, numpy, einops, psutil, requests, pillow,
aiohttp, uvloop, sentencepiece, safetensors, httpx, anyio ... (see the device's KINDS.md); its
transformers 5.17 breaks sglang 0.5.17, so transformers 5.12.1 + tokenizers 0.22.2 travel.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / ".stage" / "device"
CARRY_LIMIT = 64 * 1024 * 1024

# Archive "core": the heavy packages, per release. 0.5.17: pins from its METADATA (sglang-kernel,
# flashinfer-python, transformers) and the measured recipe (tokenizers). 0.5.23 pins torch 2.14.1 and
# sglang-kernel 0.4.10, built for that torch; the device has torch 2.11, so 0.5.23's Python sources
# travel with the sglang-kernel built for torch 2.11 (0.4.5, 0.5.17's); its transformers 5.19.0
# (huggingface-hub >= 1.31 and tokenizers 0.23.x: the image's 1.33.0 and 0.23.2 do).
CORE = {
    "0.5.17": [
        "sglang==0.5.17",
        "sglang-kernel==0.4.5",
        "flashinfer-python==0.6.15.post1",
        "transformers==5.12.1",
        "tokenizers==0.22.2",
    ],
    "0.5.23": ["sglang==0.5.23", "sglang-kernel==0.4.5", "flashinfer-python==0.7.2", "transformers==5.19.0"],
}
# Where 0.5.23's METADATA pins a small dependency differently from 0.5.17's.
DEPS_PINS = {
    "0.5.23": {
        "openai": "openai==2.8.0",
        "xgrammar": "xgrammar==0.2.7",
        "compressed-tensors": "compressed-tensors==0.18.0",
    }
}
# Archive "deps": small runtime deps of the import path that the device image lacks. Pins: sglang's
# METADATA where it pins (apache-tvm-ffi, openai, xgrammar), else what the CPU venv of 0.5.17 runs.
DEPS = [
    "apache-tvm-ffi==0.1.11",
    "compressed-tensors",
    "dill==0.4.1",
    "fastapi==0.165.0",
    "gguf==0.19.0",
    "ipython==9.18.1",
    "jedi==0.20.1",
    "parso==0.8.7",
    "traitlets==5.16.1",
    "prompt_toolkit",
    "pexpect==4.9.0",
    "ptyprocess==0.7.0",
    "stack_data",
    "executing==2.3.0",
    "asttokens==3.0.2",
    "pure_eval",
    "matplotlib-inline",
    "ipython_pygments_lexers",
    "wcwidth==0.9.4",
    "decorator",
    "jiter==0.19.0",
    "loguru==0.7.3",
    "msgspec==0.22.0",
    "openai==2.6.1",
    "distro",
    "opentelemetry-api",
    "importlib-metadata",
    "orjson==3.13.0",
    "partial-json-parser",
    "pybase64==1.5.1",
    "pydantic==2.14.3",
    "pydantic-core",  # pinned below to what pydantic's METADATA requires
    "annotated-types",
    "typing-inspection",
    "pyzmq==27.3.0",
    "setproctitle==1.3.8",
    "sniffio==1.3.1",
    "starlette==1.10.0",
    "truststore==0.10.5",
    "uvicorn==0.54.0",
    "xgrammar==0.2.1",
]
# Paths (relative to the site dir, prefix match) left out of the archives.
STRIP = [
    "sgl_kernel/flash_ops",
    "sgl_kernel/flashmla_ops",
    "sgl_kernel/infllm_ops",
    "sgl_kernel/sm100",
    "flashinfer/data",
    "cuda_tile",
    "cuda-tile",
    "nccl4py",
    "xgrammar/lib",  # libxgrammar.a (65 MB static library; the bindings .so is what loads)
]
# Kept inside a stripped path: what flashinfer's JIT compiles its common kernels from (sgl_kernel's rmsnorm,
# which 0.5.23's RMSNorm calls on the GPU, is flashinfer's JIT-built norm module; the device has nvcc).
# (prefix, top files only): 16 MB + 26 MB + 22 MB of headers, about 4.3 MB in the archives.
KEEP = [
    ("flashinfer/data/include/", False),
    ("flashinfer/data/csrc/", True),
    ("flashinfer/data/spdlog/include/", False),
    ("flashinfer/data/cutlass/include/", False),
    ("flashinfer/data/cccl/", False),
]
PLATFORMS = [
    "manylinux_2_39_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def log(msg: str) -> None:
    print(f"[stage] {msg}", flush=True)


def wheel_cache() -> Path:
    env = os.environ.get("SGLANG_OVERLAY_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(env) if env else Path(xdg) / "sglang-overlay"
    return root / "device-wheels"


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def find_wheel(cache: Path, spec: str) -> Path | None:
    name, _, version = spec.partition("==")
    hits = []
    for w in sorted(cache.glob("*.whl")):
        wname, wver = w.name.split("-")[:2]
        if _norm(wname) == _norm(name) and (not version or wver == version):
            hits.append(w)
    return hits[-1] if hits else None


def download(cache: Path, spec: str) -> Path:
    found = find_wheel(cache, spec)
    if found:
        return found
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "-d",
        str(cache),
    ]
    for p in PLATFORMS + ["any"]:
        cmd += ["--platform", p]
    log(f"pip download {spec}")
    subprocess.run(cmd + [spec], check=True)
    found = find_wheel(cache, spec)
    if not found:
        sys.exit(f"pip downloaded no wheel for {spec} into {cache}")
    return found


def requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def stripped(rel: str) -> bool:
    for prefix, top_only in KEEP:
        if rel.startswith(prefix) and not (top_only and "/" in rel[len(prefix) :]):
            return False
    return any(rel == s or rel.startswith(s + "/") or rel.startswith(s + ".") or rel.startswith(s + "-") for s in STRIP)


def extract(wheel: Path, site: Path) -> tuple[int, int]:
    kept = dropped = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            rel = info.filename
            if ".data/" in rel.split("/", 1)[0] + "/":  # NAME.data/{purelib,platlib}/... -> site root
                parts = rel.split("/")
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    rel = "/".join(parts[2:])
                else:
                    continue  # scripts/headers/data: not needed on PYTHONPATH
            if stripped(rel) or "/__pycache__/" in f"/{rel}":
                dropped += info.file_size
                continue
            target = site / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(target, 0o755 if mode & 0o111 else 0o644)
            kept += info.file_size
    return kept, dropped


def pack(site: Path, tops: list[str], dest: Path) -> None:
    """A deterministic tar.xz of ``tops`` (entries of ``site``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for top in sorted(tops):
            p = site / top
            paths += [p] + (sorted(p.rglob("*")) if p.is_dir() else [])
        for p in paths:
            info = tar.gettarinfo(str(p), arcname=str(p.relative_to(site)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if (p.is_dir() or info.mode & 0o111) else 0o644
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    dest.write_bytes(
        lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME if os.environ.get("STAGE_XZ_EXTREME") else 9)
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--release", default="0.5.17", choices=sorted(CORE), help="the sglang release to stage")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where the archives go (default .stage/device)")
    ap.add_argument("--no-overlay", action="store_true", help="pack pristine upstream sglang (for A/B runs)")
    ap.add_argument("--groups", default="core,deps", help="which archives to (re)build (default: core,deps)")
    args = ap.parse_args()
    cache = wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)

    pins = DEPS_PINS.get(args.release, {})
    deps = [pins.get(spec.split("==")[0], spec) for spec in DEPS]
    groups = {g: s for g, s in {"core": list(CORE[args.release]), "deps": deps}.items() if g in args.groups.split(",")}
    wheels: dict[str, list[Path]] = {}
    for group, specs in groups.items():
        wheels[group] = []
        for spec in specs:
            if spec == "pydantic-core":
                pyd = find_wheel(cache, "pydantic==2.14.3") or download(cache, "pydantic==2.14.3")
                pin = [r for r in requires(pyd) if r.replace(" ", "").startswith("pydantic-core==")]
                spec = pin[0].replace(" ", "").split(";")[0] if pin else spec
            wheels[group].append(download(cache, spec))

    manifest = {"release": args.release, "overlay": not args.no_overlay, "archives": {}}
    old_path = args.out / "MANIFEST.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    if old.get("release") == args.release:  # keep the archives not rebuilt
        manifest["archives"] = {
            k: v
            for k, v in old.get("archives", {}).items()
            if k.split(".")[0] not in groups and (args.out / k).is_file()
        }
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
        for group, ws in wheels.items():
            site = Path(tmp) / group
            site.mkdir()
            entries = []
            for w in ws:
                kept, dropped = extract(w, site)
                entries.append({"wheel": w.name, "sha256": sha256(w), "kept_bytes": kept, "dropped_bytes": dropped})
                log(f"{group}: {w.name}: kept {kept / 1e6:.1f} MB, dropped {dropped / 1e6:.1f} MB")
            if group == "core" and not args.no_overlay:
                # Verifies the package is the pristine release (bytes of the cached cp311 wheel)
                # before patching; refuses otherwise.
                subprocess.run(
                    [sys.executable, str(REPO / "scripts" / "overlay.py"), "apply", str(site / "sglang")], check=True
                )
                st = subprocess.run(
                    [sys.executable, str(REPO / "scripts" / "overlay.py"), "status", str(site / "sglang")],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                log(f"overlay status: {st.stdout.strip()}")
                for pyc in (site / "sglang").rglob("__pycache__"):
                    shutil.rmtree(pyc)
            dest = args.out / f"{group}.tar.xz"
            log(f"packing {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} ...")
            pack(site, [p.name for p in site.iterdir()], dest)
            manifest["archives"][dest.name] = {"sha256": sha256(dest), "bytes": dest.stat().st_size, "wheels": entries}
            log(f"{dest.name}: {dest.stat().st_size / 1e6:.1f} MB")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(a["bytes"] for a in manifest["archives"].values())
    log(f"total {total / 1e6:.1f} MB in {args.out} (carry limit {CARRY_LIMIT / 2**20:.0f} MiB incl. the working tree)")
    if total > CARRY_LIMIT:
        sys.exit("the archives exceed the device carry limit; strip more")


if __name__ == "__main__":
    main()
