"""Who may speak on which socket: CurveZMQ keys with a role, read by every process.

A cluster with keys runs every socket over CurveZMQ. Each process has one key file
(its role, its name, its key pair, and the public key of the server it talks to); the
broker also reads an authorized-keys file (`ROLE NAME PUBLIC_KEY` per line). The ZAP
handler (`RoleAuthenticator`, a thread in each process that binds a socket) admits a
key only on the sockets its role uses and tags every message with `role:name` (the
message's "User-Id"), so the broker checks each command against its sender's role.

Roles: `client` (submit, cancel, list, stats), `scheduler` (stats, spawn, stop,
configure), `admin` (every frontend command), `agent` and `actor` (their backend
commands); actors' data sockets admit actors only, the telemetry feed the scheduler
and admins. Secret keys never reach a log line: `KeyFile.__repr__` hides them.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth.thread

from broker.protocol.constants import Command as C

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ROLES = ("client", "admin", "scheduler", "agent", "actor")
FRONTEND, BACKEND, DATA, TELEMETRY = "frontend", "backend", "data", "telemetry"

_CLIENT = frozenset({C.SUBMIT, C.CANCEL, C.LIST_WORKFLOWS, C.GET_STATS})
_ADMIN_ONLY = frozenset({C.ADMIN_SPAWN, C.ADMIN_STOP, C.ADMIN_CONFIGURE, C.ADMIN_DRAIN, C.ADMIN_REPLICAS, C.ADMIN_PAUSE,
                         C.ADMIN_REGISTER})
# socket -> role -> the commands that role may send there. A role absent from a socket
# cannot even connect to it (the ZAP handler refuses the handshake).
COMMANDS: dict[str, dict[str, frozenset]] = {
    FRONTEND: {
        "client": _CLIENT,
        "scheduler": frozenset({C.GET_STATS, C.LIST_WORKFLOWS, C.ADMIN_SPAWN, C.ADMIN_STOP, C.ADMIN_CONFIGURE}),
        "admin": _CLIENT | _ADMIN_ONLY,
    },
    BACKEND: {
        "actor": frozenset({C.ACTOR_HELLO, C.HEARTBEAT, C.CREDIT, C.BATCH_DONE, C.BATCH_FAILED, C.FREE, C.DISCONNECT}),
        "agent": frozenset({C.AGENT_HELLO, C.HEARTBEAT, C.AGENT_EVENT, C.DISCONNECT}),
    },
    DATA: {"actor": frozenset({C.FETCH})},
    TELEMETRY: {"scheduler": frozenset(), "admin": frozenset()},  # a PUB socket: subscribers send nothing
}


class KeyFileError(ValueError):
    """A key file or authorized-keys file is wrong; the message names the file and line."""


def role_of(user_id: str) -> str:
    """`role:name` (a message's User-Id) -> role."""
    return user_id.partition(":")[0]


def may_send(socket: str, user_id: str | None, command: C) -> bool:
    """Whether the peer behind `user_id` may send `command` on `socket`. Without keys
    (no User-Id) everything is allowed: such a cluster binds loopback only."""
    if user_id is None:
        return True
    return command in COMMANDS.get(socket, {}).get(role_of(user_id), frozenset())


class RoutingOwners:
    """Keys on: which key first spoke with each client routing id (pure, bounded).

    The broker answers a request to the routing id that submitted it, and a client keeps
    one routing id for its life so that answers find it after a reconnect. A peer with
    another key that takes over that id (after the client disconnected) would receive the
    client's answers and could cancel its requests: a routing id stays with the first key
    that used it. The `limit` most recently active ids are remembered."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._owners: dict[bytes, str] = {}  # insertion order = least recently active first

    def owner(self, identity: bytes) -> str | None:
        """The key that owns `identity`, if any spoke with it."""
        return self._owners.get(identity)

    def claim(self, identity: bytes, user_id: str) -> bool:
        """Whether `user_id` may speak as `identity` (and remember it if nobody did)."""
        owner = self._owners.pop(identity, None)
        if owner is not None and owner != user_id:
            self._owners[identity] = owner  # still its owner's, and just active
            return False
        self._owners[identity] = user_id
        if len(self._owners) > self.limit:
            del self._owners[next(iter(self._owners))]
        return True


@dataclass(frozen=True)
class KeyFile:
    """One process's identity: role, name, key pair, and the server key it connects to."""

    role: str
    name: str
    public: bytes
    secret: bytes = field(repr=False)
    server: bytes = b""  # the broker's public key (for actors: also the actors' data key)
    path: str = ""

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"

    def as_server(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` (before bind) a CURVE server in ZAP domain `domain`."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = domain.encode()
        sock.curve_server = True

    def as_client(self, sock: zmq.Socket, server_public: bytes | None = None) -> None:
        """Make `sock` (before connect) a CURVE client of `server_public` (default: the file's server key)."""
        server = server_public or self.server
        if not server:
            raise KeyFileError(f"{self.path}: no server key to connect with (key `server`)")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server


def _z85_key(value, where: str) -> bytes:
    if not isinstance(value, str) or len(value) != 40:
        raise KeyFileError(f"{where}: expected a 40-character Z85 CurveZMQ key")
    try:
        zmq.utils.z85.decode(value)
    except Exception:
        raise KeyFileError(f"{where}: not a Z85 key") from None
    return value.encode()


def load_key_file(path: str | Path) -> KeyFile:
    """Read a key file (TOML: role, name, public, secret, server). It must be private (0600)."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc}") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: the key file holds a secret key and must be 0600 (it is {oct(mode)})")
    role = doc.get("role")
    if role not in ROLES:
        raise KeyFileError(f"{path}: role: expected one of {ROLES}, got {role!r}")
    name = doc.get("name")
    if not isinstance(name, str) or not name or any(c.isspace() or c == ":" for c in name):
        raise KeyFileError(f"{path}: name: expected a word without spaces or ':'")
    server = _z85_key(doc["server"], f"{path}: server") if doc.get("server") else b""
    return KeyFile(role, name, _z85_key(doc.get("public"), f"{path}: public"),
                   _z85_key(doc.get("secret"), f"{path}: secret"), server, str(path))


def write_key_file(path: str | Path, role: str, name: str, server: bytes = b"") -> KeyFile:
    """A new key pair for `role`/`name`, written 0600 (never over an existing file)."""
    if role not in ROLES:
        raise KeyFileError(f"role: expected one of {ROLES}, got {role!r}")
    public, secret = zmq.curve_keypair()
    text = f'role = "{role}"\nname = "{name}"\npublic = "{public.decode()}"\nsecret = "{secret.decode()}"\n'
    if server:
        text += f'server = "{server.decode()}"\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return KeyFile(role, name, public, secret, server, str(path))


def load_authorized(path: str | Path) -> dict[bytes, str]:
    """`ROLE NAME PUBLIC_KEY` per line -> {public key: "role:name"}. A line starting with
    `#` is a comment (only there: Z85 keys may contain `#`)."""
    keys: dict[bytes, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(words) != 3 or words[0] not in ROLES:
            raise KeyFileError(f"{where}: expected ROLE NAME PUBLIC_KEY with ROLE one of {ROLES}")
        key = _z85_key(words[2], where)
        if key in keys:
            raise KeyFileError(f"{where}: this key is already listed as {keys[key]}")
        keys[key] = f"{words[0]}:{words[1]}"
    return keys


class RoleAuthenticator(zmq.auth.thread.ThreadAuthenticator):
    """The ZAP handler of one process: admits a key on a socket (its ZAP domain) only if
    its role uses that socket, and names the peer `role:name` in every message."""

    def __init__(self, context: zmq.Context, authorized: dict[bytes, str]):
        super().__init__(context, log=_quiet_log())
        self.authorized = dict(authorized)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.authorized[zmq.utils.z85.encode(client_public_key)]

    def admit(self, domain: str, z85_key: bytes) -> bool:
        user = self.authorized.get(z85_key)
        return user is not None and role_of(user) in COMMANDS.get(domain, {})

    def start(self) -> None:
        super().start()
        for domain in COMMANDS:
            self.configure_curve_callback(domain, _Provider(self))


class _Provider:
    def __init__(self, auth: RoleAuthenticator):
        self.auth = auth

    def callback(self, domain: str, key: bytes) -> bool:
        return self.auth.admit(domain, key)


def _quiet_log() -> logging.Logger:
    """pyzmq's authenticator logs every handshake with the peer's key at debug: keep it to warnings."""
    logger = logging.getLogger("lego.zap")
    logger.setLevel(logging.WARNING)
    return logger


def make_cluster_keys(folder: str | Path) -> dict[str, Path]:
    """A new cluster's keys in `folder` (0700): the broker's, one per role (named after
    it), and `authorized` listing them. Returns {"broker"/role: key file, "authorized": file}.
    Hand each process its file; add more clients with `add_key`."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_key_file(folder / "broker.key", "admin", "broker")
    paths: dict[str, Path] = {"broker": folder / "broker.key", "authorized": folder / "authorized"}
    fd = os.open(paths["authorized"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    for role in ROLES:
        paths[role] = add_key(folder, role, role)
    return paths


def add_key(folder: str | Path, role: str, name: str) -> Path:
    """A new key for `role`/`name` in `folder`, authorized at its broker (`broker.key`, `authorized`)."""
    folder = Path(folder)
    broker = load_key_file(folder / "broker.key")
    authorized = folder / "authorized"
    known = load_authorized(authorized) if authorized.exists() else {}
    if f"{role}:{name}" in known.values():
        raise KeyFileError(f"{authorized}: {role} {name} is already listed")
    key = write_key_file(folder / f"{name}.key", role, name, broker.public)
    with open(authorized, "a") as f:
        f.write(f"{role} {name} {key.public.decode()}\n")
    return folder / f"{name}.key"
