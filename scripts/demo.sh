#!/usr/bin/env bash
# Set up, build small real diffusers models offline (once), start a local micro-served
# cluster, generate one image, stop everything.
# Usage: scripts/demo.sh ["PROMPT"] [OUTPUT.png]
#   LEGO_DEMO_SIZE=mid|tiny     model size (mid: 256 px, a few seconds per image)
#   LEGO_DEMO_BACKEND=emulated  instead: FLUX.1-schnell replayed from H800 profiles
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${LEGO_DEMO_SIZE:=mid}"
: "${LEGO_DEMO_BACKEND:=diffusers}"
: "${LEGO_MODELS_DIR:=$LEGO_RUN_DIR/models/$LEGO_DEMO_SIZE}"
prompt="${1:-a lighthouse on a cliff at dusk, oil painting}"
# Absolute paths before the cd below, so a relative OUTPUT means relative to the caller.
output=$(realpath -m -- "${2:-$LEGO_ROOT/out/demo.png}")
LEGO_RUN_DIR=$(realpath -m -- "$LEGO_RUN_DIR")
LEGO_MODELS_DIR=$(realpath -m -- "$LEGO_MODELS_DIR")
lego_ensure_venv
mkdir -p "$(dirname "$output")"
cd "$LEGO_ROOT"
lego="$LEGO_VENV/bin/lego"
# --port 0: free ports, so the demo never collides with a cluster already running here.
if [ "$LEGO_DEMO_BACKEND" = emulated ]; then
  exec "$lego" up --port 0 --run-dir "$LEGO_RUN_DIR/demo" --seed 42 --generate "$prompt" --output "$output"
fi
if [ ! -f "$LEGO_MODELS_DIR/catalog.toml" ]; then
  "$lego" models tiny "$LEGO_MODELS_DIR" --size "$LEGO_DEMO_SIZE"
fi
exec "$lego" up --port 0 --run-dir "$LEGO_RUN_DIR/demo" --backend diffusers \
  --catalog "$LEGO_MODELS_DIR/catalog.toml" -w "$LEGO_DEMO_SIZE-sd15-txt2img" \
  --seed 42 --generate "$prompt" --output "$output"
