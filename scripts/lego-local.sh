#!/usr/bin/env bash
# Everything on one machine, in the foreground: broker, node agent, actors for the
# given workflows. Ctrl-C stops all of it. Extra arguments go to `lego up`
# (e.g. -w flux-schnell-txt2img -w flux-schnell-txt2img-cfg --replicas Flux1Schnell=2).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
lego_ensure_venv
cd "$LEGO_ROOT"
exec "$LEGO_VENV/bin/lego" up --port "$LEGO_FRONTEND_PORT" --run-dir "$LEGO_RUN_DIR/local" "$@"
