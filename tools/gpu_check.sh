#!/usr/bin/env bash
# The GPU check of issue [7], one command on a CUDA machine (budget: 10 minutes on one H200):
#
#     tools/gpu_check.sh                 # set up, export, compile, then parity + timings on the GPU
#     tools/gpu_check.sh --dry-run       # everything before the first GPU call (no GPU needed; the tests run it)
#     GPU_CHECK_PERF=docs/PERF.md tools/gpu_check.sh   # also replace the gpu_check section of docs/PERF.md
#
# Any other argument goes to benchmarks/gpu_check.py (e.g. --models tiny, --backends tvm-cuda, --flash-experts 256).
# What it runs: tiny and a Flash-shaped slice (real per-token dimensions, 4 layers: window, window, CSA, HCA;
# synthetic weights) in the deployed configuration (packed FP8/MXFP4, the quantisation simulation on), exported for
# ort-cuda and tvm-cuda; on the GPU: parity against the eager model, decode ms/step at batch 1 and 8, prefill
# tokens/s at 1K and 8K, decode against the HBM roofline. Output under $OUT (default out/gpu_check): gpu_check.md
# (the PERF.md section), gpu_check.json, gpu_check.log.
#
# Setup (skipped with --dry-run, which uses the project's .venv): a separate venv $GPU_VENV (default .venv-gpu)
# with torch==2.13.0 as the package index serves it on this machine (a CUDA build on a GPU box), dsv4, and
# onnxruntime-gpu==1.32.0 instead of the CPU onnxruntime (the two wheels share the module name). A step that cannot
# install is logged and the check goes on without it: no CUDA torch -> the eager reference runs on the CPU; no
# CUDAExecutionProvider -> the ort-cuda column is skipped. TVM compiles the CUDA source when the library is loaded:
# with nvcc (TVM_CUDA_COMPILE_MODE=nvcc, set when nvcc is on the PATH) or NVRTC (cuda-bindings, installed if it can).
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

DRY=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/gpu_check.log"; }
try() { local what=$1; shift; "$@" >>"$OUT/setup.log" 2>&1 || { log "could not $what (see $OUT/setup.log): going on without it"; return 1; }; }

if [ "$DRY" = 1 ]; then
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
  log "dry run with $PY: no GPU call, no install"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^/GPU: /' \
    || log "no nvidia-smi (fine for a dry run)"
else
  command -v nvidia-smi >/dev/null || { log "no nvidia-smi: not a GPU machine (use --dry-run to check the rest)"; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/gpu_check.log"
  VENV=${GPU_VENV:-.venv-gpu}
  if [ ! -x "$VENV/bin/python" ]; then
    log "setting up $VENV"
    python3 -m venv "$VENV" || { log "cannot create $VENV"; exit 2; }
    try "upgrade pip" "$VENV/bin/python" -m pip install -q --upgrade pip
    try "install torch==2.13.0" "$VENV/bin/python" -m pip install -q torch==2.13.0 || exit 2
    try "install dsv4" "$VENV/bin/python" -m pip install -q -e . || exit 2
    if try "install onnxruntime-gpu==1.32.0" "$VENV/bin/python" -m pip install -q onnxruntime-gpu==1.32.0; then
      # onnxruntime (a dsv4 dependency) and onnxruntime-gpu both install the module `onnxruntime`: keep the GPU one
      try "remove the CPU onnxruntime" "$VENV/bin/python" -m pip uninstall -q -y onnxruntime
      try "reinstall onnxruntime-gpu" "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps onnxruntime-gpu==1.32.0
    fi
    command -v nvcc >/dev/null || try "install NVRTC for TVM" "$VENV/bin/python" -m pip install -q "cuda-bindings==13.*" "nvidia-cuda-nvrtc==13.*"
  fi
  PY=$VENV/bin/python
fi
if command -v nvcc >/dev/null; then
  export TVM_CUDA_COMPILE_MODE=${TVM_CUDA_COMPILE_MODE:-nvcc}
  export CUDA_PATH=${CUDA_PATH:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
fi

DRYARG=()
[ "$DRY" = 1 ] && DRYARG=(--dry-run)
case " ${ARGS[*]-} " in *" --workdir "*) ;; *) ARGS+=(--workdir "$OUT/work") ;; esac
PERFARG=()
[ -n "${GPU_CHECK_PERF:-}" ] && PERFARG=(--out "$GPU_CHECK_PERF")
log "start: $PY benchmarks/gpu_check.py ${DRYARG[*]} ${ARGS[*]}"
timeout "${GPU_CHECK_TIMEOUT:-1800}" "$PY" benchmarks/gpu_check.py "${DRYARG[@]}" --json "$OUT/gpu_check.json" \
  --md "$OUT/gpu_check.md" "${PERFARG[@]}" "${ARGS[@]}" 2>"$OUT/gpu_check.err" | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then
  log "FAILED (rc $rc); last lines of $OUT/gpu_check.err:"
  tail -n 20 "$OUT/gpu_check.err" | tee -a "$OUT/gpu_check.log"
  exit "$rc"
fi
log "wrote $OUT/gpu_check.md"
