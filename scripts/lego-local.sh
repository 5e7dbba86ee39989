#!/usr/bin/env bash
# Everything on one machine: lego-head.sh (broker + scheduler) and lego-node.sh (one
# node agent; the scheduler starts the actors of LEGO_WORKFLOWS through it).
# Usage: scripts/lego-local.sh [up|start|stop|status]
#   up      (default) start, stay in the foreground; Ctrl-C or SIGTERM stops it all
#   start   start both, detached (if the node fails, the head is stopped again)
#   stop    the node (and its actors), then the head
#   status  both
# The node has LEGO_LOCAL_EMULATE_GPUS (default 2) emulated GPUs unless
# LEGO_EMULATE_GPUS is set (0: this machine's real GPUs). Pids and logs under
# $LEGO_RUN_DIR/head and $LEGO_RUN_DIR/nodes/$HOSTNAME; every variable of
# lego-head.sh and lego-node.sh applies, e.g.
#   LEGO_WORKFLOWS=flux-schnell-txt2img,flux-schnell-txt2img-cfg \
#   LEGO_SCHEDULER_ARGS="--actor-option time_scale=0.2" LEGO_BROKER_ARGS="--cost-scale 0.2" \
#   scripts/lego-local.sh
set -euo pipefail
emulate_given=${LEGO_EMULATE_GPUS-}  # before common.sh fills in its default
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export LEGO_EMULATE_GPUS=${emulate_given:-$LEGO_LOCAL_EMULATE_GPUS}
scripts=$LEGO_ROOT/scripts

start() {
  bash "$scripts/lego-head.sh" start
  if ! bash "$scripts/lego-node.sh" start; then
    bash "$scripts/lego-head.sh" stop
    return 1
  fi
}

stop() {
  local rc=0
  bash "$scripts/lego-node.sh" stop || rc=1
  bash "$scripts/lego-head.sh" stop || rc=1
  return "$rc"
}

status() {
  local rc=0
  bash "$scripts/lego-head.sh" status || rc=3
  bash "$scripts/lego-node.sh" status || rc=3
  return "$rc"
}

up() {
  trap stop EXIT
  trap 'exit 0' INT TERM
  start
  lego_log "Ctrl-C stops everything this command started"
  while :; do
    sleep 1 &
    wait $! || true  # a trapped signal interrupts the wait, not only the sleep
  done
}

case "${1:-up}" in
  up | start | stop | status) "${1:-up}" ;;
  *)
    echo "usage: $0 [up|start|stop|status]" >&2
    exit 2
    ;;
esac
