#!/usr/bin/env bash
# Every GPU check of the project in one run, ending with a table of results.
#
#   bash load_tests/gpu_check.sh            # from the repository root, after `make setup`
#
# On a machine without a CUDA device it still runs what it can on the CPU and lists the checks it
# skipped and why. Exit status: 0 when nothing failed (skips are not failures), 1 otherwise.
# Each section appends one row with `record NAME STATUS DETAIL`; add new checks as new sections.
# GPU_CHECK_SKIP="pytest runtimes" leaves out those sections (e.g. where TensorRT is not installed).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=load_tests/results
mkdir -p "$RESULTS"
ROWS=()
FAILED=0

skipping() {  # skipping SECTION: true when GPU_CHECK_SKIP names it
  case " ${GPU_CHECK_SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

record() {  # record NAME pass|fail|skipped DETAIL
  ROWS+=("$(printf '%-34s %-8s %s' "$1" "$2" "$3")")
  if [ "$2" = fail ]; then FAILED=1; fi
}

reference_dir() {
  for dir in "${OPENSET_REFERENCE_DIR:-}" ../shared/reference /work/shared/reference; do
    if [ -n "$dir" ] && [ -d "$dir/ms_deform_attn" ]; then echo "$dir"; return; fi
  done
}

HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$HAS_CUDA" = 1 ]; then
  GPU_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')
  record "cuda device" pass "$GPU_NAME"
elif command -v nvidia-smi >/dev/null 2>&1; then
  record "cuda device" fail "nvidia-smi sees a GPU but this torch build has no CUDA"
else
  record "cuda device" skipped "no CUDA device on this machine"
fi

# --- multi-scale deformable attention: golden cases on every kernel available here -------------
REF=$(reference_dir)
if [ -z "$REF" ]; then
  record "msda golden cases" fail "reference cases not found (set OPENSET_REFERENCE_DIR)"
elif "$PYTHON" -m models.ops.check "$REF/ms_deform_attn" | tee "$RESULTS/msda_check.txt"; then
  kernels=$(awk 'NR>1 && $NF=="ok" {print $2}' "$RESULTS/msda_check.txt" | sort -u | paste -sd, -)
  record "msda golden cases" pass "kernels: $kernels"
else
  record "msda golden cases" fail "see $RESULTS/msda_check.txt"
fi
if [ "$HAS_CUDA" != 1 ]; then
  record "msda golden cases (cuda-triton)" skipped "no CUDA device"
fi

# --- multi-scale deformable attention: Triton vs the reference on OpenSeeD shapes (>= 5x) -------
if [ "$HAS_CUDA" = 1 ]; then
  if "$PYTHON" load_tests/bench_msda.py --device cuda --output "$RESULTS/bench_msda_cuda.json" \
      | tee "$RESULTS/bench_msda_cuda.txt"; then
    best=$(awk '$1=="cuda" && $2=="encoder" {print $9}' "$RESULTS/bench_msda_cuda.txt" | sort -n | head -1)
    record "msda triton speed-up (encoder)" pass "slowest encoder row ${best} (target 5x)"
  else
    record "msda triton speed-up (encoder)" fail "see $RESULTS/bench_msda_cuda.txt"
  fi
else
  record "msda triton speed-up (encoder)" skipped "no CUDA device (CPU numbers: load_tests/bench_msda.py)"
fi

# --- tests marked gpu ---------------------------------------------------------------------------
if skipping pytest; then
  record "pytest -m gpu" skipped "GPU_CHECK_SKIP"
elif [ "$HAS_CUDA" = 1 ]; then
  "$PYTHON" -m pytest -q -m gpu >"$RESULTS/pytest_gpu.txt" 2>&1
  status=$?
  summary=$(tail -1 "$RESULTS/pytest_gpu.txt")
  if [ $status = 0 ] || [ $status = 5 ]; then record "pytest -m gpu" pass "$summary"
  else record "pytest -m gpu" fail "$summary"; fi
else
  record "pytest -m gpu" skipped "no CUDA device"
fi

# --- runtimes: ONNX export, onnxruntime CUDA, TensorRT fp32/fp16 against torch CUDA -------------
if skipping runtimes; then
  record "runtimes (onnx, tensorrt)" skipped "GPU_CHECK_SKIP"
elif [ "$HAS_CUDA" = 1 ]; then
  "$PYTHON" load_tests/gpu_runtimes.py >"$RESULTS/gpu_runtimes.txt" 2>&1
  status=$?
  while IFS='|' read -r _ name result detail; do record "$name" "$result" "$detail"; done \
    < <(grep '^ROW|' "$RESULTS/gpu_runtimes.txt")
  if [ $status != 0 ] && ! grep -q '^ROW|.*|fail|' "$RESULTS/gpu_runtimes.txt"; then
    record "runtimes (onnx, tensorrt)" fail "exit $status, see $RESULTS/gpu_runtimes.txt"
  fi
else
  record "runtimes (onnx, tensorrt)" skipped "no CUDA device (CPU: load_tests/bench_runtimes.py)"
fi

# --- X-Decoder: segmentation images/s per precision and batch, parity, captions/s, encode_texts ---
# load_tests/gpu_bench_xdecoder.py appends one row per measurement as it goes; without CUDA the same
# code runs as a smoke test on the demo model at small sizes (its numbers mean nothing there).
xdecoder_bench() {  # xdecoder_bench TIMEOUT_S NAME ARGS...: run, then add its rows to the table
  local limit=$1 name=$2 rows="$RESULTS/gpu_bench_xdecoder_$2.rows"
  shift 2
  timeout "$limit" "$PYTHON" load_tests/gpu_bench_xdecoder.py "$@" --rows "$rows" \
    --json "$RESULTS/gpu_bench_xdecoder_$name.json" >"$RESULTS/gpu_bench_xdecoder_$name.txt" 2>&1
  local status=$?
  while IFS=$'\t' read -r row_name row_status row_detail; do
    record "xdecoder $row_name" "$row_status" "$row_detail"
  done < <(cat "$rows" 2>/dev/null)
  if [ $status != 0 ]; then
    record "xdecoder $name" fail "exit $status (124: over ${limit} s); see $RESULTS/gpu_bench_xdecoder_$name.txt"
  fi
}
if [ "$HAS_CUDA" = 1 ]; then
  xdecoder_bench 210 main --device cuda
  xdecoder_bench 120 compile --device cuda --sections compile
else
  xdecoder_bench 600 main --device cpu --smoke
  record "xdecoder seg bf16+compile" skipped "no CUDA device (CPU: --smoke --sections compile)"
fi

echo
printf '%-34s %-8s %s\n' CHECK RESULT DETAIL
for row in "${ROWS[@]}"; do echo "$row"; done
exit $FAILED
