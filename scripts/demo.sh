#!/usr/bin/env bash
# Set up, start a local micro-served cluster, generate one image, stop everything.
# Usage: scripts/demo.sh ["PROMPT"] [OUTPUT.png]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
prompt="${1:-a lighthouse on a cliff at dusk, oil painting}"
output="${2:-$LEGO_ROOT/out/demo.png}"
lego_ensure_venv
mkdir -p "$(dirname "$output")"
cd "$LEGO_ROOT"
# --port 0: free ports, so the demo never collides with a cluster already running here.
exec "$LEGO_VENV/bin/lego" up --port 0 --run-dir "$LEGO_RUN_DIR/demo" --seed 42 \
  --generate "$prompt" --output "$output"
