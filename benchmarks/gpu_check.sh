#!/usr/bin/env bash
# One-command GPU check of fastnca: measures, profiles and records in <= 9 minutes on one CUDA GPU.
#
# Usage:  bash benchmarks/gpu_check.sh OUTDIR [--data-dir DIR] [--tiny]
#
# Needs: a CUDA GPU, Python with PyTorch >= 2.11 and Triton >= 3.6 installed; no network, no package index.
# Data: --data-dir DIR (a folder holding binarized_mnist.npz), else $FASTNCA_DATA, else fastnca's default.
# Commit: read with git; in a copy without .git, set FASTNCA_COMMIT=<sha> so that the results name it.
# --tiny: the CPU dry run (tiny sizes, Triton interpreter, no ncu): checks every stage's code path.
#
# Stages (each capped; the whole run ends by GPU_CHECK_DEADLINE_S, default 530 s; a failing stage does not stop
# the others, and a missing tool turns its stage into a one-line note):
#   env       GPU, clocks, driver, torch/triton versions, optional tools
#   fit       python -m fastnca.kernels.fit --json (every shipped fwd/bwd/rollout/likelihood kernel compiled for sm_90
#             with the installed Triton: registers, spills, shared memory, HGMMA); runs in the background from the
#             start, FASTNCA_FIT_JOBS compiles at once (default: CPUs, at most 8), rows written pass by pass
#   tests     python -m pytest tests/kernels --ignore-glob='tests/kernels/test_fit*.py' (compiled kernels,
#             TRITON_INTERPRET unset; the fit tests are the fit stage), then python -m pytest tests/model
#             -m 'gpu and not slow' (CUDA graph replay vs eager, the memory model vs the measured peak)
#   bench     python -m benchmarks --quick (with the small-grid vs per-step rows: rollout-mnist-doubling-early,
#             rollout-bwd-mnist-doubling, train-mnist-doubling; triton-bf16 against triton-bf16-perstep)
#   launches  python -m fastnca.launches --preset mnist-doubling --json (kernel launches per training iteration)
#   profile   python -m benchmarks.profiling (torch.profiler: top kernels, GPU-busy vs wall time)
#   train     time to quality: mnist-doubling, fused (bf16) then reference (fp32; cuDNN TF32 convolutions, PyTorch's
#             default) backend, the same wall-clock budget each (python -m benchmarks.ttq: fastnca's Trainer
#             without the final evaluation and pictures); the notes say which precision each ran
#   ncu       Nsight Compute on the fused step forward + backward (only where ncu exists and is permitted)
#
# Writes 7 files into OUTDIR (no sub-folders; each well under 16 MiB):
#   summary.md   the headline table (printed last)        check.json  everything, machine-readable
#   details.md   fit table, profile tables, ncu counters,  time-to-quality curves
#   gpu_check.log  every stage's output with timestamps   tests.txt  pytest output: kernel tests, then model tests
#   bench.json / bench.md  the quick benchmark
# Record the run:  python -m benchmarks.record OUTDIR   (appends a dated section to benchmarks/RESULTS.md)
#
# Knobs: GPU_CHECK_DEADLINE_S, GPU_CHECK_STAGES (default "env fit tests bench launches profile train ncu"),
#   GPU_CHECK_TRAIN_S (seconds of training per backend, default 40), GPU_CHECK_TRAIN_FUSED_SETS (the fused run's
#   extra options, default "--set precision=bf16"), GPU_CHECK_TESTS / GPU_CHECK_MODEL_TESTS (the tests stage's two
#   pytest arguments; an empty GPU_CHECK_MODEL_TESTS skips the model tests), GPU_CHECK_FIT_ARGS, FASTNCA_FIT_JOBS,
#   GPU_CHECK_IMPORT (auto | editable | shim), PYTHON (default python3).
set -u
usage="usage: bash benchmarks/gpu_check.sh OUTDIR [--data-dir DIR] [--tiny]"
OUTDIR=${1:?$usage}
shift
DATA_DIR=${FASTNCA_DATA:-}
TINY=0
while (($#)); do
  case $1 in
    --data-dir) DATA_DIR=${2:?$usage}; shift 2 ;;
    --data-dir=*) DATA_DIR=${1#*=}; shift ;;
    --tiny) TINY=1; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
[[ -n $DATA_DIR ]] && DATA_DIR=$(cd "$DATA_DIR" 2>/dev/null && pwd || echo "$DATA_DIR")
# (the tests read their data through FASTNCA_DATA; the training stage gets --data-dir)
[[ -n $DATA_DIR ]] && export FASTNCA_DATA=$DATA_DIR
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
# (the dry run's caps and deadline are x3: upper bounds for a slow CPU, not what it takes)
DEADLINE=${GPU_CHECK_DEADLINE_S:-$( ((TINY)) && echo 1590 || echo 530)}
SLOW=$( ((TINY)) && echo 3 || echo 1) # the dry run's interpreted kernels on a small CPU: caps x 3
STAGES=${GPU_CHECK_STAGES-env fit tests bench launches profile train ncu}
TRAIN_S=${GPU_CHECK_TRAIN_S:-40}
LOG=$OUTDIR/gpu_check.log
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PARTS=$TMP/parts
mkdir -p "$PARTS"
T0=$SECONDS
export PYTHONUNBUFFERED=1 FASTNCA_CACHE=$TMP/cache
if ((TINY)); then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  DEV=cpu
else
  unset TRITON_INTERPRET # the kernels must be compiled for the GPU, not interpreted
  DEV=cuda
fi

log() { echo "[gpu_check +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
# cap WANT RESERVE: WANT seconds, or fewer so that RESERVE seconds remain for the later stages before DEADLINE
cap() {
  local want=$(($1 * SLOW)) left=$((DEADLINE - (SECONDS - T0) - $2 * SLOW))
  ((left < want)) && want=$left
  ((want < 10)) && want=10
  echo "$want"
}
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
# stage_done NAME RC SECONDS NOTE: one line per stage for the summary (rc: an exit code, "skipped" or "note")
stage_done() {
  local note
  note=$(printf '%s' "$4" | tr '\t\n' '  ' | sed 's/ *$//' | cut -c1-300)
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$note" >>"$PARTS/stages.tsv"
  log "$1: rc $2 (${3}s)${4:+ - $4}"
}

: >"$LOG"
log "fastnca gpu_check in $ROOT -> $OUTDIR (deadline ${DEADLINE}s, stages: $STAGES$( ((TINY)) && echo '; tiny CPU dry run'))"

# ---- setup: make `fastnca` and `fastnca.kernels` of this checkout importable, without installing anything
# (auto: use an install of this checkout if there is one, else PYTHONPATH plus benchmarks/_import_shim, whose
# sitecustomize maps fastnca.kernels to kernels/ as pyproject's package-dir does; editable: pip install -e .)
IMPORT_MODE=${GPU_CHECK_IMPORT:-auto}
IMPORT=failed
check_import() { (cd "$TMP" && $PY -c "
import pathlib, sys, fastnca, fastnca.kernels.reference as r
sys.exit(pathlib.Path(r.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())" "$ROOT") >>"$LOG" 2>&1
}
if [[ $IMPORT_MODE == auto ]] && check_import; then
  IMPORT="already installed from this checkout"
fi
if [[ $IMPORT == failed && $IMPORT_MODE == editable ]] &&
  timeout 60 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >>"$LOG" 2>&1 &&
  check_import; then
  IMPORT="pip install --no-deps -e ."
fi
if [[ $IMPORT == failed ]]; then
  export PYTHONPATH="$ROOT/benchmarks/_import_shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  check_import && IMPORT="PYTHONPATH + benchmarks/_import_shim"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log "import: $IMPORT"
if ((!TINY)) && ! $PY -c "import torch; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
  log "WARNING: torch sees no CUDA device: the stages below prove nothing about a GPU"
  DEV=cpu
fi

# ---- env
if has_stage env; then
  t=$SECONDS
  {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,temperature.gpu --format=csv
    command -v nvidia-smi >/dev/null || echo "nvidia-smi: not found"
  } >"$PARTS/nvidia-smi.txt" 2>&1
  cat "$PARTS/nvidia-smi.txt" >>"$LOG"
  timeout 60 $PY -c "import sys; from benchmarks.summarize import write_env; write_env(sys.argv[1], sys.argv[2])" \
    "$PARTS/env.json" "$DEV" >"$TMP/env.out" 2>&1
  rc=$?
  cat "$TMP/env.out" >>"$LOG"
  stage_done env $rc $((SECONDS - t)) "$(tail -n 1 "$TMP/env.out")"
fi

# ---- fit: CPU-only compiles, in the background from here on (its own cap)
FIT_PID=
if has_stage fit; then
  FIT_T=$SECONDS
  FIT_CAP=$(cap 150 40)
  FIT_ARGS=${GPU_CHECK_FIT_ARGS:-$( ((TINY)) && echo "--only fwd")}
  log "fit: python -m fastnca.kernels.fit --json $FIT_ARGS (background, timeout ${FIT_CAP}s)"
  (
    # the fit compiles with triton.compile; under the interpreter it starts its own child without it
    timeout "$FIT_CAP" $PY -m fastnca.kernels.fit --json $FIT_ARGS >"$PARTS/fit.jsonl" 2>"$PARTS/fit.err"
    echo "$? $((SECONDS - FIT_T))" >"$PARTS/fit.rc" # its exit code and when it ended
  ) &
  FIT_PID=$!
fi
fit_wait() {
  [[ -z $FIT_PID ]] && return
  wait "$FIT_PID"
  FIT_PID=
  local rc note secs
  read -r rc secs 2>/dev/null <"$PARTS/fit.rc" || rc=missing
  secs=${secs:-$((SECONDS - FIT_T))}
  tail -n 5 "$PARTS/fit.err" >>"$LOG" 2>/dev/null
  note=$($PY -c "import sys; from benchmarks.summarize import fit_note; print(fit_note(sys.argv[1]))" \
    "$PARTS" 2>>"$LOG")
  [[ $rc == 124 ]] && note="stopped by its timeout; $note"
  [[ $rc != 0 && $rc != 124 ]] && note="failed: $(tail -n 1 "$PARTS/fit.err" 2>/dev/null | cut -c1-200); $note"
  stage_done fit "$rc" "$secs" "$note"
  if grep -q "SPILL" <<<"$note"; then
    log "!!!!!!!! REGISTER SPILLS on this Triton: $note !!!!!!!!"
  fi
}

# ---- tests: the kernel parity tests, compiled (tests/conftest.py sets TRITON_INTERPRET only without CUDA), then the
# GPU-marked model tests (CUDA graph replay vs eager, the memory model vs the measured peak); both in tests.txt
# run_pytest LABEL SECONDS ARGS...: one pytest run appended to tests.txt under a '### gpu_check: LABEL' header. At the
# timeout pytest gets SIGINT (set to KeyboardInterrupt even where the shell ignores it), so it still prints its
# summary line of what ran; SIGKILL 15 s later if it does not stop.
run_pytest() {
  local label=$1 secs=$2 rc
  shift 2
  echo "### gpu_check: $label: python -m pytest $* (timeout ${secs}s)" >>"$OUTDIR/tests.txt"
  log "tests: $label: python -m pytest $* (timeout ${secs}s)"
  timeout -s INT -k 15 "$secs" $PY -c "import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))" "$@" -q -p no:cacheprovider -rfEs >>"$OUTDIR/tests.txt" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && printf '\ngpu_check: stopped by the %ss timeout (rc %s)\n' "$secs" $rc >>"$OUTDIR/tests.txt"
  return $rc
}
if has_stage tests; then
  t=$SECONDS
  TT=$(cap 120 330)
  : >"$OUTDIR/tests.txt"
  # the kernel tests first, leaving the model tests at least MT s (they get whatever the kernel tests leave)
  MT=$((45 * SLOW < TT / 3 ? 45 * SLOW : TT / 3))
  if ((TINY)); then TARGS=${GPU_CHECK_TESTS:-"tests/kernels/test_nca_step_fwd.py -k 'bad_input or empty_batch'"}
  # the sm_90 fit tests (test_fit*.py) compile what the fit stage compiles (and reports) in the background: not twice
  else TARGS=${GPU_CHECK_TESTS:-"tests/kernels --ignore-glob='tests/kernels/test_fit*.py'"}; fi
  MARGS=${GPU_CHECK_MODEL_TESTS-"tests/model -m 'gpu and not slow'"}
  eval "run_pytest kernel $((TT - MT)) $TARGS"
  rc=$?
  if [[ -n $MARGS ]]; then
    left=$((TT - (SECONDS - t)))
    ((left < 10)) && left=10
    eval "run_pytest model $left $MARGS"
    mrc=$?
    # pytest's 5: every model test deselected (no GPU-marked test here)
    ((rc == 0 && mrc != 5)) && rc=$mrc
  fi
  tail -n 25 "$OUTDIR/tests.txt" >>"$LOG"
  stage_done tests $rc $((SECONDS - t)) "$($PY -c "import sys; from benchmarks.summarize import pytest_line
print(pytest_line(open(sys.argv[1]).read()))" "$OUTDIR/tests.txt" 2>/dev/null)"
fi

# ---- bench: the quick benchmark (rows not started within its time budget are recorded as skipped)
if has_stage bench; then
  t=$SECONDS
  BT=$(cap 150 200)
  # the quick plan holds small-grid vs per-step rows (issue 11); the dry run checks the early case's code path
  if ((TINY)); then BARGS="--tiny --device cpu --no-peaks --cases step rollout-mnist-doubling-early \
    --backends torch-fp32 triton-bf16 triton-bf16-perstep"
  else BARGS="--quick --time-budget $((BT - 60 > 10 ? BT - 60 : 10))"; fi
  log "bench: python -m benchmarks $BARGS (timeout ${BT}s)"
  timeout "$BT" $PY -m benchmarks $BARGS --out "$OUTDIR" >>"$LOG" 2>&1
  stage_done bench $? $((SECONDS - t)) ""
fi

# ---- launches: kernel launches per training iteration (fastnca.launches, if this checkout has it)
if has_stage launches; then
  t=$SECONDS
  LT=$(cap 40 160)
  if ! (cd "$TMP" && $PY -c "import fastnca.launches") >>"$TMP/launches.err" 2>&1; then
    stage_done launches note 0 "fastnca.launches is not in this checkout: no launch count"
  else
    LP=$( ((TINY)) && echo small || echo mnist-doubling)
    # on the CPU the interpreter would run every kernel for minutes: count the launches and skip their bodies
    LX=$([[ $DEV == cpu ]] && echo --no-execute)
    log "launches: python -m fastnca.launches --preset $LP --device $DEV --json $LX (timeout ${LT}s)"
    timeout "$LT" $PY -m fastnca.launches --preset "$LP" --device "$DEV" --json $LX >"$PARTS/launches.out" 2>>"$LOG"
    rc=$?
    cat "$PARTS/launches.out" >>"$LOG"
    stage_done launches $rc $((SECONDS - t)) "$($PY -c "import sys; from benchmarks.summarize import launches_note
print(launches_note(sys.argv[1]))" "$PARTS" 2>>"$LOG")"
  fi
fi

# ---- profile: torch.profiler over a training iteration (bf16, fp32) and the headline step fwd+bwd
if has_stage profile; then
  t=$SECONDS
  PT=$(cap 60 130)
  PARGS=$( ((TINY)) && echo "--tiny --device cpu")
  log "profile: python -m benchmarks.profiling $PARGS (timeout ${PT}s)"
  timeout "$PT" $PY -m benchmarks.profiling $PARGS --json "$PARTS/profile.json" --md "$PARTS/profile.md" \
    >>"$LOG" 2>&1
  rc=$?
  stage_done profile $rc $((SECONDS - t)) "$( ((rc == 124)) && echo "stopped by its ${PT}s timeout")"
fi

fit_wait # the fit's compiles are done (or capped) before the timed training runs

# ---- train: time to quality, fused then reference, the same wall-clock budget each (same seed and data)
if has_stage train; then
  left=$((DEADLINE - (SECONDS - T0) - 70 * SLOW))
  TL=$TRAIN_S
  ((left / 2 - 25 < TL)) && TL=$((left / 2 - 25))
  ((TL < 5)) && TL=5
  ((TINY)) && TL=${GPU_CHECK_TRAIN_S:-4}
  TPRESET=mnist-doubling
  if ((TINY)); then
    # the fused kernels are interpreted: the smallest net that still runs every stage of the doubling schedule
    TSETS="--set state_channels=16 --set hidden_channels=16 --set n_blocks=0 --set enc_channels=4 \
      --set batch_size=1 --set steps_per_stage=1 --set log_every=1 --threads 1"
  else TSETS="--set log_every=5"; fi
  # the fused run at the precision users train with (bf16); the reference at the config's fp32, whose convolutions
  # cuDNN runs in TF32 (PyTorch's default): each stage note says which (ttq's set-up line)
  FSETS=${GPU_CHECK_TRAIN_FUSED_SETS-"--set precision=bf16"}
  for backend in triton torch; do
    BSETS=$([[ $backend == triton ]] && echo "$FSETS")
    t=$SECONDS
    TT=$((TL + 60 * SLOW))
    log "train: --preset $TPRESET --set backend=$backend $BSETS --time-limit $TL (timeout ${TT}s)"
    timeout "$TT" $PY -m benchmarks.ttq --preset "$TPRESET" --backend $backend $TSETS $BSETS --set eval_every=0 \
      --set ckpt_every=0 --out "$TMP/train_$backend" ${DATA_DIR:+--data-dir "$DATA_DIR"} --time-limit "$TL" \
      --device "$DEV" >"$TMP/train_$backend.log" 2>&1
    rc=$?
    cat "$TMP/train_$backend.log" >>"$LOG"
    [[ -f $TMP/train_$backend/metrics.jsonl ]] && cp "$TMP/train_$backend/metrics.jsonl" "$PARTS/train_$backend.jsonl"
    prec=$(grep -ho '^ttq: .*, precision [^;]*, set-up' "$TMP/train_$backend.log" | sed 's/.*, precision /precision /; s/, set-up$//')
    note="${prec:+$prec; }time limit ${TL}s; $(grep -h '^ttq: done' "$TMP/train_$backend.log" | cut -c 6-)"
    if ((rc == 3)); then
      note="no MNIST data found: pass --data-dir DIR (a folder with binarized_mnist.npz) or set FASTNCA_DATA"
    elif ((rc != 0)); then
      note="failed: $(grep -v '^\s*$' "$TMP/train_$backend.log" | tail -n 1 | cut -c1-200)"
    fi
    stage_done "train_$backend" $rc $((SECONDS - t)) "$note"
  done
fi

# ---- ncu: hardware counters of the fused step forward + backward at the headline shape
if has_stage ncu; then
  t=$SECONDS
  NT=$(cap 75 15)
  if ! command -v ncu >/dev/null 2>&1; then
    stage_done ncu note 0 "ncu (Nsight Compute) not found: no hardware counters"
  elif [[ $DEV != cuda ]]; then
    stage_done ncu note 0 "no CUDA device: ncu not run"
  else
    log "ncu: $(ncu --version 2>/dev/null | tail -n 1) (timeout ${NT}s)"
    timeout "$NT" ncu --target-processes all --profile-from-start off --csv --page raw --section SpeedOfLight \
      --section Occupancy \
      --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --log-file "$PARTS/ncu.csv" $PY -m benchmarks.profiling --ncu-target >>"$LOG" 2>&1
    rc=$?
    [[ -f $PARTS/ncu.csv ]] && tail -n 3 "$PARTS/ncu.csv" >>"$LOG"
    if grep -qs "ERR_NVGPUCTRPERM" "$PARTS/ncu.csv" "$LOG"; then
      note="ncu refused: no permission to read GPU performance counters (ERR_NVGPUCTRPERM)"
    elif [[ ! -s $PARTS/ncu.csv ]]; then
      note="ncu wrote no output: $(tail -n 1 "$LOG" | cut -c1-200)"
    else
      $PY -m benchmarks.profiling --ncu-csv "$PARTS/ncu.csv" --json "$PARTS/ncu.json" --md "$PARTS/ncu.md" \
        >>"$LOG" 2>&1
      note=$($PY -c "import json, sys; print(len(json.load(open(sys.argv[1]))['ncu']), 'kernels profiled')" \
        "$PARTS/ncu.json" 2>/dev/null)
      ((rc == 124)) && note="stopped by its ${NT}s timeout; $note"
      ((rc != 0 && rc != 124)) && note="ncu rc $rc: $(grep -h "==ERROR==" "$PARTS/ncu.csv" | head -n 1 | cut -c1-200); $note"
    fi
    stage_done ncu "$rc" $((SECONDS - t)) "$note"
  fi
fi

fit_wait

# ---- summary: check.json, details.md, summary.md; printed last
log "done in $((SECONDS - T0))s"
$PY -m benchmarks.summarize "$OUTDIR" --parts "$PARTS" \
  --note "import: $IMPORT; total $((SECONDS - T0)) s; stages: $STAGES$( ((TINY)) && echo '; tiny CPU dry run')" \
  >>"$LOG" 2>&1 || log "summarize failed (see above)"
cat "$OUTDIR/summary.md" 2>/dev/null || echo "gpu_check: no summary.md (see gpu_check.log)"
rm -rf "$TMP"
