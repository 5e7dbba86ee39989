# shellcheck shell=bash
# Shared defaults and the one set-up step every script uses. Sourced, not run.
# Override any default from the environment, e.g. LEGO_VENV=/opt/lego/venv.
: "${LEGO_ROOT:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${LEGO_VENV:=$LEGO_ROOT/.venv}"
: "${LEGO_PYTHON:=python3}"
# torch is installed first and pinned: an unpinned resolve pulls a multi-GB CUDA
# build. On machines without the local CPU wheel, set e.g.
# LEGO_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
: "${LEGO_TORCH_SPEC:=torch==2.13.0}"
: "${LEGO_EXTRAS:=dev}"
: "${LEGO_RUN_DIR:=$LEGO_ROOT/run}"
: "${LEGO_FRONTEND_PORT:=5555}"
: "${LEGO_BACKEND_PORT:=5556}"
: "${LEGO_BIND_HOST:=127.0.0.1}"
: "${LEGO_HEAD:=127.0.0.1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

# Create the virtualenv if missing and install the project (again only when
# setup.cfg or pyproject.toml changed since the last install).
lego_ensure_venv() {
  if [ ! -x "$LEGO_VENV/bin/python" ]; then
    echo "creating $LEGO_VENV" >&2
    "$LEGO_PYTHON" -m venv "$LEGO_VENV"
  fi
  local stamp="$LEGO_VENV/.lego-installed"
  local want
  want=$(cat "$LEGO_ROOT/setup.cfg" "$LEGO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing legodiffusion into $LEGO_VENV" >&2
    # shellcheck disable=SC2086  # the spec may carry pip options
    "$LEGO_VENV/bin/python" -m pip install -q --disable-pip-version-check $LEGO_TORCH_SPEC
    "$LEGO_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${LEGO_ROOT}[$LEGO_EXTRAS]"
    echo "$want" > "$stamp"
  fi
}

# The console's browser test (tests/test_gateway_console.py) drives Debian's headless
# Chromium. Installed only when missing, as root, with apt-get; never fatal: without a
# browser that test skips and says why. LEGO_INSTALL_BROWSER=0 never installs.
: "${LEGO_INSTALL_BROWSER:=1}"
lego_ensure_browser() {
  if [ "$LEGO_INSTALL_BROWSER" != 1 ] || { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    return 0
  fi
  echo "installing chromium and chromium-driver (the console's browser test)" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null 2>&1; then
    echo "could not install chromium: the browser test will skip" >&2
  fi
  return 0
}

# ---------------------------------------------------------------- bare-metal launch
# Read by lego-head.sh, lego-node.sh, lego-cluster.sh and lego-local.sh (usage in
# their headers). Every process also reads LEGO_<SETTING> for its own settings
# (e.g. LEGO_CATALOG), so names here avoid the settings' names except where the
# meaning is the same (LEGO_WORKFLOWS, LEGO_EMULATE_GPUS, LEGO_AGENT_ID).
: "${LEGO_HEAD_RUN_DIR:=$LEGO_RUN_DIR/head}"        # broker + scheduler: pids/, logs/
# The broker's request journal: accepted requests survive a broker restart. Set it
# empty (LEGO_JOURNAL=) to keep requests in memory only.
: "${LEGO_JOURNAL=$LEGO_HEAD_RUN_DIR/journal.sqlite}"
: "${LEGO_NODE_HOST:=$HOSTNAME}"                    # the agent's --host: unique per node
: "${LEGO_NODE_RUN_DIR:=$LEGO_RUN_DIR/nodes/$LEGO_NODE_HOST}"  # agent + its actors
: "${LEGO_AGENT_ID:=}"                              # empty: agent@HOST
: "${LEGO_EMULATE_GPUS:=0}"                         # 0: the host's real GPUs (nvidia-smi)
: "${LEGO_GPU_MEMORY_GIB:=80}"                      # memory of each emulated GPU
: "${LEGO_LOCAL_EMULATE_GPUS:=2}"                   # lego-local.sh, where LEGO_EMULATE_GPUS is unset
: "${LEGO_WORKFLOWS:=flux-schnell-txt2img}"         # the scheduler serves these (comma-separated)
: "${LEGO_BROKER_ARGS:=}"                           # extra flags, split on whitespace
: "${LEGO_SCHEDULER_ARGS:=}"
: "${LEGO_AGENT_ARGS:=}"
: "${LEGO_KEYS_DIR:=}"                               # keys on: a folder from `lego keys init` (below)
: "${LEGO_INSTALL:=1}"                              # 0: use LEGO_VENV as it is, never pip install
: "${LEGO_START_TIMEOUT_S:=60}"                     # start: until the broker answers / agent is welcomed
: "${LEGO_STOP_TIMEOUT_S:=15}"                      # stop: SIGTERM, then SIGKILL after this
: "${LEGO_REMOTE_DIR:=$LEGO_ROOT}"                  # lego-cluster.sh: the checkout on the other hosts
: "${LEGO_SSH_OPTS:=-o BatchMode=yes}"              # lego-cluster.sh: split on whitespace
: "${LEGO_REMOTE_KEYS_DIR:=$LEGO_KEYS_DIR}"         # lego-cluster.sh: where the keys go on the other hosts

lego_log() { echo "$(basename "$0"): $*" >&2; }

# lego_key_args ROLE...: with LEGO_KEYS_DIR set, the flags that give a process its keys:
#   broker -> --key-file broker.key --authorized-keys authorized; agent -> --key-file
#   agent.key --actor-key-file actor.key; any other role -> --key-file ROLE.key.
# The head needs broker.key, authorized, scheduler.key and admin.key; a GPU node only
# agent.key and actor.key (lego_key_files): copy no more than that to each host.
lego_key_args() {
  [ -n "$LEGO_KEYS_DIR" ] || return 0
  case "$1" in
    broker) echo --key-file "$LEGO_KEYS_DIR/broker.key" --authorized-keys "$LEGO_KEYS_DIR/authorized" ;;
    agent) echo --key-file "$LEGO_KEYS_DIR/agent.key" --actor-key-file "$LEGO_KEYS_DIR/actor.key" ;;
    *) echo --key-file "$LEGO_KEYS_DIR/$1.key" ;;
  esac
}

# lego_key_files head|node: the files of LEGO_KEYS_DIR that lego_key_args names on such a
# host (a node's key files carry the broker's public key); lego-cluster.sh copies these.
lego_key_files() {
  case "$1" in
    head) echo broker.key authorized scheduler.key admin.key ;;
    node) echo agent.key actor.key ;;
  esac
}

# Whether pid $1 is alive: a zombie (exited, not yet reaped by its parent) is not.
lego_alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/stat" ]; then
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ "$state" != Z ] && [ -n "$state" ]
  fi
}

# The address a process on the head connects to when the broker binds $1.
lego_connect_host() {
  case "$1" in 0.0.0.0 | '*') echo 127.0.0.1 ;; *) echo "$1" ;; esac
}

# Whether pid $1 is alive and runs `python -m $2` (not some program that reused the
# pid of a process that exited).
lego_runs() {
  local cmdline
  lego_alive "$1" || return 1
  if [ -r "/proc/$1/cmdline" ]; then
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ " $cmdline " == *" -m $2 "* ]] || return 1
  fi
}

# Print the pid in pidfile $1 if that process is alive and runs `python -m $2`.
lego_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && lego_runs "$pid" "$2" || return 1
  echo "$pid"
}

# lego_private_dirs RUN_DIR: RUN_DIR (0700 when this makes it) and its logs/ and pids/,
# always 0700: logs carry prompts, pidfiles say what to signal (broker/rundir.py does
# the same for the processes Python starts).
lego_private_dirs() {
  [ -d "$1" ] || (umask 077 && mkdir -p "$1")
  mkdir -p "$1/pids" "$1/logs"
  chmod 700 "$1/pids" "$1/logs"
}

# lego_spawn RUN_DIR NAME MODULE ARGS...: start `python -m MODULE ARGS` detached
# (own session, immune to hangups, log in RUN_DIR/logs/NAME.log), the pid in
# RUN_DIR/pids/NAME.pid. The wrapper writes its own pid, then execs Python, so the
# pid is Python's and signals reach it.
lego_spawn() {
  local dir=$1 name=$2 module=$3
  shift 3
  local pidfile="$dir/pids/$name.pid" log="$dir/logs/$name.log" waited=0
  lego_private_dirs "$dir"
  rm -f "$pidfile"
  (umask 077 && echo "=== $(date '+%F %T') starting $module $*" >>"$log")
  chmod 600 "$log"
  # shellcheck disable=SC2016  # $$ and $0 belong to the wrapper
  nohup setsid bash -c 'umask 077 && echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidfile" \
    env PYTHONUNBUFFERED=1 "$LEGO_VENV/bin/python" -m "$module" "$@" >>"$log" 2>&1 </dev/null &
  while [ ! -s "$pidfile" ]; do
    if [ "$waited" -ge 100 ]; then
      lego_log "$name: no pidfile $pidfile after 10 s"
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# lego_stop_pid LABEL PID: SIGTERM, wait up to LEGO_STOP_TIMEOUT_S, then SIGKILL.
lego_stop_pid() {
  local label=$1 pid=$2 deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + LEGO_STOP_TIMEOUT_S))
  while lego_alive "$pid"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      lego_log "$label (pid $pid) outlived ${LEGO_STOP_TIMEOUT_S}s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 5))
      while lego_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
      break
    fi
    sleep 0.1
  done
  lego_log "stopped $label (pid $pid)"
}

# lego_stop RUN_DIR NAME MODULE: stop the process of RUN_DIR/pids/NAME.pid, remove the pidfile.
lego_stop() {
  local dir=$1 name=$2 module=$3 pid
  if pid=$(lego_pid "$dir/pids/$name.pid" "$module"); then
    lego_stop_pid "$name" "$pid"
  fi
  rm -f "$dir/pids/$name.pid"
}

# lego_status_line RUN_DIR NAME MODULE: one line; returns 1 unless the process is alive.
lego_status_line() {
  local dir=$1 name=$2 module=$3 pid
  if pid=$(lego_pid "$dir/pids/$name.pid" "$module"); then
    echo "$name: running (pid $pid)"
  elif [ -f "$dir/pids/$name.pid" ]; then
    echo "$name: dead (stale pidfile $dir/pids/$name.pid; log $dir/logs/$name.log)"
    return 1
  else
    echo "$name: stopped"
    return 1
  fi
}

# lego_fail NAME LOG [WHY]: say what went wrong with NAME, with the tail of its log; returns 1.
lego_fail() {
  lego_log "$1 ${3:-exited}; last lines of $2:"
  tail -n 30 "$2" >&2 || true
  return 1
}
