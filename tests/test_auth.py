"""CurveZMQ keys with roles (broker/auth.py): who may connect where, and who said what."""

from __future__ import annotations

import os

import pytest
import zmq

from broker import auth
from broker.protocol.constants import Command as C


@pytest.fixture
def keys(tmp_path):
    broker = auth.write_key_file(tmp_path / "broker.key", "admin", "broker")
    made = {role: auth.write_key_file(tmp_path / f"{role}.key", role, f"{role}-1", broker.public)
            for role in ("client", "admin", "scheduler", "agent", "actor")}
    (tmp_path / "authorized").write_text("".join(f"{k.role} {k.name} {k.public.decode()}\n" for k in made.values()))
    return broker, made, auth.load_authorized(tmp_path / "authorized")


def _server(context, broker, domain):
    sock = context.socket(zmq.ROUTER)
    sock.linger = 0
    broker.as_server(sock, domain)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _send(context, address, key=None, server_key=None):
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if key is not None:
        key.as_client(sock, server_key)
    sock.sndtimeo = 1500  # a refused handshake can leave the socket with no pipe: never block on it
    sock.connect(address)
    try:
        sock.send(b"hello")
    except zmq.Again:
        pass  # nothing left: the same as a refusal, which the callers assert
    return sock


def _received(sock, timeout_ms=1500):
    if not sock.poll(timeout_ms):
        return None
    frames = sock.recv_multipart(copy=False)
    return frames[-1].get("User-Id")


def test_each_role_reaches_only_its_sockets_and_is_named_in_every_message(keys):
    broker, made, authorized = keys
    context = zmq.Context()
    authenticator = auth.RoleAuthenticator(context, authorized)
    authenticator.start()
    try:
        frontend, front_address = _server(context, broker, auth.FRONTEND)
        backend, back_address = _server(context, broker, auth.BACKEND)
        peers = [_send(context, front_address, made["client"]), _send(context, back_address, made["actor"])]
        assert _received(frontend) == "client:client-1"
        assert _received(backend) == "actor:actor-1"
        peers += [_send(context, front_address, made["actor"]),  # an actor key on the client port
                  _send(context, back_address, made["client"]),  # a client key on the actors' port
                  _send(context, front_address)]  # no key at all
        assert _received(frontend, 1000) is None and _received(backend, 500) is None
        for peer in peers:
            peer.close()
    finally:
        authenticator.stop()
        context.destroy(linger=0)


def test_commands_are_checked_against_the_senders_role():
    assert auth.may_send(auth.FRONTEND, "client:app", C.SUBMIT)
    assert not auth.may_send(auth.FRONTEND, "client:app", C.ADMIN_SPAWN)
    assert not auth.may_send(auth.FRONTEND, "client:app", C.ADMIN_CONFIGURE)
    assert auth.may_send(auth.FRONTEND, "scheduler:s", C.ADMIN_SPAWN)
    assert not auth.may_send(auth.FRONTEND, "scheduler:s", C.ADMIN_PAUSE)
    assert auth.may_send(auth.FRONTEND, "admin:ops", C.ADMIN_PAUSE) and auth.may_send(auth.FRONTEND, "admin:ops", C.SUBMIT)
    assert not auth.may_send(auth.BACKEND, "actor:a", C.AGENT_HELLO)
    assert not auth.may_send(auth.BACKEND, "agent:g", C.BATCH_DONE)
    assert not auth.may_send(auth.FRONTEND, "actor:a", C.SUBMIT)
    assert auth.may_send(auth.FRONTEND, None, C.ADMIN_SPAWN)  # no keys: loopback-only cluster


def test_key_files_are_private_checked_and_never_print_their_secret(tmp_path):
    key = auth.write_key_file(tmp_path / "k.key", "client", "app", b"0" * 40)
    assert oct(os.stat(tmp_path / "k.key").st_mode & 0o777) == "0o600"
    assert key.secret.decode() not in repr(key)
    assert auth.load_key_file(tmp_path / "k.key") == key
    os.chmod(tmp_path / "k.key", 0o644)
    with pytest.raises(auth.KeyFileError, match="must be 0600"):
        auth.load_key_file(tmp_path / "k.key")
    with pytest.raises(FileExistsError):
        auth.write_key_file(tmp_path / "k.key", "client", "app")
    bad = tmp_path / "bad.key"
    bad.write_text('role = "root"\nname = "x"\n')
    os.chmod(bad, 0o600)
    with pytest.raises(auth.KeyFileError, match="role"):
        auth.load_key_file(bad)
    (tmp_path / "authorized").write_text("client app short\n")
    with pytest.raises(auth.KeyFileError, match="authorized:1"):
        auth.load_authorized(tmp_path / "authorized")


def test_a_client_routing_id_stays_with_the_first_key_that_used_it():
    owners = auth.RoutingOwners(limit=2)
    assert owners.claim(b"client-a", "client:app")
    assert owners.claim(b"client-a", "client:app")  # the same key again, e.g. after a reconnect
    assert not owners.claim(b"client-a", "client:other")  # another key taking it over
    assert owners.claim(b"client-b", "client:other")
    assert not owners.claim(b"client-a", "admin:ops")  # still refused: the refusal kept it active
    assert owners.claim(b"client-c", "client:other")  # over the limit: the least recently active goes
    assert owners.claim(b"client-b", "admin:ops")  # (client-b was, not client-a)
    assert not owners.claim(b"client-c", "client:app")
