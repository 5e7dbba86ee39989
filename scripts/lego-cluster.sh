#!/usr/bin/env bash
# A whole cluster from one machine: lego-head.sh on the first host of HOSTS_FILE,
# lego-node.sh on every other one, over ssh.
# Usage: scripts/lego-cluster.sh HOSTS_FILE start|stop|status
#   start   the head first (stops here if it fails), then all nodes in parallel
#   stop    all nodes in parallel first, then the head
#   status  the head, then the nodes
#   Each host's output comes back prefixed with [HOST]; the exit status is non-zero
#   if any host's command failed.
# HOSTS_FILE: one host per line, the first is the head; `#` starts a comment;
# KEY=VALUE words after the host name are that host's environment (no spaces in a
# value), e.g.
#     gpu-head                                # broker + scheduler only
#     gpu-head  LEGO_EMULATE_GPUS=0           # and a node agent on the head too
#     gpu-01
#     gpu-02    LEGO_AGENT_ARGS=--log-level=debug
# A host named `localhost` or `127.0.0.1` runs its command here, from this checkout,
# without ssh (a test cluster on one machine: give each such node its own
# LEGO_NODE_HOST, and LEGO_RUN_DIR or LEGO_NODE_RUN_DIR).
# Every other host runs
#     ssh $LEGO_SSH_OPTS HOST "cd $LEGO_REMOTE_DIR && env ... bash scripts/lego-*.sh ACTION"
# so the checkout (with its .venv, or LEGO_INSTALL=1) must be at LEGO_REMOTE_DIR
# there (default: the same path as here).
# Environment passed to each host, later ones winning:
#   LEGO_HEAD=<the head's host name> (127.0.0.1 for a local head), and on a remote
#   head LEGO_BIND_HOST=0.0.0.0 so other hosts' agents reach the broker; then every
#   LEGO_* variable exported here (except LEGO_ROOT, LEGO_REMOTE_DIR, LEGO_REMOTE_KEYS_DIR,
#   LEGO_SSH_OPTS); on a remote host, with keys, LEGO_KEYS_DIR=$LEGO_REMOTE_KEYS_DIR; then
#   the host's KEY=VALUE words. See lego-head.sh and lego-node.sh for the variables.
# Keys (LEGO_KEYS_DIR set here: a folder from `lego keys init`): on `start`, before a
# remote host's script runs, the key files that host needs are copied to it over ssh,
# and no others: to the head broker.key, authorized, scheduler.key and admin.key, to a
# node agent.key and actor.key (they carry the broker's public key). They go into the
# host's LEGO_KEYS_DIR as above (its KEY=VALUE word, else LEGO_REMOTE_KEYS_DIR, default
# the same path as here; a relative one is under LEGO_REMOTE_DIR): the folder 0700, each
# file 0600 (umask 077, written under a temporary name, then renamed over the old one),
# one ssh per file with the file on stdin, never on a command line. Local hosts read
# LEGO_KEYS_DIR where it is.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ $# -ne 2 ] || [[ ! "$2" =~ ^(start|stop|status)$ ]]; then
  echo "usage: $0 HOSTS_FILE start|stop|status" >&2
  exit 2
fi
hosts_file=$1
action=$2
[ -r "$hosts_file" ] || { lego_log "cannot read $hosts_file"; exit 2; }

hosts=()     # hosts[0] is the head
host_envs=() # each host's KEY=VALUE words, as one line
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
  lineno=$((lineno + 1))
  read -ra words <<<"${line%%#*}"
  [ "${#words[@]}" -gt 0 ] || continue
  for word in "${words[@]:1}"; do
    if [[ ! "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
      lego_log "$hosts_file:$lineno: expected KEY=VALUE after the host name, got '$word'"
      exit 2
    fi
  done
  hosts+=("${words[0]}")
  host_envs+=("${words[*]:1}")
done <"$hosts_file"
if [ "${#hosts[@]}" -eq 0 ]; then
  lego_log "$hosts_file: no hosts"
  exit 2
fi

is_local() { [ "$1" = localhost ] || [ "$1" = 127.0.0.1 ]; }

derived=(LEGO_HEAD="${hosts[0]}")
head_derived=(LEGO_BIND_HOST=0.0.0.0)
if is_local "${hosts[0]}"; then
  derived=(LEGO_HEAD=127.0.0.1)
  head_derived=()
fi
forwarded=()
while IFS= read -r name; do
  case "$name" in
    LEGO_ROOT | LEGO_REMOTE_DIR | LEGO_REMOTE_KEYS_DIR | LEGO_SSH_OPTS) ;;
    LEGO_*) forwarded+=("$name=${!name}") ;;
  esac
done < <(compgen -e)
read -ra ssh_opts <<<"$LEGO_SSH_OPTS"

keys_src=$LEGO_KEYS_DIR  # where the key files are read here
[[ -z "$keys_src" || "$keys_src" == /* ]] || keys_src=$LEGO_ROOT/$keys_src

# assigned NAME ASSIGNMENT...: the value env would give NAME (the last NAME=... wins).
assigned() {
  local name=$1 word value=""
  shift
  for word in "$@"; do
    if [[ "$word" == "$name="* ]]; then value=${word#*=}; fi
  done
  echo "$value"
}

# send_keys HOST DIR FILE...: copy those files of LEGO_KEYS_DIR into DIR on HOST (see
# the header: 0700, 0600, each on stdin).
send_keys() {
  local host=$1 dest=$2 file q remote
  shift 2
  for file in "$@"; do
    [ -r "$keys_src/$file" ] || { lego_log "$host: no $keys_src/$file to copy"; return 1; }
  done
  q=$(printf %q "$dest")
  for file in "$@"; do
    remote="cd $(printf %q "$LEGO_REMOTE_DIR") && umask 077 && mkdir -p $q && chmod 700 $q"
    remote+=" && cat >$q/.$file.tmp && chmod 600 $q/.$file.tmp && mv -f $q/.$file.tmp $q/$file"
    # shellcheck disable=SC2029  # expanded here on purpose, each path quoted with %q
    ssh "${ssh_opts[@]}" "$host" "$remote" <"$keys_src/$file" ||
      { lego_log "$host: could not copy $file into $dest"; return 1; }
  done
  echo "keys copied into $dest: $*"
}

# run_on INDEX SCRIPT: run `SCRIPT ACTION` on host INDEX with its environment (on
# start, a remote host gets its keys first). Called in a background subshell; exec, so
# the job's pid is the command's.
run_on() {
  local host=${hosts[$1]} script=$2 own dest role=node
  local assignments=("${derived[@]}")
  [ "$1" != 0 ] || { assignments+=("${head_derived[@]}"); role="head"; }
  read -ra own <<<"${host_envs[$1]}"
  if is_local "$host"; then
    assignments+=("${forwarded[@]}" "${own[@]}")
    cd "$LEGO_ROOT"
    exec env "${assignments[@]}" bash "scripts/$script" "$action"
  fi
  assignments+=("${forwarded[@]}")
  [ -z "$keys_src" ] || assignments+=(LEGO_KEYS_DIR="$LEGO_REMOTE_KEYS_DIR")
  assignments+=("${own[@]}")
  dest=$(assigned LEGO_KEYS_DIR "${assignments[@]}")
  if [ "$action" = start ] && [ -n "$keys_src" ] && [ -n "$dest" ]; then
    # shellcheck disable=SC2046  # the file names are words
    send_keys "$host" "$dest" $(lego_key_files "$role") || exit 1
  fi
  exec ssh "${ssh_opts[@]}" "$host" \
    "cd $(printf %q "$LEGO_REMOTE_DIR") && env $(printf '%q ' "${assignments[@]}")bash scripts/$script $action"
}

tmp=$(mktemp -d)
job_pids=()  # index -> pid of the running host command
# shellcheck disable=SC2317  # called from the traps below
stop_jobs() {
  local pid
  for pid in "${job_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'rm -rf "$tmp"' EXIT
trap 'stop_jobs; exit 130' INT
trap 'stop_jobs; exit 143' TERM

# on_hosts SCRIPT INDEX...: run SCRIPT on those hosts in parallel; print each one's
# output in hosts-file order; fail if any failed.
on_hosts() {
  local script=$1 i rc=0
  shift
  job_pids=()
  for i in "$@"; do
    run_on "$i" "$script" >"$tmp/$i.out" 2>&1 </dev/null &
    job_pids[i]=$!
  done
  for i in "$@"; do
    if wait "${job_pids[i]}"; then :; else
      echo "$script $action: exit status $?" >>"$tmp/$i.out"
      rc=1
    fi
    sed "s/^/[${hosts[i]}] /" "$tmp/$i.out"
  done
  job_pids=()
  return "$rc"
}

nodes=()
for ((i = 1; i < ${#hosts[@]}; i++)); do nodes+=("$i"); done

rc=0
case "$action" in
  start)
    on_hosts lego-head.sh 0
    [ "${#nodes[@]}" -eq 0 ] || on_hosts lego-node.sh "${nodes[@]}" || rc=1
    ;;
  stop)
    [ "${#nodes[@]}" -eq 0 ] || on_hosts lego-node.sh "${nodes[@]}" || rc=1
    on_hosts lego-head.sh 0 || rc=1
    ;;
  status)
    on_hosts lego-head.sh 0 || rc=1
    [ "${#nodes[@]}" -eq 0 ] || on_hosts lego-node.sh "${nodes[@]}" || rc=1
    ;;
esac
exit "$rc"
