#!/usr/bin/env bash
# One-command GPU check of fastnca: what a user gets, measured, profiled and recorded in <= 8 minutes on one GPU.
#
# Usage:  bash benchmarks/gpu_check.sh OUTDIR [--data-dir DIR] [--tiny] [--plan]
#
# Needs: a CUDA GPU, Python with PyTorch >= 2.11 and Triton >= 3.6 installed; no network, no package index.
# Data: --data-dir DIR (a folder holding binarized_mnist.npz), else $FASTNCA_DATA, else fastnca's default.
# Commit: read with git; in a copy without .git, set FASTNCA_COMMIT=<sha> so that the results name it.
# --tiny: the CPU dry run (tiny sizes, Triton interpreter, no ncu): checks every stage's code path.
# --plan: print the stages and their time caps (the GPU run's, <= 480 s in all) and exit.
#
# Stages, in order of value (each capped; the whole run ends by GPU_CHECK_DEADLINE_S, default 480 s, so that a
# second run fits a 15-minute lease; a failing stage does not stop the others, a missing tool turns its stage into a
# one-line note):
#   env       GPU, clocks, driver, torch/triton versions, optional tools
#   compile   one parallel compile pass whose cache every later stage reuses: the Triton launches of the kernel and
#             GPU model tests (pytest -p benchmarks.record_plugin), of the training run at default settings and of
#             the quick benchmark's fused rows (python -m benchmarks.precompile) are recorded without running, then
#             compiled by python -m fastnca.kernels.warmup --compile with one worker per CPU
#   train     time to quality at default settings: `fastnca train --preset mnist-doubling` exactly as a user types it
#             (backend auto: measured, precision fp32 = TF32 dots on the GPU) against `--backend torch`, the same
#             wall time each (GPU_CHECK_TRAIN_S, default 90 s of training after set-up); it/s and loss curves
#   bench     python -m benchmarks --quick: the fused step against eager and torch.compile, training iterations
#             (fused bf16 / tf32 / CUDA graph / batched weight gradients against the reference), the
#             celeba-nondoubling-256 T=128 and T=1024 training rows with peak memory (predicted vs measured), IWAE-128
#             throughput (with the 10,000-image test set's extrapolated time)
#   tests     python -m pytest tests/kernels --ignore-glob='tests/kernels/test_fit*.py' (compiled kernels, from the
#             compile stage's cache), then python -m pytest tests/model -m 'gpu and not slow': to completion, failures
#             with their messages in tests.txt
#   launches  python -m tools.launches --preset mnist-doubling --json (kernel launches per training iteration)
#   profile   python -m benchmarks.profiling (torch.profiler: top kernels, GPU-busy vs wall time)
#   ncu       Nsight Compute on the fused step forward + backward (only where ncu exists and is permitted)
#   fit       python -m tools.fit --json (sm_90 registers/spills/HGMMA on the installed Triton; CI checks
#             both releases on the CPU), in the background on the CPUs the GPU stages leave idle
#
# Writes 7 files into OUTDIR (no sub-folders; each well under 16 MiB):
#   summary.md   the headline table (printed last)        check.json  everything, machine-readable
#   details.md   fit table, profile tables, ncu counters,  time-to-quality curves
#   gpu_check.log  every stage's output with timestamps   tests.txt  pytest output: kernel tests, then model tests
#   bench.json / bench.md  the quick benchmark
# Record the run:  python -m benchmarks.record OUTDIR   (appends a dated section to benchmarks/RESULTS.md)
#
# Knobs: GPU_CHECK_DEADLINE_S, GPU_CHECK_STAGES (default "env compile train bench tests launches profile ncu fit"),
#   GPU_CHECK_TRAIN_S (seconds of training per run, default 90), GPU_CHECK_TESTS / GPU_CHECK_MODEL_TESTS (the tests
#   stage's two pytest arguments; an empty GPU_CHECK_MODEL_TESTS skips the model tests), GPU_CHECK_FIT_ARGS,
#   FASTNCA_FIT_JOBS, GPU_CHECK_IMPORT (auto | editable | shim), PYTHON (default python3).
set -u
usage="usage: bash benchmarks/gpu_check.sh OUTDIR [--data-dir DIR] [--tiny] [--plan]"
OUTDIR=${1:?$usage}
shift
DATA_DIR=${FASTNCA_DATA:-}
TINY=0
PLAN=0
while (($#)); do
  case $1 in
    --data-dir) DATA_DIR=${2:?$usage}; shift 2 ;;
    --data-dir=*) DATA_DIR=${1#*=}; shift ;;
    --tiny) TINY=1; shift ;;
    --plan) PLAN=1; shift ;;
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
DEADLINE=${GPU_CHECK_DEADLINE_S:-$( ((TINY)) && echo 1440 || echo 480)}
SLOW=$( ((TINY)) && echo 3 || echo 1) # the dry run's interpreted kernels on a small CPU: caps x 3
STAGES=${GPU_CHECK_STAGES-env compile train bench tests launches profile ncu fit}
TRAIN_S=${GPU_CHECK_TRAIN_S:-90}
# each stage's cap on a GPU, in seconds (the dry run's are x 3); the train stage's is per run (two runs)
declare -A CAP=([env]=10 [compile]=75 [train]=$((TRAIN_S + 12)) [bench]=90 [tests]=60 [launches]=15 [profile]=20
  [ncu]=0 [fit]=0)
if ((PLAN)); then
  total=0
  for st in $STAGES; do
    n=1
    [[ $st == train ]] && n=2
    echo "$st ${CAP[$st]}s$( ((n > 1)) && echo " x $n")"
    total=$((total + n * CAP[$st]))
  done
  echo "total ${total}s of ${DEADLINE}s (ncu and fit take what is left; fit runs in the background)"
  exit 0
fi
LOG=$OUTDIR/gpu_check.log
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PARTS=$TMP/parts
mkdir -p "$PARTS"
T0=$SECONDS
export PYTHONUNBUFFERED=1 FASTNCA_CACHE=$TMP/cache
# Each Python entry point below chooses the kernels' mode itself (fastnca.kernels.use_interpreter: Triton's
# interpreter exactly when no CUDA device is visible), so nothing inherited may force it either way.
unset TRITON_INTERPRET
if ((TINY)); then
  export CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
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
# cap_of STAGE: the stage's cap, or fewer so that the caps of the stages after it still fit before DEADLINE
cap_of() {
  local st after=0 seen=0
  for st in $STAGES; do
    if ((seen)); then
      after=$((after + ${CAP[$st]}))
      [[ $st == train ]] && after=$((after + ${CAP[$st]})) # two runs
    fi
    [[ $st == "$1" ]] && seen=1
  done
  cap "${CAP[$1]}" "$after"
}
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
# (auto: use an install of this checkout if there is one, else PYTHONPATH plus tools/_import_shim, whose
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
  export PYTHONPATH="$ROOT/tools/_import_shim:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  check_import && IMPORT="PYTHONPATH + tools/_import_shim"
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

# ---- the test selections (recorded by the compile stage, run by the tests stage)
if ((TINY)); then TARGS=${GPU_CHECK_TESTS:-"tests/kernels/test_nca_step_fwd.py -k 'bad_input or empty_batch or odd'"}
# the sm_90 fit tests (test_fit*.py) compile what the fit stage compiles (and reports) in the background: not twice
else TARGS=${GPU_CHECK_TESTS:-"tests/kernels --ignore-glob='tests/kernels/test_fit*.py'"}; fi
MARGS=${GPU_CHECK_MODEL_TESTS-"tests/model -m 'gpu and not slow'"}

# ---- compile: record every later stage's Triton launches (nothing runs), then compile them all in parallel into
# Triton's cache, which the tests, the training runs, the benchmark and the profile then load from
if has_stage compile; then
  t=$SECONDS
  CT=$(cap_of compile)
  log "compile: record the launches of the tests, the training run and the quick benchmark (timeout ${CT}s)"
  eval "timeout $((CT / 3)) $PY -m pytest $TARGS -q -p no:cacheprovider -p benchmarks.record_plugin \
    --record-launches '$TMP/launches_tests.pkl'" >"$TMP/record_tests.log" 2>&1
  eval "[[ -n \$MARGS ]] && timeout $((CT / 6)) $PY -m pytest $MARGS -q -p no:cacheprovider \
    -p benchmarks.record_plugin --record-launches '$TMP/launches_model.pkl'" >>"$TMP/record_tests.log" 2>&1
  timeout $((CT / 6)) $PY -m benchmarks.precompile --out "$TMP/launches_jobs.pkl" --device "$DEV" \
    $( ((TINY)) && echo --tiny) >"$TMP/record_jobs.log" 2>&1
  tail -n 2 "$TMP/record_tests.log" "$TMP/record_jobs.log" >>"$LOG" 2>/dev/null
  files=$(ls "$TMP"/launches_*.pkl 2>/dev/null)
  if [[ -z $files ]]; then
    stage_done compile 1 $((SECONDS - t)) "no launches recorded: $(tail -n 1 "$TMP/record_jobs.log" | cut -c1-200)"
  else
    # no GPU in the dry run: compile a few of them for sm_90, which keeps the code path alive
    CARGS=$( ((TINY)) && echo "--arch 90 --max-kernels 3")
    left=$((CT - (SECONDS - t)))
    ((left < 10)) && left=10
    log "compile: python -m fastnca.kernels.warmup --compile $CARGS (timeout ${left}s)"
    timeout "$left" $PY -m fastnca.kernels.warmup --compile $files $CARGS >"$TMP/compile.log" 2>&1
    rc=$?
    tail -n 5 "$TMP/compile.log" >>"$LOG"
    note="$(grep -h '^precompile:' "$TMP/record_jobs.log" | cut -c 13- | sed 's/ -> .*//'); \
$(grep -h '^warmup: compiled' "$TMP/compile.log" | tail -n 1 | cut -c 9-)"
    ((rc == 124)) && note="stopped by its ${left}s timeout (the rest compile at their first launch); $note"
    stage_done compile $rc $((SECONDS - t)) "$note"
  fi
fi

# ---- train: time to quality at default settings, exactly as a user types it, against the reference backend:
# `fastnca train --preset mnist-doubling` (auto) and the same with --backend torch, the same wall-clock budget each
if has_stage train; then
  TL=$TRAIN_S
  left=$((DEADLINE - (SECONDS - T0) - 2 * 12 * SLOW))
  ((left / 2 < TL)) && TL=$((left / 2))
  ((TL < 5)) && TL=5
  ((TINY)) && TL=${GPU_CHECK_TRAIN_S:-4}
  TPRESET=mnist-doubling
  if ((TINY)); then
    # the smallest net that still runs every stage of the doubling schedule on a small CPU
    TSETS="--set state_channels=16 --set hidden_channels=16 --set n_blocks=0 --set enc_channels=4 \
      --set batch_size=1 --set steps_per_stage=1 --set log_every=1 --threads 1"
  else TSETS="--set log_every=5"; fi
  # a fresh backend cache: the auto run measures, as a user's first run does (and says so in its log)
  export FASTNCA_CACHE_DIR=$TMP/backend-cache
  for run in auto torch; do
    RSETS=$([[ $run == torch ]] && echo "--backend torch")
    t=$SECONDS
    TT=$((TL + 60 * SLOW))
    log "train: fastnca train --preset $TPRESET $RSETS --time-limit $TL (timeout ${TT}s)"
    timeout "$TT" $PY -m fastnca train --preset "$TPRESET" $RSETS $TSETS --out "$TMP/train_$run" \
      ${DATA_DIR:+--data-dir "$DATA_DIR"} --time-limit "$TL" --no-final-eval --no-progress --device "$DEV" \
      >"$TMP/train_$run.log" 2>&1
    rc=$?
    cat "$TMP/train_$run.log" >>"$LOG"
    [[ -f $TMP/train_$run/metrics.jsonl ]] && cp "$TMP/train_$run/metrics.jsonl" "$PARTS/train_$run.jsonl"
    how="$(grep -h '^model: ' "$TMP/train_$run.log" | tail -n 1 | cut -c 8-)"
    pick="$(grep -h '^backend auto: .*->\|^backend auto: [a-z]* (' "$TMP/train_$run.log" | tail -n 1)"
    note="${how:+$how; }${pick:+$pick; }time limit ${TL}s; $(grep -h '^done: ' "$TMP/train_$run.log" | cut -c 7-)"
    if ((rc != 0)) && grep -qi "mnist\|data" <(tail -n 1 "$TMP/train_$run.log"); then
      note="no MNIST data found: pass --data-dir DIR (a folder with binarized_mnist.npz) or set FASTNCA_DATA; \
$(tail -n 1 "$TMP/train_$run.log" | cut -c1-150)"
    elif ((rc != 0)); then
      note="failed: $(grep -v '^\s*$' "$TMP/train_$run.log" | tail -n 1 | cut -c1-200)"
    fi
    stage_done "train_$run" $rc $((SECONDS - t)) "$note"
  done
  unset FASTNCA_CACHE_DIR
fi

# ---- fit: CPU-only compiles, in the background from here on (after the timed training runs, which a busy CPU
# would slow down: their iterations are launch-bound on the host)
FIT_PID=
if has_stage fit; then
  FIT_T=$SECONDS
  FIT_CAP=$(cap 150 0)
  FIT_ARGS=${GPU_CHECK_FIT_ARGS:-$( ((TINY)) && echo "--only fwd")}
  log "fit: python -m tools.fit --json $FIT_ARGS (background, timeout ${FIT_CAP}s)"
  (
    # the fit compiles with triton.compile; under the interpreter it starts its own child without it
    timeout "$FIT_CAP" $PY -m tools.fit --json $FIT_ARGS >"$PARTS/fit.jsonl" 2>"$PARTS/fit.err"
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

# ---- bench: the quick benchmark (rows not started within its time budget are recorded as skipped)
if has_stage bench; then
  t=$SECONDS
  BT=$(cap_of bench)
  # the quick plan holds small-grid vs per-step rows (issue 11); the dry run checks the early case's code path
  if ((TINY)); then BARGS="--tiny --device cpu --no-peaks --cases step rollout-mnist-doubling-early \
    --backends torch-fp32 triton-bf16 triton-bf16-perstep"
  else BARGS="--quick --time-budget $((BT - 60 > 10 ? BT - 60 : 10))"; fi
  log "bench: python -m benchmarks $BARGS (timeout ${BT}s)"
  timeout "$BT" $PY -m benchmarks $BARGS --out "$OUTDIR" >>"$LOG" 2>&1
  stage_done bench $? $((SECONDS - t)) ""
fi

# ---- tests: the kernel parity tests, compiled (tests/conftest.py interprets them only without CUDA), then the
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
  TT=$(cap_of tests)
  : >"$OUTDIR/tests.txt"
  # the kernel tests first, leaving the model tests at least MT s (they get whatever the kernel tests leave)
  MT=$((20 * SLOW < TT / 3 ? 20 * SLOW : TT / 3))
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

# ---- launches: kernel launches per training iteration (tools.launches, if this checkout has it)
if has_stage launches; then
  t=$SECONDS
  LT=$(cap_of launches)
  if ! (cd "$TMP" && $PY -c "import tools.launches") >>"$TMP/launches.err" 2>&1; then
    stage_done launches note 0 "tools.launches is not in this checkout: no launch count"
  else
    LP=$( ((TINY)) && echo small || echo mnist-doubling)
    # on the CPU the interpreter would run every kernel for minutes: count the launches and skip their bodies
    LX=$([[ $DEV == cpu ]] && echo --no-execute)
    log "launches: python -m tools.launches --preset $LP --device $DEV --json $LX (timeout ${LT}s)"
    timeout "$LT" $PY -m tools.launches --preset "$LP" --device "$DEV" --json $LX >"$PARTS/launches.out" 2>>"$LOG"
    rc=$?
    cat "$PARTS/launches.out" >>"$LOG"
    stage_done launches $rc $((SECONDS - t)) "$($PY -c "import sys; from benchmarks.summarize import launches_note
print(launches_note(sys.argv[1]))" "$PARTS" 2>>"$LOG")"
  fi
fi

# ---- profile: torch.profiler over a training iteration (bf16, fp32) and the headline step fwd+bwd
if has_stage profile; then
  t=$SECONDS
  PT=$(cap_of profile)
  PARGS=$( ((TINY)) && echo "--tiny --device cpu")
  log "profile: python -m benchmarks.profiling $PARGS (timeout ${PT}s)"
  timeout "$PT" $PY -m benchmarks.profiling $PARGS --json "$PARTS/profile.json" --md "$PARTS/profile.md" \
    >>"$LOG" 2>&1
  rc=$?
  stage_done profile $rc $((SECONDS - t)) "$( ((rc == 124)) && echo "stopped by its ${PT}s timeout")"
fi

# ---- ncu: hardware counters of the fused step forward + backward at the headline shape
if has_stage ncu; then
  t=$SECONDS
  NT=$(cap 75 0)
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
