#!/usr/bin/env bash
# The one command run on the GPU device (the `run` tool), from the repository root, carrying
# .stage/device (built here by `python3 scripts/device/stage.py`):
#
#   bash scripts/device/run_gpu.sh [all|tests|bench|smoke|mezo|zoparts|breakdown|spread] [extra pytest args...]
#
# Unpacks the staged site (patched sglang 0.5.17, transformers 5.12.1, ...; STAGE=.stage/device-0.5.23 for the
# runtime-context release staged with `stage.py --release 0.5.23 --out .stage/device-0.5.23`) into /tmp/site once per
# machine, then runs the GPU tests (tests/gpu) and/or the benchmark (benchmarks/bench_opt.py).
# Logs and results go under $OUT (what the device tool brings back; /tmp/gpu-out elsewhere).
# Knobs: OPT_GPU_SHAPES (tests), GATE=0 (skip the dense-engine gate), BENCH_SHAPES, BENCH_ARGS (e.g.
# --ab --profile), MEZO_ARGS (or MEZO_RUNS: 'args; args; ...'), SPREAD_SHAPES, SPREAD_ARGS (e.g. --sets 16), TESTS_TIMEOUT, BENCH_TIMEOUT,
# MEZO_TIMEOUT, SPREAD_TIMEOUT (seconds).
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1
REPO=$PWD
MODE=${1:-all}; shift || true
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
SITE=/tmp/site
STAGE=${STAGE:-$REPO/.stage/device}; case $STAGE in /*) ;; *) STAGE=$REPO/$STAGE;; esac

stamp=$(cat "$STAGE"/MANIFEST.json 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat $SITE/.stage-stamp 2>/dev/null)" != "$stamp" ]; then
  [ -f "$STAGE/core.tar.xz" ] || { echo "no $STAGE/core.tar.xz: run scripts/device/stage.py here and carry .stage/device"; exit 2; }
  rm -rf "$SITE"; mkdir -p "$SITE"
  t0=$(date +%s)
  for a in "$STAGE"/*.tar.xz; do tar -xJf "$a" -C "$SITE" & done; wait
  echo "$stamp" > $SITE/.stage-stamp
  echo "unpacked $(du -sh $SITE | cut -f1) into $SITE in $(( $(date +%s) - t0 ))s"
fi
# The overlay's own files (python/sglang/...: whole new files, no patches) come from this working tree
# on every run, so a change to opt.py needs no restaging; the archives carry the patched upstream files.
(cd "$REPO/python" && find sglang -name '*.py' -exec cp --parents {} "$SITE" \; -print) | tr '\n' ' ' \
  | sed 's/^/overlay files from the working tree: /'; echo
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off (the device's rule), also for subprocesses.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'EOF'
import torch, transformers, sglang, sglang.overlay as ov
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "sglang", sglang.__version__, sglang.__file__)
print("overlay module present:", ov.__file__)
EOF
} 2>&1 | tee "$OUT/env.txt"

rc=0
if [ "$MODE" = smoke ]; then
  OPT_GPU_SHAPES=opt-125m OPT_GPU_REPORT=$OUT/parity.jsonl timeout "${TESTS_TIMEOUT:-300}" \
    python3 -m pytest tests/gpu -q -s -rA -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" || rc=$?
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_opt.py --shapes "${BENCH_SHAPES:-opt-125m}" --iters 5 \
    --decode-steps 16 --json "$OUT/bench.json" ${BENCH_ARGS:---profile} 2>&1 | tee "$OUT/bench.log" || rc=$?
fi
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  if [ "${GATE:-1}" = 1 ]; then  # the dense engine against the backend's path first: stop early if broken
    timeout 240 python3 -m pytest tests/gpu -q -s -rA -p no:cacheprovider -k dense_engine 2>&1 \
      | tee "$OUT/pytest.log" || { echo "run_gpu.sh: dense-engine gate failed"; exit 3; }
  fi
  OPT_GPU_REPORT=$OUT/parity.jsonl timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest tests/gpu -v -s -rA \
    -p no:cacheprovider -k "not dense_engine" "$@" 2>&1 | tee -a "$OUT/pytest.log" || rc=$?
  python3 - "$OUT/parity.jsonl" <<'EOF' 2>&1 | tee "$OUT/parity.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print("| shape | dtype | positions | rel vs HF | argmax vs HF (all) | argmax vs HF (clear, % clear) | rel SGL / HF vs fp32 "
      "| argmax SGL / HF vs fp32 | only SGL / only HF wrong |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {r['rel_vs_hf']:.2e} | {100*r['argmax_vs_hf']:.2f}% | "
          f"{100*r['argmax_vs_hf_clear']:.2f}% ({100*r['clear_positions']:.0f}%) | "
          f"{r['rel_sgl_vs_fp32']:.2e} / {r['rel_hf_vs_fp32']:.2e} | "
          f"{100*r['argmax_sgl_vs_fp32']:.2f}% / {100*r['argmax_hf_vs_fp32']:.2f}% | "
          f"{r['only_sgl_wrong']} / {r['only_hf_wrong']} |")
EOF
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  timeout "${BENCH_TIMEOUT:-560}" python3 benchmarks/bench_opt.py --shapes "${BENCH_SHAPES:-opt-125m,opt-350m,opt-1.3b}" \
    --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || rc=$?
fi
if [ "$MODE" = breakdown ]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/host_breakdown.py "${BENCH_SHAPES:-opt-125m,opt-1.3b}" "$OUT" 2>&1 \
    | tee "$OUT/breakdown.log" || rc=$?
fi
if [ "$MODE" = spread ]; then
  timeout "${SPREAD_TIMEOUT:-500}" python3 benchmarks/parity_spread.py --shapes "${SPREAD_SHAPES:-opt-125m}" \
    --json "$OUT/spread.json" ${SPREAD_ARGS:-} 2>&1 | tee "$OUT/spread.log" || rc=$?
fi
if [ "$MODE" = mezo ]; then
  # MEZO_RUNS: runs separated by ';', each the arguments of one benchmarks/mezo_gpu.py process
  # (default: MEZO_ARGS alone); each writes $OUT/mezo-<k>.json and appends to $OUT/mezo.log.
  IFS=';' read -ra runs <<< "${MEZO_RUNS:-${MEZO_ARGS:-}}"
  for k in "${!runs[@]}"; do
    echo "== mezo_gpu.py ${runs[$k]}" | tee -a "$OUT/mezo.log"
    timeout "${MEZO_TIMEOUT:-400}" python3 benchmarks/mezo_gpu.py --json "$OUT/mezo-$k.json" ${runs[$k]} 2>&1 \
      | tee -a "$OUT/mezo.log" || rc=$?
  done
fi
if [ "$MODE" = zoparts ]; then  # the z pass kernel timed in parts (benchmarks/zo_kernel_parts.py)
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/zo_kernel_parts.py ${ZO_ARGS:-} 2>&1 | tee "$OUT/zoparts.log" || rc=$?
fi
echo "run_gpu.sh $MODE: exit $rc"
exit $rc
