#!/usr/bin/env bash
# A GPU node: this host's node agent, detached, with a pidfile. The agent reports
# the host's GPUs (nvidia-smi; or LEGO_EMULATE_GPUS emulated ones) and starts and
# stops actors on the broker's word, each with its own pidfile and log.
# Usage: scripts/lego-node.sh start|stop|status
#   start   start the agent unless it runs; wait until the broker has welcomed it
#           (its `agent_welcomed` log line, so keep its log level at info) within
#           LEGO_START_TIMEOUT_S (default 60); if it dies or is not welcomed: print
#           its log tail, stop it, exit 1.
#   stop    SIGTERM the agent (it stops its actors), SIGKILL after LEGO_STOP_TIMEOUT_S
#           (default 15); then SIGTERM/SIGKILL, by pid, every actor of the node's
#           actor pidfiles that outlived it. Removes the pidfiles.
#   status  the agent's and the actors' pids (exit 3 unless the agent runs).
# Environment (defaults in scripts/common.sh):
#   LEGO_HEAD           the broker's host, as this node reaches it (127.0.0.1)
#   LEGO_BACKEND_PORT   the broker's backend port (5556)
#   LEGO_NODE_HOST      the agent's host name, unique in the cluster ($HOSTNAME)
#   LEGO_NODE_RUN_DIR   pids/ and logs/ of the agent and its actors
#                       ($LEGO_RUN_DIR/nodes/$LEGO_NODE_HOST, LEGO_RUN_DIR: $LEGO_ROOT/run)
#   LEGO_AGENT_ID       (agent@$LEGO_NODE_HOST)
#   LEGO_EMULATE_GPUS   0: the real GPUs; N: N emulated GPUs of LEGO_GPU_MEMORY_GIB (80) each
#   LEGO_DATA_HOST      the address this node's actors serve tensors on; other nodes fetch
#                       from it (read by the agent itself; default: the local end of
#                       the route to LEGO_HEAD, or 127.0.0.1 when LEGO_HEAD is loopback)
#   LEGO_KEYS_DIR       keys on: a folder holding agent.key and actor.key (from `lego keys init`)
#   LEGO_AGENT_ARGS     extra `lego agent` flags, e.g. "--catalog models/catalog.toml"
#   LEGO_VENV           the virtualenv ($LEGO_ROOT/.venv)
#   LEGO_INSTALL        1: create or update it first, as scripts/test.sh does; 0: use it as it is
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$LEGO_ROOT"  # relative paths (run dirs, --catalog) are the checkout's

dir=$LEGO_NODE_RUN_DIR
log="$dir/logs/agent.log"
started=0

abort_start() {
  [ "$started" = 0 ] || stop
}

start() {
  local pid agent_args offset deadline
  read -ra agent_args <<<"$LEGO_AGENT_ARGS"
  [ -z "$LEGO_AGENT_ID" ] || agent_args=(--agent-id "$LEGO_AGENT_ID" "${agent_args[@]}")
  [ "$LEGO_INSTALL" = 0 ] || lego_ensure_venv
  if pid=$(lego_pid "$dir/pids/agent.pid" actors.agent); then
    lego_log "agent already running (pid $pid)"
    return 0
  fi
  trap abort_start EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  lego_private_dirs "$dir"
  offset=$(stat -c %s "$log" 2>/dev/null || echo 0)  # only this run's lines count
  # shellcheck disable=SC2046  # the key flags are words
  lego_spawn "$dir" agent actors.agent --broker "tcp://$LEGO_HEAD:$LEGO_BACKEND_PORT" --host "$LEGO_NODE_HOST" \
    --run-dir "$dir" --emulate-gpus "$LEGO_EMULATE_GPUS" --gpu-memory-gib "$LEGO_GPU_MEMORY_GIB" \
    $(lego_key_args agent) "${agent_args[@]}"
  started=1
  deadline=$((SECONDS + LEGO_START_TIMEOUT_S))
  until tail -c +"$((offset + 1))" "$log" | grep -q agent_welcomed; do
    lego_pid "$dir/pids/agent.pid" actors.agent >/dev/null || lego_fail agent "$log"
    if [ "$SECONDS" -ge "$deadline" ]; then
      lego_fail agent "$log" "not welcomed by the broker at tcp://$LEGO_HEAD:$LEGO_BACKEND_PORT within ${LEGO_START_TIMEOUT_S}s"
    fi
    sleep 0.2
  done
  trap - EXIT INT TERM
  lego_log "node $LEGO_NODE_HOST up: agent pid $(cat "$dir/pids/agent.pid"), broker tcp://$LEGO_HEAD:$LEGO_BACKEND_PORT (logs in $dir/logs)"
}

# pid<TAB>name for every actor pidfile whose process is alive.
actor_pids() {
  local pidfile pid
  for pidfile in "$dir"/pids/actor-*.pid; do
    [ -e "$pidfile" ] || continue
    if pid=$(lego_pid "$pidfile" actors); then
      printf '%s\t%s\n' "$pid" "$(basename "$pidfile" .pid)"
    fi
  done
}

stop() {
  local actors pid name
  actors=$(actor_pids)  # before the agent goes: it removes the pidfiles of actors it reaped
  lego_stop "$dir" agent actors.agent
  actors+=$'\n'$(actor_pids)
  while IFS=$'\t' read -r pid name; do
    if [ -n "$pid" ] && lego_runs "$pid" actors; then
      lego_stop_pid "$name (outlived the agent)" "$pid"
    fi
  done < <(sort -u <<<"$actors")
  rm -f "$dir"/pids/actor-*.pid
}

status() {
  local rc=0 pid name
  lego_status_line "$dir" agent actors.agent || rc=3
  while IFS=$'\t' read -r pid name; do
    echo "$name: running (pid $pid)"
  done < <(actor_pids)
  return "$rc"
}

case "${1:-}" in
  start | stop | status) "$1" ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
