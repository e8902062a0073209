#!/usr/bin/env bash
# Issue 7's GPU checks in one go, on a machine with a CUDA GPU and the project importable:
#   1. jobs/cifar10-fast.yaml (airbench94's recipe, bf16, channels_last, torch.compile) on the
#      real CIFAR-10 train set with its held-out split;
#   2. benchmarks/train_overhead.py --gpu (Ray Train against plain PyTorch, same Worker);
#   3. benchmarks/serve.py --gpu ((a) VisionRay split and combined, (b) plain Serve, (c) raw forward).
# Each step has its own time limit and log; a failing step does not stop the next.
#
#   benchmarks/gpu_suite.sh OUT_DIR [CIFAR10_TAR]      (default ../shared/data/cifar10/train.tar.gz)
# Environment: PYTHON (default python3), RUNS (training run storage, default OUT_DIR/runs).
set -u
out=$(realpath -m "${1:?usage: gpu_suite.sh OUT_DIR [CIFAR10_TAR]}")
cifar=$(realpath -m "${2:-../shared/data/cifar10/train.tar.gz}")
runs=$(realpath -m "${RUNS:-$out/runs}")
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
"$py" - <<'PY' 2>&1 | tee "$out/env.log"
import platform, torch, ray
print(platform.python_version(), "torch", torch.__version__, "ray", ray.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/env.log"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/steps.log"
    tail -n 25 "$out/$name.log"
}

step cifar10_fast 180 "$py" -m visionray.cli train jobs/cifar10-fast.yaml \
    --set data.path="$cifar" --set output.storage="$runs" --set output.name=cifar10-fast
find "$runs" -name "metrics.csv" -exec cp {} "$out/cifar10_fast_metrics.csv" \; 2>/dev/null
step train_overhead 140 "$py" benchmarks/train_overhead.py --gpu --samples 50000 --epochs 5 \
    --out "$out/train_overhead_gpu.json"
step serve 260 "$py" benchmarks/serve.py --gpu --duration 5 --out "$out/serve_gpu.json"
