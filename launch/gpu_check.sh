#!/usr/bin/env bash
# The GPU check of the kernel backends, on a machine with an NVIDIA GPU, in under 8 minutes:
#   1. the kernel correctness tests compiled, not in interpret mode (SVDQUANT_KERNEL_TESTS=native):
#      tests/test_kernels.py and tests/test_mosaic_gpu_native.py (every backend's KernelTestBase
#      subclass, the Mosaic GPU kernel in its three forms, exact kernel 1, the integer GEMM bit for
#      bit), tests/test_ptx_compile.py (the production tiles at every masking edge;
#      its sm_90 compile checks skip there, they are CPU-side) and tests/test_dense.py (the layer
#      on the default backend, which is the GPU kernel there);
#   2. launch/benchmark_kernels.py at the FLUX.1 1024x1024 shapes (Triton, and the Mosaic GPU
#      kernel's table tile, two-warpgroup and packed-weight forms), one layer at a time within the
#      time left: its tables on stdout, <out>/<layer>/results.{json,md} and <out>/benchmark.json.
#
#   launch/gpu_check.sh [OUT_DIR]      # default: $OUT, else outputs/gpu_check
#
# PYTHON: the interpreter (default .venv/bin/python if present, else python3). BENCH_FLAGS: flags
# for the benchmark (default below: rank 32, 3 rounds of 10 calls, 2 input sets). Wheels in .whl/
# (packages the machine lacks, e.g. ml_collections) are installed into a temporary folder first.
# Exit status: 0 only if the tests and every benchmarked layer pass.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
out=${1:-${OUT:-outputs/gpu_check}}
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
bench_flags=${BENCH_FLAGS:---ranks=32 --rounds=3 --iters=10 --rotate=2 --warmup=2}
fail() { echo "gpu_check: $*" >&2; exit 1; }

command -v nvidia-smi > /dev/null || fail "no nvidia-smi: this machine has no NVIDIA GPU driver"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl || fail "installing .whl/ failed"
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$py" - <<'EOF' || exit 1
import importlib.util, sys
missing = [m for m in ("jax", "flax", "ml_collections", "absl", "ml_dtypes", "pytest") if not importlib.util.find_spec(m)]
if missing:
  sys.exit(f"gpu_check: missing Python packages {missing}: put their wheels into .whl/")
import jax
gpus = [d for d in jax.devices() if d.platform == "gpu"]
if not gpus:
  sys.exit(f"gpu_check: jax {jax.__version__} sees no GPU (devices: {jax.devices()})")
print(f"gpu_check: jax {jax.__version__} on {gpus[0].device_kind}")
EOF
mkdir -p "$out"

SVDQUANT_KERNEL_TESTS=native timeout 200 "$py" -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_mosaic_gpu_native.py tests/test_ptx_compile.py tests/test_dense.py 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}

bench=0
for layer in qkv out fc1 fc2 single_in single_out; do
  left=$((470 - (SECONDS - start)))
  if [ "$left" -lt 40 ]; then echo "gpu_check: $layer skipped (time budget)"; bench=1; continue; fi
  # shellcheck disable=SC2086
  timeout "$left" "$py" launch/benchmark_kernels.py --out_dir="$out/$layer" --layers="$layer" $bench_flags \
    2>&1 | tee "$out/$layer.log" || bench=1
done
"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))}
(out / "benchmark.json").write_text(json.dumps(runs, indent=1))
print(f"gpu_check: {out / 'benchmark.json'} holds layers {sorted(runs)}")
EOF
echo "gpu_check: tests exit $tests, benchmark $([ $bench = 0 ] && echo ok || echo FAILED), $((SECONDS - start)) s; logs in $out"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
