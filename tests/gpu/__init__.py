"""GPU tests: run on the device with scripts/device/run_gpu.sh; skipped where CUDA is missing."""
