#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (about 11 minutes), run from the repo root:
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu_out when unset)
#
# 1. the test suite on the compiled Triton path (no TRITON_INTERPRET): pytest -m "gpu or not slow"
# 2. the headline comparison: V=151936, 8192 tokens, bf16, presets unisd_star and sd, every
#    provider, torch.compile with static shapes (the strongest baseline), all modes
# 3. the GPU sweep: bf16, V in 32000,128256,151936, tokens 1024,4096,8192,16384, presets
#    unisd_star and sd, providers eager, compile-dynamic (one compilation for every shape,
#    to fit the time), unisd (Triton), unisd-torch and liger (when its wheel is carried);
#    cases that do not fit are reported as oom, those left when the time budget runs out
#    as skipped
# 4. the pytest-benchmark suite at one shape, writing its JSON
# 5. the fused-linear case: hidden states in, N = 8192 tokens (B 4 x T 2048), H = 3584,
#    V = 152064, bf16, presets sd and unisd_star, frozen and trainable head: materialise-eager,
#    materialise-unisd, unisd_linear_loss and Liger's fused-linear JSD (python -m
#    benchmarks.linear; table_linear.md)
# 6. the forward+backward tables, the headline comparison's printed last
#
# The machine has no network. It needs python3 with torch, triton, pytest, pytest-benchmark,
# matplotlib and tqdm (the lent image has them). The package runs from this tree through
# PYTHONPATH. Liger-Kernel is optional: put its wheel in .whl/ at the repo root (see
# benchmarks/README.md) and carry .whl. At most 8 files come back from $OUT, so all but the
# logs, CSVs and tables is packed into gpu_results.tar.gz (plots, JSON, machine.md, the
# fused-linear CSV).
# DRY_RUN=1 runs the same plumbing on CPU with tiny shapes (to check the script itself).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
WORK=$(mktemp -d /tmp/unisd-gpu.XXXXXX)
PY=${PYTHON:-python3}
T_TESTS=${T_TESTS:-140}      # seconds for the test suite
T_HEAD=${T_HEAD:-130}        # seconds for the headline comparison
T_SWEEP=${T_SWEEP:-140}      # sweep time budget (cases not started by then are skipped)
T_SWEEP_KILL=${T_SWEEP_KILL:-190}
T_PYBENCH=${T_PYBENCH:-40}
T_LINEAR=${T_LINEAR:-180}    # seconds for the fused-linear case
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }

DEVICE=cuda
HEAD=(--dtype bf16 --vocab 151936 --tokens 8192 --reps 10 --warmup 2)
HEAD_PROVIDERS=eager,compile,unisd,unisd-torch,liger
SHAPES=(--dtype bf16 --vocab 32000,128256,151936 --tokens 1024,4096,8192,16384
        --anchor-vocab 151936 --anchor-tokens 8192 --reps 10 --warmup 2)
PROVIDERS=eager,compile-dynamic,unisd,unisd-torch,liger
TESTS=(tests -m "gpu or not slow")
PYBENCH=(--bench-vocab 151936 --bench-tokens 4096)
LINEAR=(--batch 4 --seq 2048 --hidden 3584 --vocab 152064 --dtype bf16 --reps 3 --warmup 1)
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1
  HEAD=(--dtype fp32 --vocab 512 --tokens 64 --reps 1 --warmup 0)
  HEAD_PROVIDERS=eager,unisd,liger
  SHAPES=(--dtype fp32 --vocab 256,512 --tokens 32,64 --reps 1 --warmup 0)
  PROVIDERS=eager,unisd,liger
  TESTS=(tests/test_benchmarks_smoke.py -k eager_baseline)
  PYBENCH=(--bench-vocab 256 --bench-tokens 32 --bench-device cpu)
  LINEAR=(--batch 2 --seq 8 --hidden 32 --vocab 3001 --dtype fp32 --reps 1 --warmup 0
          --heads frozen --providers materialise-eager,linear,liger)
fi

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .whl/liger_kernel-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - "$DEVICE" <<'PYEOF' || { echo "python3 with torch (and CUDA) is required"; exit 1; }
import importlib.util, sys, torch, triton
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name())
print("torch", torch.__version__, "triton", triton.__version__)
for m in ("pytest", "pytest_benchmark", "matplotlib", "tqdm", "liger_kernel"):
    print(f"{m}: {'yes' if importlib.util.find_spec(m) else 'MISSING'}")
PYEOF

step "tests on the compiled Triton path (timeout ${T_TESTS}s)"
timeout "$T_TESTS" "$PY" -m pytest "${TESTS[@]}" -q --maxfail=10 -p no:cacheprovider \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit code $? (124 = timed out); end of pytest_gpu.log:"
tail -n 15 "$OUT/pytest_gpu.log"

step "headline: V=151936, 8192 tokens, static torch.compile (timeout ${T_HEAD}s)"
timeout "$T_HEAD" "$PY" -m benchmarks --device "$DEVICE" --presets unisd_star,sd \
  --providers "$HEAD_PROVIDERS" "${HEAD[@]}" --time-budget $((T_HEAD - 40)) \
  --out "$WORK/headline" > "$WORK/headline.log" 2>&1
echo "exit code $?"

step "GPU sweep (budget ${T_SWEEP}s)"
timeout "$T_SWEEP_KILL" "$PY" -m benchmarks --device "$DEVICE" --presets unisd_star,sd \
  --providers "$PROVIDERS" "${SHAPES[@]}" --time-budget "$T_SWEEP" --out "$WORK/sweep" \
  > "$WORK/sweep.log" 2>&1
echo "exit code $?"

step "pytest-benchmark, one shape (timeout ${T_PYBENCH}s)"
timeout "$T_PYBENCH" "$PY" -m pytest benchmarks -q -p no:cacheprovider "${PYBENCH[@]}" \
  --bench-presets unisd_star --bench-modes fwd_bwd --bench-providers eager,unisd \
  --bench-rounds 5 --benchmark-json "$WORK/pytest_benchmark.json" \
  > "$WORK/pytest_benchmark.log" 2>&1
echo "exit code $?"

step "fused-linear, N=8192 H=3584 V=152064 bf16 (timeout ${T_LINEAR}s)"
timeout "$T_LINEAR" "$PY" -m benchmarks.linear --device "$DEVICE" --presets sd,unisd_star \
  --heads frozen,trainable "${LINEAR[@]}" --out "$WORK/linear" > "$WORK/linear.log" 2>&1
echo "exit code $?"
if [ -f "$WORK/linear/table.md" ]; then
  cp "$WORK/linear/table.md" "$OUT/table_linear.md"
  cat "$WORK/linear/table.md"
else
  echo "no results (timed out or failed); end of linear.log:"
  tail -n 30 "$WORK/linear.log"
fi

tar -czf "$OUT/gpu_results.tar.gz" -C "$WORK" . 2>/dev/null
for run in sweep headline; do
  step "$run: forward+backward (all modes in table_$run.md)"
  if [ -f "$WORK/$run/results.csv" ]; then
    cp "$WORK/$run/results.csv" "$OUT/results_$run.csv"
    cp "$WORK/$run/table.md" "$OUT/table_$run.md" 2>/dev/null \
      || echo "(cut short: partial results, no table.md)"
    "$PY" - "$WORK/$run/results.csv" <<'PYEOF'
import sys
from benchmarks.report import markdown_table, read_csv
print(markdown_table(read_csv(sys.argv[1]), ["fwd_bwd"]))
PYEOF
  else
    echo "no results (timed out or failed); end of $run.log:"
    tail -n 30 "$WORK/$run.log"
  fi
done
