#!/usr/bin/env bash
# The GPU check: one prepared run for a lent GPU machine (about 4-5 minutes of an
# H100 without the flux stage, which adds an unmeasured 1-3: a 12 B transformer saved
# and loaded twice; the hard limits below (90 s of tests, 450 s of driver) keep it under 9).
#
#   here, once:   bash scripts/gpu-wheels.sh            # .whl/: diffusers, pyzmq, ... (~28 MB)
#   there:        bash scripts/gpu-check.sh [--record] [--stages=LIST]  # `.whl` carried; results in $OUT
#   here, CPU:    bash scripts/gpu-check.sh --dry-run   # same code, tiny sizes, no IPC
#
# --stages=LIST picks the driver's stages (default transfers,sdxl,sd3,batching,flux);
# `--stages=batching` alone (about 1-2 minutes) skips the GPU tests too.
#
# Stages: the CUDA IPC tests (tests/test_cuda_ipc.py -m gpu: two processes, 1,000
# transfers, a SIGKILLed consumer, every layout and dtype), then clients/bench/gpu_check.py:
# IPC vs shared memory vs frames at 128 KiB / 4 MiB / 64 MiB, full-size SDXL (fp16)
# and SD3 (bf16) served by one actor per component on the GPU against the diffusers
# pipeline (identical images, per-step overhead), fused against exact batching of
# full-size SDXL, SD3 and Flux denoisers at 1024 px, 1 to 8 requests per batch (steps per
# second, largest difference), and last FLUX.1-schnell-sized components (bf16, no CFG)
# served against FluxPipeline as SDXL and SD3 are. The driver caps each stage's budget by
# what is left of its 450 s (--time-limit), so a slow stage cannot lose the whole table.
# One table is printed and written to
# $OUT (or run/gpu-check) with the logs; --record also appends it to docs/benchmarks.md,
# which on a lent machine is lost with it: append the fetched benchmarks-entry.md here.
#
# From a session with the device tool (carry the wheels; the run takes 3-4 minutes):
#   run(command="bash scripts/gpu-check.sh --record", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry=0
record=()
stages=transfers,sdxl,sd3,batching,flux
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --record) record=(--record) ;;
    --stages=*) stages="${arg#--stages=}" ;;
    *) echo "usage: $0 [--dry-run] [--record] [--stages=LIST]" >&2; exit 2 ;;
  esac
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
# Keep the log to what matters: the device tool returns only its last 12,000 characters.
export HF_HUB_DISABLE_PROGRESS_BARS=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
export PYTHONWARNINGS=ignore::FutureWarning,ignore::UserWarning
# Same cuBLAS workspace in every process: served and in-process results must match bit for bit.
export CUBLAS_WORKSPACE_CONFIG=:4096:8
out_dir="${OUT:-run/gpu-check}"
mkdir -p "$out_dir"

if [ "$dry" = 1 ]; then
  source scripts/common.sh
  lego_ensure_venv
  py="$LEGO_VENV/bin/python"
  run_args=(--dry-run)
else
  py=python3
  run_args=()
  if compgen -G ".whl/*.whl" > /dev/null; then
    # The image lacks diffusers, pyzmq, structlog and has older transformers/hub: the
    # carried wheels (scripts/gpu-wheels.sh), installed the way the device tool says.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "gpu-check: wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project itself is not installed there

"$py" - <<'EOF' 2>&1 | tee "$out_dir/environment.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("diffusers", "transformers", "huggingface_hub", "tokenizers", "safetensors", "zmq", "structlog", "msgpack"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')}", end="; ")
print()
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: the environment is incomplete" >&2; exit 1; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

status=0
if [ "$dry" = 1 ]; then
  note="not run (dry run: no GPU)"
elif [ "$stages" = batching ]; then
  note="not run (--stages=batching)"
else
  echo "gpu-check: GPU tests (budget 90s)" >&2
  timeout -k 5 90 "$py" -m pytest tests/test_cuda_ipc.py -m gpu -q -p no:cacheprovider -o addopts="-ra" \
    2>&1 | tee "$out_dir/gpu-tests.log"
  tests_status=${PIPESTATUS[0]}
  note=$(grep -E "(passed|failed|error|skipped)" "$out_dir/gpu-tests.log" | tail -1 | tr -d '=' | xargs)
  [ "$tests_status" = 124 ] && note="timed out after 90 s: $note"
  [ "$tests_status" = 0 ] || status=1
fi

timeout -k 10 450 "$py" -m clients.bench.gpu_check run --out "$out_dir" --stages "$stages" "${run_args[@]}" \
  "${record[@]}" --note "$note" --time-limit 450
check_status=$?
[ "$check_status" = 124 ] && echo "gpu-check: the driver ran past its 450 s limit" >&2
[ "$check_status" = 0 ] || status=1
echo "gpu-check: $([ $status = 0 ] && echo PASSED || echo FAILED); table and logs in $out_dir" >&2
exit $status
