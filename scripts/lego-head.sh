#!/usr/bin/env bash
# The head node: the broker and the scheduler actor, detached, one pidfile each.
# Usage: scripts/lego-head.sh start|stop|status
#   start   start what is not running yet; wait until the broker answers and the
#           scheduler has posted its first plan (LEGO_START_TIMEOUT_S, default 60).
#           If a process dies meanwhile: print its log tail, stop what this call
#           started, exit 1.
#   stop    the scheduler, then the broker: SIGTERM, SIGKILL after LEGO_STOP_TIMEOUT_S
#           (default 15); by pidfile, never by name. Removes the pidfiles.
#   status  which pids are alive, then `lego status` (exit 3 unless both run).
# Environment (defaults in scripts/common.sh):
#   LEGO_BIND_HOST      interface the broker binds (127.0.0.1; 0.0.0.0 for other hosts' agents,
#                       which needs keys: the broker binds loopback only without them)
#   LEGO_KEYS_DIR       keys on: `lego keys init DIR` (broker.key, authorized, scheduler.key, admin.key)
#   LEGO_FRONTEND_PORT  clients and the scheduler (5555)
#   LEGO_BACKEND_PORT   actors and node agents (5556)
#   LEGO_HEAD_RUN_DIR   pids/ and logs/ ($LEGO_RUN_DIR/head, LEGO_RUN_DIR: $LEGO_ROOT/run)
#   LEGO_WORKFLOWS      served by the scheduler, comma-separated (flux-schnell-txt2img)
#   LEGO_JOURNAL        the broker's request journal ($LEGO_HEAD_RUN_DIR/journal.sqlite; empty: none):
#                       requests accepted before a broker restart finish after it
#   LEGO_BROKER_ARGS    extra `lego broker` flags, e.g. "--cost-scale 0.05 --cfg-split auto"
#   LEGO_SCHEDULER_ARGS extra `lego scheduler` flags, e.g. "--backend diffusers --admission off"
#   LEGO_VENV           the virtualenv ($LEGO_ROOT/.venv)
#   LEGO_INSTALL        1: create or update it first, as scripts/test.sh does; 0: use it as it is
# Processes also read their own LEGO_<SETTING> variables (e.g. LEGO_CATALOG).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$LEGO_ROOT"  # relative paths (run dirs, --catalog) are the checkout's

dir=$LEGO_HEAD_RUN_DIR
frontend_bind="tcp://$LEGO_BIND_HOST:$LEGO_FRONTEND_PORT"
backend_bind="tcp://$LEGO_BIND_HOST:$LEGO_BACKEND_PORT"
frontend="tcp://$(lego_connect_host "$LEGO_BIND_HOST"):$LEGO_FRONTEND_PORT"
started=()  # by this call: stopped again if the start fails

broker_status() {
  # shellcheck disable=SC2046  # the key flags are words
  timeout "${1:-15}" "$LEGO_VENV/bin/python" -m clients.cli status --broker "$frontend" $(lego_key_args admin)
}

abort_start() {
  local i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do
    lego_stop "$dir" "${started[i]%%:*}" "${started[i]#*:}"
  done
}

# wait_for_status PATTERN NAME:MODULE...: until `lego status` prints a line matching
# PATTERN, while the named processes live (the last one is the one waited for).
wait_for_status() {
  local pattern=$1 deadline=$((SECONDS + LEGO_START_TIMEOUT_S)) name last=${!#} out=""
  shift
  while :; do
    for name in "$@"; do
      lego_pid "$dir/pids/${name%%:*}.pid" "${name#*:}" >/dev/null || lego_fail "${name%%:*}" "$dir/logs/${name%%:*}.log"
    done
    if out=$(broker_status 10 2>&1) && grep -q "$pattern" <<<"$out"; then
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      lego_log "last answer of the broker at $frontend: $out"
      lego_fail "${last%%:*}" "$dir/logs/${last%%:*}.log" "not ready ('$pattern' in lego status) within ${LEGO_START_TIMEOUT_S}s"
    fi
    sleep 0.2
  done
}

start() {
  local pid broker_args scheduler_args
  read -ra broker_args <<<"$LEGO_BROKER_ARGS"
  read -ra scheduler_args <<<"$LEGO_SCHEDULER_ARGS"
  [ "$LEGO_INSTALL" = 0 ] || lego_ensure_venv
  trap abort_start EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if pid=$(lego_pid "$dir/pids/broker.pid" broker.server); then
    lego_log "broker already running (pid $pid)"
  else
    # shellcheck disable=SC2046
    [ -z "$LEGO_JOURNAL" ] || broker_args=(--journal "$LEGO_JOURNAL" "${broker_args[@]}")
    lego_spawn "$dir" broker broker.server --frontend "$frontend_bind" --backend "$backend_bind" \
      $(lego_key_args broker) "${broker_args[@]}"
    started+=(broker:broker.server)
  fi
  wait_for_status '^settings:' broker:broker.server
  if pid=$(lego_pid "$dir/pids/scheduler.pid" scheduler.controller); then
    lego_log "scheduler already running (pid $pid)"
  else
    # shellcheck disable=SC2046
    lego_spawn "$dir" scheduler scheduler.controller --broker "$frontend" --workflows "$LEGO_WORKFLOWS" \
      $(lego_key_args scheduler) "${scheduler_args[@]}"
    started+=(scheduler:scheduler.controller)
  fi
  wait_for_status '^scheduler plan:' broker:broker.server scheduler:scheduler.controller
  trap - EXIT INT TERM
  lego_log "head up: clients connect to $frontend, agents to port $LEGO_BACKEND_PORT (logs in $dir/logs)"
}

stop() {
  lego_stop "$dir" scheduler scheduler.controller
  lego_stop "$dir" broker broker.server
}

status() {
  local rc=0
  lego_status_line "$dir" scheduler scheduler.controller || rc=3
  if lego_status_line "$dir" broker broker.server; then
    broker_status || rc=3
  else
    rc=3
  fi
  return "$rc"
}

case "${1:-}" in
  start | stop | status) "$1" ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
