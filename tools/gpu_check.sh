#!/usr/bin/env bash
# GPU check of issue [5] (< 10 minutes on one H200): tvm-cuda and ort-cuda parity with the eager model and decode
# timings, for the tiny and small presets. Writes markdown that docs/PERF.md takes (section "gpu_check", with the
# date and the GPU) plus the raw JSON, under $OUT (default out/gpu_check):
#
#     tools/gpu_check.sh            # then: python benchmarks/bench_tvm.py's update_section, or paste gpu_check.md
#     GPU_CHECK_PERF=docs/PERF.md tools/gpu_check.sh   # also replace the gpu_check section of docs/PERF.md
#
# Needs: an NVIDIA driver (nvidia-smi), the dsv4 environment (.venv or the current python with dsv4 installed),
# TVM's CUDA runtime (in the apache-tvm wheel) and a way for TVM to compile the CUDA source at load time: nvcc
# on the PATH (TVM_CUDA_COMPILE_MODE=nvcc, set below) or NVRTC (pip install cuda-bindings nvidia-cuda-nvrtc).
# ORT CUDA needs onnxruntime-gpu; without its CUDAExecutionProvider the ort-cuda column is skipped, not failed.
#
# Plan (both presets run in parallel; each step has its own time limit):
#   1. export tiny and small for tvm-cuda-compatible graphs (float32 weights, quant_sim off: the strict 1e-4
#      parity bound applies), with the tvm pass pipeline; cached in $OUT/work-<preset>;
#   2. dsv4 compile --target tvm-cuda --arch $ARCH (sm_90 on H100/H200) for each;
#   3. benchmarks/bench_tvm.py --backends tvm-cuda ort-cuda: prefill tokens/s, decode ms/step at batch 1,
#      parity (300-token prompt + 32 greedy steps) against the eager model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu_check}
ARCH=${ARCH:-sm_90}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
mkdir -p "$OUT"
log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/gpu_check.log"; }

command -v nvidia-smi >/dev/null || { log "no nvidia-smi: not a GPU machine"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if command -v nvcc >/dev/null; then
  export TVM_CUDA_COMPILE_MODE=${TVM_CUDA_COMPILE_MODE:-nvcc}
  export CUDA_PATH=${CUDA_PATH:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
fi
"$PY" - <<'EOF' | tee -a "$OUT/gpu_check.log"
import tvm, onnxruntime as ort
print("tvm", tvm.__version__, "cuda device:", tvm.cuda(0).exist, "| onnxruntime", ort.__version__, ort.get_available_providers())
EOF
BACKENDS="tvm-cuda"
"$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' \
  && BACKENDS="tvm-cuda ort-cuda" || log "onnxruntime has no CUDAExecutionProvider: ort-cuda skipped"
THREADS=$(( $(nproc) / 2 ))  # two presets side by side

run_preset() {  # $1 preset, $2 prefill lengths, $3 time limit (s)
  local p=$1 work="$OUT/work-$1"
  OMP_NUM_THREADS=$THREADS TVM_NUM_THREADS=$THREADS timeout "$3" "$PY" benchmarks/bench_tvm.py --preset "$p" \
    --backends $BACKENDS --threads "$THREADS" --weights float32 --no-quant-sim --prefill $2 --decode-steps 64 --repeat 3 \
    --parity-steps 32 --parity-prompt 300 --section gpu --workdir "$work" --json "$OUT/$p.json" --out - \
    > "$OUT/$p.md" 2> "$OUT/$p.err" && log "$p done" || { log "$p FAILED (rc $?), see $OUT/$p.err"; return 1; }
}

log "start: $BACKENDS, arch $ARCH, $THREADS threads per preset"
rc=0
run_preset tiny "128 1000" 420 & pid_tiny=$!
run_preset small "1024 4096" 540 & pid_small=$!
wait $pid_tiny || rc=1
wait $pid_small || rc=1

{
  echo "<!-- gpu_check:begin -->"
  echo "## TVM (CUDA) and ONNX Runtime CUDA on a GPU (\`tools/gpu_check.sh\`, issue [5])"
  echo
  echo "$(date +%Y-%m-%d), $(head -1 "$OUT/gpu.txt"); float32 weights, quant_sim off; eager (the parity oracle) on the CPU."
  for p in tiny small; do
    [ -s "$OUT/$p.md" ] || { echo; echo "$p: failed (see gpu_check.log)"; continue; }
    echo; echo "### $p"; echo
    sed -n '/^| measurement/,$p' "$OUT/$p.md"
  done
  echo "<!-- gpu_check:end -->"
} > "$OUT/gpu_check.md"
if [ -n "${GPU_CHECK_PERF:-}" ]; then
  "$PY" - "$GPU_CHECK_PERF" "$OUT/gpu_check.md" <<'EOF'
import re, sys
from pathlib import Path
perf, md = Path(sys.argv[1]), Path(sys.argv[2]).read_text().strip()
text = perf.read_text()
pat = re.compile(r"<!-- gpu_check:begin -->.*?<!-- gpu_check:end -->", re.S)
perf.write_text(pat.sub(lambda _: md, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + md + "\n")
EOF
  log "updated $GPU_CHECK_PERF"
fi
log "wrote $OUT/gpu_check.md (rc $rc)"
exit $rc
