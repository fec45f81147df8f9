#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200, at most 8 minutes, run from the repo root:
#
#   bash benchmarks/gpu_check.sh          # results under $OUT (or ./gpu_out when unset)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # every step on CPU at tiny shapes, same budgets
#   PLAN=1 bash benchmarks/gpu_check.sh      # print each step, its budget and command only
#
# Steps, each with its time budget (seconds; a step gets at most what is left before the
# global deadline, DEADLINE seconds after the start, and is skipped when under 10 s are left);
# each step's files are copied into $OUT as soon as it ends:
#   exactness  the compiled Triton path against float64 at the headline shape (N = 8192,
#              V = 151936, bf16, 32 rows in float64), fkl / rkl / jsd, with thresholds
#              (benchmarks.gpu_exactness; exit 1 on any miss), then the test suite's Triton
#              exactness tests on the compiled path
#   kernels    sd, gkd and UniSD*: each kernel alone and the whole loss forward+backward,
#              GB/s as a share of a device copy measured in the same run (benchmarks.gpu_kernels)
#   headline   the same presets and shape forward+backward against eager, static torch.compile
#              and Liger-Kernel's JSD (python -m benchmarks; sd and gkd for Liger)
#   linear     fused linear, N = 8192 (4 x 2048), H = 3584, V = 152064, bf16, sd, frozen and
#              trainable head: materialise-eager, unisd_linear_loss, Liger's fused-linear JSD
#              and TRL 1.16's DistillationTrainer kernel (trl/kernels/chunked_divergence.py;
#              benchmarks.linear)
# A step is one `step NAME BUDGET COMMAND...` line below; a further step (a sparse-teacher or
# a vocab-parallel benchmark module) is one more such line before `finish`.
#
# The exit status is 1 when any step failed or timed out (the log says which), else 0.
# The machine has no network: python3 with torch and triton (the lent image has them); the
# package runs from this tree through PYTHONPATH. Liger-Kernel and TRL are optional: put their
# wheels in .whl/ at the repo root and carry .whl (installed with --no-deps).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-470}
START=$(date +%s)
FAILED=()
PLANNED=0
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

DEVICE=cuda
SHAPE=(--tokens 8192 --vocab 151936 --dtype bf16)
EXACT=("${SHAPE[@]}" --rows 32)
TESTS=(tests/test_exactness.py -k triton)
KERNELS=("${SHAPE[@]}" --reps 10)
HEAD=(--presets sd,gkd,unisd_star --providers eager,compile,unisd,liger --dtype bf16
      --vocab 151936 --tokens 8192 --modes fwd_bwd --reps 5 --warmup 1)
LINEAR=(--presets sd --heads frozen,trainable --batch 4 --seq 2048 --hidden 3584
        --vocab 152064 --dtype bf16 --reps 3 --warmup 1
        --providers materialise-eager,linear,liger,trl)
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1
  SHAPE=(--tokens 4 --vocab 600 --dtype bf16)
  EXACT=("${SHAPE[@]}" --rows 2 --divergences fkl)
  TESTS=(tests/test_exactness.py -k "triton and masked and fkl")
  KERNELS=("${SHAPE[@]}" --reps 1 --presets sd --copy-bytes 1000000)
  HEAD=(--presets sd --providers eager,unisd --dtype fp32 --vocab 512 --tokens 64
        --modes fwd_bwd --reps 1 --warmup 0 --no-errors)
  LINEAR=(--presets sd --heads frozen --batch 2 --seq 8 --hidden 32 --vocab 3001
          --dtype fp32 --reps 1 --warmup 0 --providers materialise-eager,linear)
fi

# step NAME BUDGET COMMAND...: runs COMMAND with its output in $OUT/NAME.log and the folder
# $OUT/NAME as its --out, within BUDGET seconds and the time left before the deadline.
step() {
  local name=$1 budget=$2
  shift 2
  PLANNED=$((PLANNED + budget))
  local left=$((DEADLINE - ($(date +%s) - START)))
  local limit=$((budget < left ? budget : left))
  echo
  echo "=== $name: budget ${budget}s, ${left}s left before the deadline ($(date +%T))"
  if [ "${PLAN:-0}" = 1 ]; then
    echo "$*"
    return
  fi
  if [ "$limit" -lt 10 ]; then
    echo "skipped: under 10 s left"
    FAILED+=("$name (skipped)")
    return
  fi
  mkdir -p "$OUT/$name"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "exit code $rc (124 = over its ${limit}s) in $(($(date +%s) - t0))s; end of $name.log:"
  tail -n 25 "$OUT/$name.log"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
}

finish() {
  echo
  echo "=== done in $(($(date +%s) - START))s; step budgets ${PLANNED}s, deadline ${DEADLINE}s"
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
  fi
  echo "all steps passed"
  exit 0
}

echo "=== environment"
[ "${PLAN:-0}" = 1 ] || {
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site "$wheel" && export PYTHONPATH="$PYTHONPATH:/tmp/site"
done
"$PY" - "$DEVICE" <<'PYEOF' || { echo "python3 with torch (and CUDA) is required"; exit 1; }
import importlib.util, sys, torch, triton
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name())
print("torch", torch.__version__, "triton", triton.__version__)
for m in ("liger_kernel", "trl", "pytest"):
    print(f"{m}: {'yes' if importlib.util.find_spec(m) else 'MISSING'}")
PYEOF
}

step exactness 90 "$PY" -m benchmarks.gpu_exactness --device "$DEVICE" "${EXACT[@]}" \
  --out "$OUT/exactness"
step tests 60 "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider
step kernels 60 "$PY" -m benchmarks.gpu_kernels --device "$DEVICE" "${KERNELS[@]}" \
  --out "$OUT/kernels"
step headline 130 "$PY" -m benchmarks --device "$DEVICE" "${HEAD[@]}" --time-budget 100 \
  --out "$OUT/headline"
step linear 110 "$PY" -m benchmarks.linear --device "$DEVICE" "${LINEAR[@]}" \
  --out "$OUT/linear"
finish
