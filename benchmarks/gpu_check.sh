#!/usr/bin/env bash
# One-call GPU check of fastnca on a lent GPU (H100/H200): compiled kernel tests, the quick benchmark, and two
# 1-minute mnist-doubling training runs (fused vs reference). Finishes inside ~9 minutes.
#
# Usage:  bash benchmarks/gpu_check.sh OUTDIR
#   device tool: run(command="bash benchmarks/gpu_check.sh $OUT", carry=["gpu_data"], timeout_s=600)
#   before the call, here:  mkdir -p gpu_data && cp /work/shared/data/binarized_mnist.npz gpu_data/ &&
#                           git rev-parse HEAD > gpu_data/COMMIT
#
# Writes 7 files into OUTDIR (the device tool brings back at most 8, at most 2 folders down):
#   gpu_check.log  everything the stages printed, with timestamps      tests.txt  pytest output (tests/kernels)
#   bench.json / bench.md  the quick benchmark (python -m benchmarks --quick)
#   train_triton.jsonl / train_torch.jsonl  metrics rows of the two training runs
#   summary.md  the short table printed last
# Environment knobs: GPU_CHECK_DEADLINE_S (default 555: every stage is capped to end by then),
#   GPU_CHECK_STAGES (default "tests bench train"), GPU_CHECK_IMPORT (auto | editable | shim), PYTHON (python3).
# The image has no package registry: nothing is downloaded. Missing pytest-benchmark or nvidia-ml-py only
# removes the rows/columns that need them.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE_S:-555}
STAGES=${GPU_CHECK_STAGES-tests bench train}
LOG=$OUT/gpu_check.log
TMP=$(mktemp -d /tmp/gpu_check.XXXXXX)
T0=$SECONDS
export PYTHONUNBUFFERED=1 FASTNCA_CACHE=$TMP/cache
unset TRITON_INTERPRET  # the kernels must be compiled for the GPU, not interpreted

log() { echo "[gpu_check +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
# cap WANT RESERVE: WANT seconds, or fewer so that RESERVE seconds remain for the later stages before DEADLINE
cap() {
  local want=$1 left=$((DEADLINE - (SECONDS - T0) - $2))
  ((left < want)) && want=$left
  ((want < 10)) && want=10
  echo "$want"
}
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

: >"$LOG"
log "fastnca gpu_check in $ROOT -> $OUT (deadline ${DEADLINE}s, stages: $STAGES)"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda available', torch.cuda.is_available())"
  $PY -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" ||
    echo "pytest-benchmark missing: the bench_*.py suites skip; the runner does not need it"
  $PY -c "import pynvml; pynvml.nvmlInit(); print('nvidia-ml-py ok')" ||
    echo "nvidia-ml-py/NVML missing: power, energy and NVML memory columns stay empty"
} >>"$LOG" 2>&1
[[ -f gpu_data/COMMIT && -z "${FASTNCA_COMMIT:-}" ]] && ! git rev-parse HEAD >/dev/null 2>&1 &&
  export FASTNCA_COMMIT="$(head -c 200 gpu_data/COMMIT | tr '\n' ' ')"

# ---- 1. make `fastnca` and `fastnca.kernels` importable without downloads
IMPORT_MODE=${GPU_CHECK_IMPORT:-auto}
IMPORT=failed
check_import() { (cd "$TMP" && $PY -c "import fastnca, fastnca.kernels.reference") >>"$LOG" 2>&1; }
if [[ $IMPORT_MODE != shim ]] &&
  timeout 120 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >>"$LOG" 2>&1 &&
  check_import; then
  IMPORT="pip install --no-deps -e ."
fi
if [[ $IMPORT == failed && $IMPORT_MODE != editable ]]; then
  # kernels/ is mapped to fastnca.kernels by pyproject's package-dir; the shim's sitecustomize does the same
  export PYTHONPATH="$ROOT/benchmarks/_import_shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  check_import && IMPORT="PYTHONPATH + benchmarks/_import_shim"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log "import: $IMPORT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" >>"$LOG" 2>&1 ||
  log "WARNING: torch sees no CUDA device; the stages below run on the CPU and prove nothing about the GPU"

RC_TESTS=skipped RC_BENCH=skipped RC_TRITON=skipped RC_TORCH=skipped

# ---- 2. kernel parity tests, compiled (tests/conftest.py sets TRITON_INTERPRET only without CUDA)
if has_stage tests; then
  TT=$(cap 120 370)
  log "tests: python -m pytest tests/kernels -q (timeout ${TT}s)"
  timeout "$TT" $PY -m pytest tests/kernels -q -p no:cacheprovider -rfEs >"$OUT/tests.txt" 2>&1
  RC_TESTS=$?
  ((RC_TESTS == 124)) && echo "gpu_check: tests stopped by the ${TT}s timeout" >>"$OUT/tests.txt"
  tail -n 25 "$OUT/tests.txt" >>"$LOG"
  log "tests: rc $RC_TESTS"
fi

# ---- 3. quick benchmark (rows not started within its time budget are recorded as skipped)
if has_stage bench; then
  BT=$(cap 270 185)
  log "bench: python -m benchmarks --quick (timeout ${BT}s, row budget $((BT - 75))s)"
  timeout "$BT" $PY -m benchmarks --quick --out "$OUT" --time-budget $((BT - 75)) >>"$LOG" 2>&1
  RC_BENCH=$?
  log "bench: rc $RC_BENCH"
fi

# ---- 4. mnist-doubling training, fused then reference: same seed and data, so losses match step by step
if has_stage train; then
  if [[ ! -f gpu_data/binarized_mnist.npz ]]; then
    log "train: gpu_data/binarized_mnist.npz missing (copy /work/shared/data/binarized_mnist.npz there and carry gpu_data)"
    RC_TRITON=no-data RC_TORCH=no-data
  else
    for backend in triton torch; do
      reserve=$([[ $backend == triton ]] && echo 95 || echo 8)
      TT=$(cap 95 "$reserve")
      TL=$((TT - 35 < 60 ? TT - 35 : 60))
      ((TL < 5)) && TL=5
      log "train: --set backend=$backend --time-limit $TL (timeout ${TT}s)"
      timeout "$TT" $PY -m fastnca train --preset mnist-doubling --set backend=$backend --set log_every=10 \
        --set eval_every=0 --set ckpt_every=0 --set eval_samples=8 --set eval_batches=1 \
        --out "$TMP/train_$backend" --data-dir gpu_data --time-limit "$TL" --device cuda --no-progress \
        >>"$LOG" 2>&1
      rc=$?
      [[ -f $TMP/train_$backend/metrics.jsonl ]] && cp "$TMP/train_$backend/metrics.jsonl" "$OUT/train_$backend.jsonl"
      if [[ $backend == triton ]]; then RC_TRITON=$rc; else RC_TORCH=$rc; fi
      log "train $backend: rc $rc"
    done
  fi
fi

# ---- 5. summary, printed last
log "done in $((SECONDS - T0))s"
$PY -m benchmarks.summarize "$OUT" --rc tests=$RC_TESTS bench=$RC_BENCH train_triton=$RC_TRITON \
  train_torch=$RC_TORCH --note "import: $IMPORT; total $((SECONDS - T0)) s; stages: $STAGES" >>"$LOG" 2>&1
cat "$OUT/summary.md" 2>/dev/null || echo "gpu_check: no summary.md (see gpu_check.log)"
rm -rf "$TMP"
