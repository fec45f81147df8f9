#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (about 8 minutes), run from the repo root:
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu_out when unset)
#
# 1. the test suite on the compiled Triton path (no TRITON_INTERPRET): pytest -m "gpu or not slow"
# 2. the GPU sweep: bf16, V in 32000,128256,151936, tokens 1024,4096,8192,16384 (8192 at
#    V=151936 is the forward+backward comparison asked for by issue 3), presets unisd_star and
#    sd, providers eager, compile, unisd (Triton), unisd-torch and liger (when its wheel is
#    carried); cases that do not fit are reported as oom, cases left when the time budget
#    runs out as skipped
# 3. the pytest-benchmark suite at one shape, writing its JSON
# 4. the markdown table, printed last
#
# The machine has no network. It needs python3 with torch, triton, pytest, pytest-benchmark,
# matplotlib and tqdm (the lent image has them). The package runs from this tree through
# PYTHONPATH. Liger-Kernel is optional: put its wheel in .whl/ beside this repo root (see
# benchmarks/README.md) and carry .whl. At most 8 files come back from $OUT, so everything
# but the logs, the CSV and the table is packed into gpu_results.tar.gz.
# DRY_RUN=1 runs the same plumbing on CPU with tiny shapes (to check the script itself).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
WORK=$(mktemp -d /tmp/unisd-gpu.XXXXXX)
PY=${PYTHON:-python3}
T_TESTS=${T_TESTS:-170}      # seconds for the test suite
T_SWEEP=${T_SWEEP:-200}      # sweep time budget (cases not started by then are skipped)
T_SWEEP_KILL=${T_SWEEP_KILL:-300}
T_PYBENCH=${T_PYBENCH:-60}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
DEVICE=cuda
SHAPES=(--dtype bf16 --vocab 32000,128256,151936 --tokens 1024,4096,8192,16384
        --anchor-vocab 151936 --anchor-tokens 8192 --reps 10 --warmup 2)
PROVIDERS=eager,compile,unisd,unisd-torch,liger
TESTS=(tests -m "gpu or not slow")
PYBENCH=(--bench-vocab 151936 --bench-tokens 4096)
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1
  SHAPES=(--dtype fp32 --vocab 256,512 --tokens 32,64 --reps 1 --warmup 0)
  PROVIDERS=eager,unisd,liger
  TESTS=(tests/test_benchmarks_smoke.py -k eager_baseline)
  PYBENCH=(--bench-vocab 256 --bench-tokens 32 --bench-device cpu)
fi

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/liger_kernel-*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - "$DEVICE" <<'EOF' || { echo "python3 with torch+CUDA is required"; exit 1; }
import importlib.util, sys, torch, triton
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name())
print("torch", torch.__version__, "triton", triton.__version__)
for m in ("pytest", "pytest_benchmark", "matplotlib", "tqdm", "liger_kernel"):
    print(f"{m}: {'yes' if importlib.util.find_spec(m) else 'MISSING'}")
EOF

step "tests on the compiled Triton path (timeout ${T_TESTS}s)"
timeout "$T_TESTS" "$PY" -m pytest "${TESTS[@]}" -q --maxfail=10 -p no:cacheprovider \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit code $? (124 = timed out); tail of $OUT/pytest_gpu.log:"
tail -n 15 "$OUT/pytest_gpu.log"

step "GPU sweep (budget ${T_SWEEP}s)"
timeout "$T_SWEEP_KILL" "$PY" -m benchmarks --device "$DEVICE" --presets unisd_star,sd \
  --providers "$PROVIDERS" "${SHAPES[@]}" --time-budget "$T_SWEEP" --out "$WORK/sweep" \
  > "$WORK/sweep.log" 2>&1
echo "sweep exit code $?"
tail -n 5 "$WORK/sweep.log"

step "pytest-benchmark, one shape (timeout ${T_PYBENCH}s)"
timeout "$T_PYBENCH" "$PY" -m pytest benchmarks -q -p no:cacheprovider "${PYBENCH[@]}" \
  --bench-presets unisd_star --bench-modes fwd_bwd --bench-providers eager,compile,unisd \
  --bench-rounds 5 \
  --benchmark-json "$WORK/pytest_benchmark.json" > "$WORK/pytest_benchmark.log" 2>&1
echo "pytest-benchmark exit code $?"

cp "$WORK/sweep/results.csv" "$OUT/results.csv" 2>/dev/null
tar -czf "$OUT/gpu_results.tar.gz" -C "$WORK" . 2>/dev/null
if [ -f "$WORK/sweep/table.md" ]; then
  "$PY" -m benchmarks --report "$WORK/sweep/results.csv" --out "$WORK/sweep" > /dev/null 2>&1
  cp "$WORK/sweep/table.md" "$OUT/table.md"
  step "table (forward+backward; full table in table.md)"
  "$PY" - "$WORK/sweep/results.csv" <<'EOF'
import sys
from benchmarks.report import markdown_table, read_csv
print(markdown_table(read_csv(sys.argv[1]), ["fwd_bwd"]))
EOF
else
  echo "no table: the sweep wrote none (see sweep.log in gpu_results.tar.gz)"
  tail -n 30 "$WORK/sweep.log"
fi
