#!/usr/bin/env bash
# shellcheck disable=SC2086  # lists of pip names ($need, $pins) are split on purpose
# Every GPU figure the project records, in one command and one time budget; it writes the section
# of benchmarks/RESULTS.md between the "accelerator.sh" markers and the raw outputs.
#
#   bash benchmarks/accelerator.sh            # GPU machine: 8 minutes at most, setup included
#   bash benchmarks/accelerator.sh --small    # the same stages, tiny, on a CPU (3-5 minutes), no installs
#
# Stages, each in its own time slice of what is left (a stage that fails or runs out of time is
# reported, and the next one runs; one left with too little time is skipped and reported):
#   parity  mixer-parity --variant all --device gpu: fp32 (TF32 off), bf16, gradients (timm's check
#           runs on the CPU, the same as in the CPU results: --no-timm)
#   speed   bench_speed.py: B/16 bf16 inference and training, % of the bf16 matmul peak of this run
#   input   bench_input.py: B/16 training fed real JPEGs by the input pipeline vs synthetic batches
#   eval    bench_eval.py: mixer-eval end-to-end and model img/s on generated JPEGs
#   scale   bench_scale.py: the largest B/16 and L/16 batch per GPU with data parallel vs fsdp+remat
#           (compiled for the GPU, its bytes against the memory JAX may use), and B/16 training
#           step img/s with and without scan; last, so it gets what the others leave (its output
#           is written as it goes: a slice that runs out still reports what was measured)
# Setup: an interpreter that already has PyTorch and JAX ($PYTHON, else python3) is used, and
# what it lacks is installed from the wheels in --wheels (a machine without a package registry;
# --fetch-wheels downloads them on one with), else from the registry. A machine without PyTorch or
# JAX gets a venv in /tmp: torch (PyPI's Linux x86-64 wheel is a CUDA build), jax[cudaN] for
# torch's CUDA major version, then this project with its jax, torch and train extras and psutil
# (not the dev extra: its tensorflow-cpu is a test oracle no stage uses, ~0.6 GB to install).
#
# Options:
#   --small         small models, batches and image counts, on the CPU; output in a new temporary folder
#   --out DIR       raw outputs (default benchmarks/results/gpu)
#   --results FILE  the file whose section is replaced (default benchmarks/RESULTS.md; --small: DIR/RESULTS.md)
#   --budget S      total seconds (default 480; --small 900)
#   --wheels DIR    wheels for missing modules (default .whl)
#   --fetch-wheels  download into --wheels the wheels of the input pipeline's packages that ML images
#                   often lack (grain, array_record, portpicker) for CPython $WHEEL_PYTHON (default
#                   3.12) on Linux x86-64, at the versions installed here, then exit
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
START=$(date +%s)
SMALL=0 OUT_DIR="" RESULTS="" BUDGET="" WHEELS="$ROOT/.whl" FETCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --small) SMALL=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --results) RESULTS="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --fetch-wheels) FETCH=1 ;;
    *) echo "accelerator.sh: unknown argument $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$SMALL" = 1 ]; then
  OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/mixer-accelerator-small.XXXXXX)}"
  RESULTS="${RESULTS:-$OUT_DIR/RESULTS.md}" BUDGET="${BUDGET:-900}"
else
  OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results/gpu}"
  RESULTS="${RESULTS:-$ROOT/benchmarks/RESULTS.md}" BUDGET="${BUDGET:-480}"
fi
DEADLINE=$((START + BUDGET))
REPORT_RESERVE=15 MIN_SLICE=20
PY="${PYTHON:-python3}"

fetch_wheels() {
  local pins
  pins=$("$PY" -c 'import importlib.metadata as m
def pin(n):
    try:
        return f"{n}=={m.version(n)}"
    except m.PackageNotFoundError:
        return n
print(" ".join(pin(n) for n in ("grain", "array_record", "portpicker")))')
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" $pins && ls -l "$WHEELS"
}
if [ "$FETCH" = 1 ]; then fetch_wheels; exit $?; fi

mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{stages.tsv,summary.json,env.json,setup.log} "$OUT_DIR"/{parity,speed,input,eval,scale}.{json,log}
# This checkout's code, also where the toolkit is not installed: its core's folder is convert/.
LINK=$(mktemp -d /tmp/mixer-accelerator-path.XXXXXX)
trap 'rm -rf "$LINK"' EXIT
ln -s "$ROOT/convert" "$LINK/mixer_convert"
export PYTHONPATH="$LINK:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# JAX takes 75% of the GPU at start by default: PyTorch shares the card in the same processes, and
# a worker process that touched JAX would take another 75%. On demand instead (timings are after warm-up).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

left() { echo $((DEADLINE - $(date +%s))); }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT_DIR/stages.tsv"; }
log() { echo "[accelerator $(( $(date +%s) - START ))s] $*"; }
missing() { "$PY" benchmarks/accel_env.py --missing 2>>"$OUT_DIR/setup.log"; }

pip_in() {  # pip_in MAX_SECONDS PYTHON ARGS...: quiet, logged, within what is left of setup's 45% share
  local t=$(( $(left) - BUDGET * 55 / 100 ))
  [ "$t" -le "$1" ] || t=$1
  [ "$t" -gt 10 ] || { echo "no time left for pip install ${*:3}" >>"$OUT_DIR/setup.log"; return 1; }
  timeout "$t" "$2" -m pip install -q --disable-pip-version-check --retries 1 --timeout 20 "${@:3}" \
    >>"$OUT_DIR/setup.log" 2>&1
}

make_venv() {  # a machine without PyTorch or JAX: everything from the registry
  local venv=/tmp/mixer-accelerator-venv cuda
  log "setup: installing torch, jax[cuda] and the project into $venv (log: $OUT_DIR/setup.log)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || return 1
  pip_in "$BUDGET" "$venv/bin/python" torch || return 1
  cuda=$("$venv/bin/python" -c "import torch; print((torch.version.cuda or '12').split('.')[0])") || return 1
  pip_in "$BUDGET" "$venv/bin/python" "jax[cuda$cuda]" \
    && pip_in "$BUDGET" "$venv/bin/python" -e ".[jax,torch,train]" psutil \
    && PY="$venv/bin/python"
}

add_missing() {  # the interpreter has the frameworks: install only what it lacks
  local site=/tmp/mixer-accelerator-site need
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "setup: installing $* from $WHEELS"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$site" "$WHEELS"/*.whl \
      >>"$OUT_DIR/setup.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$site"
  fi
  need=$(missing)
  if [ -n "$need" ]; then
    log "setup: installing $need from the package registry"
    pip_in 60 "$PY" $need || log "setup: could not install $need; the stages that need it will fail"
  fi
}

lacks_frameworks() {  # lacks_frameworks PIP_NAMES...: is torch, jax or flax among them?
  local name
  for name in "$@"; do case "$name" in torch|jax|flax) return 0 ;; esac; done
  return 1
}

setup() {  # --small installs nothing (env.json lists what is missing); $PYTHON is never replaced
  local need=""
  if [ "$SMALL" = 0 ]; then need=$(missing) || { log "setup: $PY does not run"; return 1; }; fi
  if lacks_frameworks $need; then
    [ -z "${PYTHON:-}" ] || { log "setup: $PYTHON lacks $need"; return 1; }
    make_venv || { log "setup: installing failed (tail of $OUT_DIR/setup.log below)"; tail -5 "$OUT_DIR/setup.log"; return 1; }
    need=$(missing); [ -z "$need" ] || add_missing $need
  elif [ -n "$need" ]; then
    add_missing $need
  fi
  if [ "$SMALL" = 1 ]; then
    "$PY" benchmarks/accel_env.py --json "$OUT_DIR/env.json" 2>>"$OUT_DIR/setup.log"
  else
    "$PY" benchmarks/accel_env.py --json "$OUT_DIR/env.json" --need-gpu 2>&1 | tee -a "$OUT_DIR/setup.log"
  fi
}

run_stage() {  # run_stage NAME WEIGHT WEIGHTS_LEFT COMMAND...: a WEIGHT/WEIGHTS_LEFT share of the time left
  local name=$1 share=$(( ($(left) - REPORT_RESERVE) * $2 / $3 )) t0 rc status
  shift 3
  if [ "$share" -lt "$MIN_SLICE" ]; then
    log "$name: skipped, $(( $(left) - REPORT_RESERVE )) s of the budget left"
    record "$name" skipped 0 0 "$share"; return
  fi
  log "$name: up to ${share}s: ${*/#$ROOT\//}"
  t0=$(date +%s)
  timeout -k 10 "$share" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status="timed out after ${share}s" ;; *) status="failed (exit $rc)" ;; esac
  record "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "$share"
  log "$name: $status ($(( $(date +%s) - t0 ))s)"
  [ "$status" = ok ] || tail -3 "$OUT_DIR/$name.log" | sed "s/^/  $name| /"
}

t0=$(date +%s)
setup; rc=$?
record setup "$([ $rc = 0 ] && echo ok || echo "failed (exit $rc)")" "$rc" $(( $(date +%s) - t0 )) 0
if [ $rc != 0 ]; then
  log "setup failed: no GPU visible to both PyTorch and JAX, or no interpreter with them (see $OUT_DIR/setup.log)"
  exit 1
fi
log "setup: $(( $(date +%s) - t0 ))s with $PY"

O="$OUT_DIR"
if [ "$SMALL" = 1 ]; then
  PARITY=(--variant S/32 --image-size 64 64 --device cpu --no-timm)
  SPEED=(--variants S/32 --image-size 64 --batches 2 --train-batch 2 --peak-shapes 256x256x256 --min-time 0.2)
  INPUT=(--images 32 --batch 8 --steps 3 --workers 2 --repeat 1 --train-models tiny --train-batch 8 --train-steps 2
         --variant-steps 2)
  EVAL=(--variant tiny --image-size 64 --num-classes 10 --images 160 --batch 8 --device cpu --min-time 0.2)
  SCALE=(--variants tiny --image-size 32 --max-batch 8 --step-variant tiny --step-batch 8 --steps 3 --warmup 1
         --repeat 2)
else
  PARITY=(--variant all --device gpu --no-timm)
  SPEED=(--variants B/16 --batches 64 256 --train-batch 256 --peak-shapes 4096x4096x4096 8192x8192x8192 3136x768x3072)
  INPUT=(--images 1024 --batch 256 --steps 8 --workers "$(nproc)" --repeat 2 --train-models B/16 --train-batch 256
         --variant-steps 8)
  EVAL=(--variant B/16 --images 1024 --batch 256 --device gpu)
  SCALE=(--variants B/16 L/16 --max-batch 4096 --step-variant B/16 --step-batch 256 --steps 10 --warmup 2 --repeat 3)
fi
run_stage parity 30 100 "$PY" -m mixer_convert.tools.parity_report "${PARITY[@]}" --json "$O/parity.json"
run_stage speed 20 70 "$PY" benchmarks/bench_speed.py "${SPEED[@]}" --dtype bfloat16 --no-timm --json "$O/speed.json"
run_stage input 20 50 "$PY" benchmarks/bench_input.py "${INPUT[@]}" --train-dtype bfloat16 --json "$O/input.json"
run_stage eval 12 30 "$PY" benchmarks/bench_eval.py "${EVAL[@]}" --json "$O/eval.json"
run_stage scale 18 18 "$PY" benchmarks/bench_scale.py "${SCALE[@]}" --json "$O/scale.json"

command="bash benchmarks/accelerator.sh$([ "$SMALL" = 1 ] && echo " --small")"
"$PY" benchmarks/accelerator_report.py --out "$OUT_DIR" --results "$RESULTS" --command "$command" \
  --budget "$BUDGET" --total $(( $(date +%s) - START ))
log "raw outputs in $OUT_DIR; section written to $RESULTS"
if grep -qv $'\tok\t' "$OUT_DIR/stages.tsv"; then exit 1; fi  # a stage that did not finish
