"""Two hosts for real: a node in its own network namespace, reached over a veth pair and ssh.

The test makes a network namespace and a veth pair (root side 10.213.X.1/24, the
namespace's side 10.213.X.2/24) and runs OpenSSH's sshd inside the namespace (root
logs in with a key made here, nothing else). `scripts/lego-cluster.sh` then starts
the cluster from a hosts file, keys on: the head (broker + scheduler) and node A here,
in the root namespace, and node B over ssh, so inside the namespace; each node has
emulated GPUs. It checks that

- lego-cluster.sh copied node B its own keys over ssh (agent.key and actor.key into
  B's keys folder, 0600 in a 0700 folder; not the broker's, the admin's or the
  scheduler's), and that B's agent runs in the namespace with those files;
- each actor's data socket listens on its host's routable address (never loopback),
  and that actors of one host fetched tensors from the other's data sockets (open TCP
  connections across the veth; the broker's `frames_bytes` grows);
- images are served;
- when every process of the namespace is killed with requests in flight, each
  accepted request still ends: completed on node A's replicas, or failed with a
  typed error; none is lost.

Placement: the scheduler puts a workflow's replicas next to each other, so the test
stages them: one replica of each model first (the scheduler's flags), on node B alone
(one GPU), then two once node A (two GPUs) has joined the hosts file and `start` has
run again (what runs already is left as it is); B's GPU holds one denoiser only, so the
second replica of every model goes to A. Needs root, `ip netns` and OpenSSH (sshd,
ssh, ssh-keygen); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from process_helpers import alive, environ, pidfiles  # tests/ is on sys.path

from broker import auth
from broker.catalog import load_catalog
from clients import Client
from clients.errors import RequestFailed, RequestRejected, Timeout
from clients.local import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
WORKFLOW = "flux-schnell-txt2img"
SCRIPT_TIMEOUT_S = 120
SSHD = "/usr/sbin/sshd"  # sshd refuses to start from a relative path
IMAGE = {"steps": 4, "width": 256, "height": 256}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _subnet_in_use(x: int) -> bool:
    return f"10.213.{x}." in _ip("-4", "addr", check=False).stdout


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def _kill_netns(ns: str) -> list[int]:
    """SIGKILL every process in the namespace; wait until they are gone. Returns the pids."""
    killed: list[int] = []
    deadline = time.monotonic() + 10
    while (pids := _netns_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone on its own meanwhile
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)
    return sorted(set(killed))


class Net:
    def __init__(self, ns: str, x: int, veth_root: str):
        self.ns, self.veth_root = ns, veth_root
        self.head_ip, self.node_ip = f"10.213.{x}.1", f"10.213.{x}.2"


@pytest.fixture
def net():
    """A network namespace joined to the root one by a veth pair; removed afterwards."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux (network namespaces)")
    if not shutil.which("ip") or not shutil.which("setsid"):
        pytest.skip("needs `ip` (iproute2) and `setsid`")
    if not (Path(sys.prefix) / "bin" / "python").exists():
        pytest.skip("needs a virtualenv (the launch scripts run LEGO_VENV/bin/python)")
    tag = uuid.uuid4().hex[:6]
    ns, veth_root, veth_ns = f"lego-{os.getpid()}-{tag}", f"lgr{tag}", f"lgn{tag}"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` failed: {made.stderr.strip()}")
    try:
        x = random.choice([x for x in range(1, 255) if not _subnet_in_use(x)] or [1])
        n = Net(ns, x, veth_root)
        _ip("link", "add", veth_root, "type", "veth", "peer", "name", veth_ns)
        _ip("link", "set", veth_ns, "netns", ns)
        _ip("addr", "add", f"{n.head_ip}/24", "dev", veth_root)
        _ip("link", "set", veth_root, "up")
        _ip("-n", ns, "addr", "add", f"{n.node_ip}/24", "dev", veth_ns)
        _ip("-n", ns, "link", "set", veth_ns, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield n
    finally:
        _kill_netns(ns)
        _ip("link", "del", veth_root, check=False)  # takes its peer with it
        _ip("netns", "del", ns, check=False)


SSHD_CONFIG = """\
ListenAddress {address}
Port {port}
HostKey {folder}/host_key
AuthorizedKeysFile {folder}/authorized_keys
PidFile {folder}/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


@pytest.fixture
def ssh_opts(tmp_path, net):
    """OpenSSH's sshd in the namespace, on its veth address, root's login by a key made
    here only; yields the LEGO_SSH_OPTS that reach it. Killed with the namespace."""
    if not Path(SSHD).is_file() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip(f"needs OpenSSH: {SSHD}, ssh and ssh-keygen (apt-get install openssh-server)")
    folder = tmp_path / "ssh"
    folder.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lego-test {name}", "-f",
                        str(folder / name)], check=True, capture_output=True, timeout=30)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()  # free here; nothing listens in the new namespace anyway
    config = folder / "sshd_config"
    config.write_text(SSHD_CONFIG.format(address=net.node_ip, port=port, folder=folder))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    opts = (f"-F /dev/null -p {port} -i {folder / 'client_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 -o LogLevel=ERROR")
    log_path = folder / "sshd.log"  # under tmp_path: _logs shows it with the others
    with open(log_path, "ab") as log:
        sshd = subprocess.Popen(["ip", "netns", "exec", net.ns, SSHD, "-D", "-e", "-f", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while (probe := subprocess.run(["ssh", *opts.split(), net.node_ip, "true"], capture_output=True,
                                       text=True, timeout=30)).returncode != 0:
            if sshd.poll() is not None or time.monotonic() > deadline:
                said = log_path.read_text(errors="replace")
                if "account is locked" in said:
                    pytest.skip("root's account is locked: sshd without PAM refuses its key logins")
                raise AssertionError(f"no ssh login to {net.node_ip}:{port}: {probe.stderr.strip()}\nsshd: {said}")
            time.sleep(0.2)
        yield opts
    finally:
        sshd.kill()  # if the namespace's end has not killed it already
        sshd.wait(timeout=10)


# ------------------------------------------------------------------ processes


def _env(tmp_path: Path, net: Net, ssh_opts: str, frontend_port: int, backend_port: int) -> dict:
    """lego-cluster.sh's environment: every host gets these LEGO_* (the hosts file adds its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGO_")}
    env.update(
        LEGO_VENV=sys.prefix, LEGO_INSTALL="0",  # this interpreter's environment, as it is
        LEGO_KEYS_DIR=str(tmp_path / "keys"), LEGO_REMOTE_KEYS_DIR=str(tmp_path / "node-b-keys"),
        LEGO_SSH_OPTS=ssh_opts,
        LEGO_BIND_HOST=net.head_ip, LEGO_HEAD=net.head_ip,  # the head is local: node B needs its veth address
        LEGO_FRONTEND_PORT=str(frontend_port), LEGO_BACKEND_PORT=str(backend_port),
        LEGO_WORKFLOWS=WORKFLOW,
        LEGO_BROKER_ARGS="--affinity avoid --cost-scale 0.02 --orphan-timeout-s 30",
        LEGO_SCHEDULER_ARGS="--min-replicas 1 --max-replicas 1 --admission off "
                            "--actor-option time_scale=0.02 --interval-s 0.5",
        LEGO_START_TIMEOUT_S="90", LEGO_STOP_TIMEOUT_S="10",
    )
    return env


def _node(host: str, tmp_path: Path, name: str, gpus: int) -> str:
    """A node's line of the hosts file."""
    return f"{host} LEGO_RUN_DIR={tmp_path / name} LEGO_NODE_HOST={name} LEGO_EMULATE_GPUS={gpus}\n"


def _cluster(hosts: Path, action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "lego-cluster.sh"), str(hosts), action],
                          env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)


def _logs(root: Path, tail: int = 3000) -> str:
    return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-tail:]}" for log in sorted(root.rglob("*.log")))


# ------------------------------------------------------------------ sockets, from /proc


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _addr(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    return socket.inet_ntoa(int(ip, 16).to_bytes(4, "little")), int(port, 16)


def _tcp(pid: int) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """(state, local, remote) of the process's IPv4 TCP sockets (LISTEN: "0A", ESTABLISHED: "01")."""
    mine = _socket_inodes(pid)
    rows = []
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return rows
    for line in lines:
        f = line.split()
        if int(f[9]) in mine:
            rows.append((f[3], _addr(f[1]), _addr(f[2])))
    return rows


# ------------------------------------------------------------------ waiting


def _stats(client: Client):
    try:
        return client.stats(timeout=5)
    except Timeout:
        return None


def _placed(stats, models: set[str]) -> dict[str, set[str]]:
    """host -> the models with a live (not draining) actor there."""
    hosts: dict[str, set[str]] = {}
    for a in stats.actors if stats is not None else []:
        if a.state != "draining" and a.model in models:
            hosts.setdefault(a.host, set()).add(a.model)
    return hosts


def _wait(what: str, admin: Client, done, timeout_s: float, root: Path):
    deadline = time.monotonic() + timeout_s
    stats = None
    while time.monotonic() < deadline:
        stats = _stats(admin)
        if stats is not None and done(stats):
            return stats
        time.sleep(0.5)
    summary = None if stats is None else [(a.actor_id, a.model, a.host, a.state) for a in stats.actors]
    raise AssertionError(f"{what}: not within {timeout_s}s; actors: {summary}\n{_logs(root)}")


# ------------------------------------------------------------------ the test


def _assert_node_keys(folder: Path, source: Path) -> None:
    """`folder` holds a node's keys only (agent.key, actor.key: copies of `source`'s), private."""
    assert {f.name for f in folder.iterdir()} == {"agent.key", "actor.key"}, sorted(folder.iterdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700, oct(folder.stat().st_mode)
    for copy in folder.iterdir():
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600, (copy, oct(copy.stat().st_mode))
        assert copy.read_bytes() == (source / copy.name).read_bytes(), copy


def test_two_hosts_over_a_veth_pair(tmp_path, net, ssh_opts):
    keys = auth.make_cluster_keys(tmp_path / "keys")
    frontend_port, backend_port = free_port(), free_port()
    frontend = f"tcp://{net.head_ip}:{frontend_port}"
    env = _env(tmp_path, net, ssh_opts, frontend_port, backend_port)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 LEGO_RUN_DIR={tmp_path / 'head'}  # the head, here: broker + scheduler\n"
                     + _node(net.node_ip, tmp_path, "node-b", 1))  # over ssh, into the namespace
    models = set(load_catalog([]).workflows[WORKFLOW].models)
    expected_ip = {"node-a": net.head_ip, "node-b": net.node_ip}
    seen: dict[Path, int] = {}
    admin = None
    try:
        # Stage 1: the head, and node B over ssh with the keys lego-cluster.sh copies it;
        # one replica of each model (the scheduler's flags), so all on node B.
        started = _cluster(hosts, "start", env)
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr}\n{_logs(tmp_path)}"
        assert f"[{net.node_ip}] keys copied into {tmp_path / 'node-b-keys'}: agent.key actor.key" \
            in started.stdout, started.stdout
        _assert_node_keys(tmp_path / "node-b-keys", tmp_path / "keys")
        seen.update(pidfiles(tmp_path))
        agent_b = pidfiles(tmp_path / "node-b")[tmp_path / "node-b" / "nodes" / "node-b" / "pids" / "agent.pid"]
        assert agent_b in _netns_pids(net.ns), "node B's agent is not in the namespace"
        cmdline = Path(f"/proc/{agent_b}/cmdline").read_bytes().split(b"\0")
        assert f"{tmp_path / 'node-b-keys'}/agent.key".encode() in cmdline, cmdline
        admin = Client(frontend, key_file=str(keys["admin"]), admin_timeout_s=5.0)
        _wait("one actor of each model on node-b", admin,
              lambda s: _placed(s, models).get("node-b") == models, 90, tmp_path)

        # Stage 2: node A joins the hosts file; `start` again starts only what is not running.
        with hosts.open("a") as f:
            f.write(_node("localhost", tmp_path, "node-a", 2))
        started = _cluster(hosts, "start", env)
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr}\n{_logs(tmp_path)}"
        assert "broker already running" in started.stderr + started.stdout, started.stdout
        _wait("node-a's agent", admin, lambda s: {a.host for a in s.agents} == {"node-a", "node-b"}, 30, tmp_path)
        for model in models:  # stage 2: two of each; B's one GPU has no room for a second denoiser
            admin.set_replicas(model, min=2, max=2)
        stats = _wait("actors of every model on both hosts", admin,
                      lambda s: all(_placed(s, models).get(h) == models for h in expected_ip), 120, tmp_path)
        assert sorted(a.host for a in stats.agents) == ["node-a", "node-b"]
        seen.update(pidfiles(tmp_path))

        # Each actor's data socket listens on its host's routable address, never loopback,
        # and that is the address it advertised (the broker's stats show it).
        listening: dict[tuple[str, int], str] = {}  # data address -> host
        for a in stats.actors:
            ip = expected_ip[a.host]
            ports = [local for state, local, _ in _tcp(a.pid) if state == "0A"]
            assert ports and all(addr == ip for addr, _ in ports), (a.actor_id, a.host, ports)
            assert a.data_address in {f"tcp://{addr}:{port}" for addr, port in ports}, (a.actor_id, a.data_address)
            listening.update({local: a.host for local in ports})

        with Client(frontend, key_file=str(keys["client"])) as client:
            for seed in range(4):
                result = client.generate(WORKFLOW, prompt=f"a lighthouse {seed}", seed=seed, timeout=60, **IMAGE)
                assert result.image.shape == (256, 256, 3)

        # Tensors crossed hosts both ways: actors hold connections to the data sockets of the
        # other host's actors, at the addresses those advertised (with `--affinity avoid`, each
        # denoising step moves to the other replica of the denoiser, which is on the other host).
        crossed = set()
        stats = _wait("stats", admin, lambda s: True, 30, tmp_path)
        for a in stats.actors:
            for state, _, remote in _tcp(a.pid):
                if state == "01" and listening.get(remote) not in (None, a.host):
                    crossed.add((a.host, listening[remote]))
        assert crossed == {("node-a", "node-b"), ("node-b", "node-a")}, \
            f"(fetching host, serving host) over the veth: {crossed}\n{_logs(tmp_path)}"
        deadline = time.monotonic() + 20  # the totals come with the actors' heartbeats
        while True:
            transfers = _wait("stats", admin, lambda s: True, 30, tmp_path).transfers
            if transfers is not None and transfers.frames_bytes > 0:
                break
            assert time.monotonic() < deadline, f"no bytes fetched by frames: {transfers}"
            time.sleep(0.5)

        # Kill node B (every process in its namespace) with requests in flight.
        jobs, rejected = [], []
        with Client(frontend, key_file=str(keys["client"])) as client:
            for seed in range(100, 108):
                try:
                    jobs.append(client.submit(WORKFLOW, prompt=f"a storm {seed}", seed=seed, progress=False, **IMAGE))
                except RequestRejected as exc:
                    rejected.append(exc.code)
            assert len(jobs) >= 6, f"rejected: {rejected}"
            deadline = time.monotonic() + 5  # until node B has work or holds tensors (or give up waiting)
            busy_b = []
            while time.monotonic() < deadline and not busy_b:
                actors = getattr(_stats(admin), "actors", [])
                busy_b = [(a.model, a.in_flight, a.held_tensors) for a in actors
                          if a.host == "node-b" and (a.in_flight or a.held_tensors)]
                time.sleep(0.05)
            killed = _kill_netns(net.ns)
            assert killed, "no process in the namespace to kill"

            completed, failed, lost = 0, [], []
            deadline = time.monotonic() + 120
            for job in jobs:
                try:
                    result = job.result(timeout=max(1.0, deadline - time.monotonic()))
                    assert result.image.shape == (256, 256, 3)
                    completed += 1
                except RequestFailed as exc:
                    assert exc.code, exc
                    failed.append(exc.code)
                except Timeout:
                    lost.append(job.request_id)
            assert not lost, f"requests lost (no outcome within 120 s): {lost}; failed: {failed}\n{_logs(tmp_path)}"
            assert completed * 2 > len(jobs), f"only {completed}/{len(jobs)} completed; failed: {failed}"
            print(f"cross-host connections {sorted(crossed)}, {transfers}; node B busy when killed: {busy_b}; "
                  f"{completed}/{len(jobs)} completed, failed: {failed}")

        # Node A alone serves on, on its replicas (and the replacements the scheduler starts).
        with Client(frontend, key_file=str(keys["client"])) as client:
            result = client.generate(WORKFLOW, prompt="after the storm", seed=7, timeout=60, **IMAGE)
            assert result.image.shape == (256, 256, 3)
        _wait("node-b's agent and actors declared gone", admin,
              lambda s: {a.host for a in s.agents} == {"node-a"} and {a.host for a in s.actors} == {"node-a"},
              60, tmp_path)
    finally:
        if admin is not None:
            admin.close()
        seen.update(pidfiles(tmp_path))
        _cluster(hosts, "stop", env)  # node B's ssh fails once the namespace's end has come
        _kill_netns(net.ns)
        for pid in seen.values():  # last resort, by pid, never by name
            if alive(pid) and str(tmp_path) in environ(pid):
                os.kill(pid, signal.SIGKILL)
