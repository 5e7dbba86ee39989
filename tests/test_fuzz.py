"""Property-based fuzzing of the broker's two ports and an actor's data port (issue 13):
hostile messages (clients/bench/fuzz.py) from peers with no key, a key of the wrong
role, an unknown key and the right key. After each batch the receiver's loop is still
running; afterwards a normal client (or fetch) is served within seconds, nothing was
answered to a peer without a valid key, no handler failed on what it was sent
("internal" errors), and the process's memory holds steady.

Memory: hypothesis keeps a record of every example it ran (about 100 KB each here),
so the process's RSS grows during generation whatever the receiver does. The bound is
therefore checked on a replay: the messages the hypothesis phase sent (a capped
corpus) are sent again from new connections, once to warm up and then until
REPLAY_MESSAGES more have gone, with RSS (psutil) measured around the second part.

Size: LEGO_FUZZ_EXAMPLES examples (batches of 1-10 messages, about 4) per port with
keys off, a sixth of that per keyed case; the default keeps the file under a minute
on a 2-core machine. A long run: LEGO_FUZZ_EXAMPLES=6000 (over 100,000 messages
fuzzed in all, 22 minutes there; -s shows each port's figures).
"""

from __future__ import annotations

import collections
import gc
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.data_server import DataServer
from actors.fetcher import Fetcher
from actors.store import RawTensor, TensorStore
from broker import auth
from broker import protocol as p
from broker.protocol.constants import DEFAULT_LIMITS
from broker.server import BrokerConfig, BrokerServer
from clients import Client
from clients.bench import fuzz
from clients.local import free_port

EXAMPLES = int(os.environ.get("LEGO_FUZZ_EXAMPLES", "100"))
KEYED_EXAMPLES = max(10, EXAMPLES // 6)
BATCH = 10  # messages per example at most
MiB = 1024**2
# The replay sends every message again from a fresh connection, so each leaks whatever
# the receiver keeps per peer or per message. 32 MiB over REPLAY_MESSAGES (at least
# 4000) catches 8 KiB a message at the default size and less in a long run (under
# 2 KiB at 6000 examples), while it leaves room for what legitimately moves, ten times what
# was seen (0.3-2.5 MiB): libzmq's and the allocator's buffers after MiB-sized frames
# (an oversized message is up to 6 MiB, a few can be queued at once) and the broker's
# bounded tables (latency windows, the last 200 outcomes).
RSS_BOUND = 32 * MiB
REPLAY_MESSAGES = max(4000, 3 * EXAMPLES)
CORPUS_MAX = 2000  # messages kept for the replay; oversized ones at most CORPUS_BIG
CORPUS_BIG = 8
ANSWER_WITHIN_S = 5.0
TENSOR_ID, TENSOR_BYTES = "t-held", bytes(range(16))
# pytest's 300 s per test (pyproject.toml) fits the default size; a long run needs more.
pytestmark = pytest.mark.timeout(max(300, EXAMPLES // 4))


def fuzz_settings(examples: int):
    # No example database (a fuzz corpus is not a regression suite) and no deadline
    # (an oversized message takes longer than hypothesis's default 200 ms on a busy box).
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@dataclass
class Corpus:
    """What the hypothesis phase sent, capped, for the memory replay."""

    messages: list = field(default_factory=list)
    big: int = 0

    def add(self, batch) -> None:
        for frames in batch:
            if len(self.messages) >= CORPUS_MAX:
                return
            if sum(len(f) for f in frames) > MiB:
                if self.big >= CORPUS_BIG:
                    continue
                self.big += 1
            self.messages.append(frames)


@dataclass
class Report:
    """One port's figures, printed at the end (pytest -s shows them)."""

    name: str
    fuzzed: fuzz.FuzzCounts = field(default_factory=fuzz.FuzzCounts)
    replayed: fuzz.FuzzCounts = field(default_factory=fuzz.FuzzCounts)
    codes: collections.Counter = field(default_factory=collections.Counter)
    rss_before: int = 0
    rss_after: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        f = self.fuzzed
        replay = (f"{self.replayed.sent} replayed, RSS around the replay {self.rss_before / MiB:.1f} -> "
                  f"{self.rss_after / MiB:.1f} MiB; " if self.replayed.sent else "")
        return (f"fuzz {self.name}: {f.sent + f.refused} messages fuzzed ({f.sent} sent, {f.refused} refused, "
                f"{f.answered} answered, {f.connections} connections); {replay}"
                f"{time.monotonic() - self.started:.1f} s; answers {dict(self.codes)}")


def fuzz_port(address: str, messages, *, context: zmq.Context, examples: int, key=None, server_key=None,
              corpus: Corpus | None = None, alive=lambda: True, report: Report, quiet_s: float = 0.005) -> None:
    """The hypothesis phase: each example is a batch of messages sent from a new socket;
    after each, the receiver's loop must still be running (`alive`)."""

    @fuzz_settings(examples)
    @given(batch=st.lists(messages, min_size=1, max_size=BATCH))
    def run(batch):
        counts = fuzz.fuzz_socket(address, batch, key, server_key=server_key, context=context, quiet_s=quiet_s,
                                  codes=report.codes)
        assert counts.sent + counts.refused == len(batch)
        report.fuzzed.add(counts)
        if corpus is not None:
            corpus.add(batch)
        assert alive(), "the receiver's loop died"

    run()


def replay(address: str, corpus: Corpus, *, context: zmq.Context, report: Report, settle, key=None,
           server_key=None) -> None:
    """Send the corpus once to warm up, then until REPLAY_MESSAGES have gone, RSS around it."""
    assert corpus.messages, "the hypothesis phase sent nothing to replay"
    fuzz.fuzz_socket(address, corpus.messages, key, server_key=server_key, context=context, codes=report.codes)
    settle()
    report.rss_before = rss()
    while report.replayed.sent < REPLAY_MESSAGES:
        report.replayed.add(fuzz.fuzz_socket(address, corpus.messages, key, server_key=server_key, context=context,
                                             codes=report.codes))
    settle()
    report.rss_after = rss()


# ---------------------------------------------------------------- the broker


@dataclass
class RunningBroker:
    server: BrokerServer
    thread: threading.Thread
    frontend: str
    backend: str
    keys: dict[str, Path] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def counters(self) -> dict:
        return dict(self.server.core.counters)

    def words(self) -> tuple[str, ...]:
        """Workflow and model names, so that typed messages reach past the lookups."""
        catalog = self.server.core.catalog
        return (*catalog.workflows, *catalog.models)

    def key(self, role: str | None) -> auth.KeyFile | None:
        return auth.load_key_file(self.keys[role]) if role else None

    def answers(self, role: str | None = None, within_s: float = ANSWER_WITHIN_S) -> None:
        """A normal client is served, promptly."""
        started = time.monotonic()
        with Client(self.frontend, admin_timeout_s=within_s, key_file=str(self.keys[role]) if role else None) as client:
            assert client.workflows()
            assert client.stats() is not None
        assert time.monotonic() - started < within_s

    def settle(self) -> None:
        """Until the loop has read what was queued: a client's round trip queues behind it."""
        self.answers("client" if self.keys else None)


def start_broker(keys: dict[str, Path] | None = None) -> RunningBroker:
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    secured = {"key_file": str(keys["broker"]), "authorized_keys": str(keys["authorized"])} if keys else {}
    server = BrokerServer(BrokerConfig(frontend_address=frontend, backend_address=backend, **secured))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, name="fuzzed-broker", daemon=True)
    thread.start()
    return RunningBroker(server, thread, frontend, backend, keys or {})


def stop_broker(broker: RunningBroker) -> None:
    broker.server.stop()
    broker.thread.join(timeout=10)
    assert not broker.thread.is_alive(), "the broker's loop did not stop"
    broker.server.close()


@pytest.fixture(scope="module")
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def broker():
    running = start_broker()
    yield running
    stop_broker(running)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A cluster's keys, and a stranger's: a well-formed key the broker never authorized."""
    folder = tmp_path_factory.mktemp("fuzz-keys")
    paths = auth.make_cluster_keys(folder / "cluster")
    server = auth.load_key_file(paths["broker"]).public
    auth.write_key_file(folder / "stranger.key", "client", "stranger", server)
    return {**paths, "stranger": folder / "stranger.key"}


@pytest.fixture(scope="module")
def keyed_broker(keys):
    running = start_broker(keys)
    yield running
    stop_broker(running)


PORT_COMMANDS = {"frontend": fuzz.FRONTEND_COMMANDS, "backend": fuzz.BACKEND_COMMANDS}


@pytest.mark.parametrize("port", ["frontend", "backend"])
def test_the_broker_without_keys_survives_hostile_messages_and_serves_a_client(broker, context, port):
    address = getattr(broker, port)
    report, corpus, before = Report(f"broker {port}, keys off"), Corpus(), broker.counters()
    messages = fuzz.port_messages(PORT_COMMANDS[port], broker.words(), near_limit_percent=1)
    fuzz_port(address, messages, context=context, examples=EXAMPLES, corpus=corpus, alive=broker.alive, report=report)
    broker.answers()
    replay(address, corpus, context=context, report=report, settle=broker.settle)
    print(report.line())
    broker.answers()
    after = broker.counters()
    assert after["protocol_errors"] > before.get("protocol_errors", 0), "no hostile message reached the decoder"
    assert report.fuzzed.answered > 0
    assert report.codes["internal"] == 0, "a handler raised on a hostile message (see the log: handler_failed)"
    assert after.get("encode_errors", 0) == 0, "an answer built from a hostile message could not be encoded"
    assert report.rss_after - report.rss_before < RSS_BOUND


# Found by this suite: the broker kept a rejected SUBMIT's workflow name whole in its
# last 200 outcomes and repeated it in the rejection, so every STATS answer carried it:
# a ~1 MiB name put a string over Limits.max_str_len in it, a few 300 KB ones pushed it
# over max_header_bytes, and no client could read STATS until 200 newer outcomes came.
# Now peer-chosen text in outcomes is clipped (broker/core/metering.py: clip).
@pytest.mark.parametrize(("submits", "name_bytes"), [(1, DEFAULT_LIMITS.max_str_len - 100), (8, 300_000)])
def test_submits_naming_huge_unknown_workflows_leave_stats_readable(context, submits, name_bytes):
    running = start_broker()  # its own: the one the others share would stay poisoned
    try:
        frames = [[b"", *p.encode(p.Submit(f"huge-{i}", "w" * name_bytes, {}))] for i in range(submits)]
        counts = fuzz.fuzz_socket(running.frontend, frames, context=context, quiet_s=0.5)
        assert counts.answered == submits  # each one rejected (unknown workflow)
        running.answers(within_s=2.0)  # the workflow list and the stats both come
    finally:
        stop_broker(running)


# (port, role, admitted): no key, a key of another role, a key the broker never
# authorized, and the role that port serves.
KEYED_CASES = [
    ("frontend", None, False), ("frontend", "actor", False), ("frontend", "stranger", False),
    ("frontend", "client", True),
    ("backend", None, False), ("backend", "client", False), ("backend", "stranger", False),
    ("backend", "actor", True),
]


@pytest.mark.parametrize(("port", "role", "admitted"), KEYED_CASES)
def test_the_broker_with_keys_answers_only_valid_keys_and_survives(keyed_broker, context, port, role, admitted):
    address = getattr(keyed_broker, port)
    keyed_broker.answers("client")  # served before, and done with what the previous case sent
    report, before = Report(f"broker {port}, keys on, key {role}"), keyed_broker.counters()
    fuzz_port(address, fuzz.port_messages(PORT_COMMANDS[port], keyed_broker.words(), near_limit_percent=1),
              context=context,
              examples=KEYED_EXAMPLES, key=keyed_broker.key(role), alive=keyed_broker.alive, report=report,
              quiet_s=0.005 if admitted else 0.05)
    print(report.line())
    keyed_broker.answers("client")
    after = keyed_broker.counters()
    reached = sum(after.get(k, 0) - before.get(k, 0) for k in ("protocol_errors", "commands_refused"))
    if admitted:
        assert report.fuzzed.answered > 0 and reached > 0
        assert report.codes["internal"] == 0, "a handler raised on a hostile message (see the log: handler_failed)"
    else:
        assert report.fuzzed.answered == 0, f"a peer with key {role} was answered on the {port} port"
        assert reached == 0, f"a message from a peer with key {role} reached the broker's loop"


# ---------------------------------------------------------------- an actor's data port


@dataclass
class RunningDataServer:
    server: DataServer
    thread: threading.Thread
    stopping: threading.Event
    context: zmq.Context
    key: auth.KeyFile | None

    @property
    def address(self) -> str:
        return self.server.address

    def alive(self) -> bool:
        return self.thread.is_alive()

    def serves_a_fetch(self) -> None:
        """A peer actor's fetch of a held tensor gets its bytes, promptly."""
        fetcher = Fetcher(self.context, actor_id="asker", host="fuzz-host", device="cpu", as_torch=False,
                          key=self.key, telemetry=p.ActorTelemetry(), timeout_s=ANSWER_WITHIN_S, shm=False,
                          shm_min_bytes=0, ipc=False)
        try:
            bundle = fetcher.fetch(p.TensorRef(TENSOR_ID, "fuzzed-actor", self.address), shm=False)
        finally:
            fetcher.close()
        assert bytes(memoryview(bundle["x"].buffer)) == TENSOR_BYTES


def start_data_server(key: auth.KeyFile | None) -> RunningDataServer:
    context = zmq.Context()  # its own: a keyed data server starts a ZAP handler on it
    store = TensorStore()
    store.put(TENSOR_ID, {"x": RawTensor("uint8", (len(TENSOR_BYTES),), TENSOR_BYTES)})
    server = DataServer(context, bind="tcp://127.0.0.1:*", broker_backend=f"tcp://127.0.0.1:{free_port()}", key=key,
                        store=store, ipc=False, actor_id="fuzzed-actor")
    stopping = threading.Event()
    thread = threading.Thread(target=server.run, args=(stopping,), name="fuzzed-actor-data", daemon=True)
    thread.start()
    return RunningDataServer(server, thread, stopping, context, key)


def stop_data_server(running: RunningDataServer) -> None:
    running.stopping.set()
    running.thread.join(timeout=10)
    assert not running.thread.is_alive(), "the data thread did not stop"
    running.server.close()
    running.context.destroy(linger=0)


# Fetches of the held tensor (by frames and by shared memory) among the hostile ones.
DATA_WORDS = (TENSOR_ID,)


def test_a_data_port_without_keys_survives_hostile_messages_and_serves_a_fetch(context):
    data = start_data_server(None)
    try:
        report, corpus = Report("actor data port, keys off"), Corpus()
        # Headers near the limits too: a data socket keeps nothing a peer says.
        messages = fuzz.port_messages(fuzz.DATA_COMMANDS, DATA_WORDS, near_limit_percent=2)
        fuzz_port(data.address, messages, context=context, examples=EXAMPLES, corpus=corpus, alive=data.alive,
                  report=report)
        data.serves_a_fetch()
        replay(data.address, corpus, context=context, report=report, settle=data.serves_a_fetch)
        print(report.line())
        data.serves_a_fetch()
        assert report.fuzzed.answered > 0
        assert report.codes["internal"] == 0, "the data thread failed to serve a fetch (see the log: fetch_failed)"
        assert report.rss_after - report.rss_before < RSS_BOUND
        assert data.server.exporter.count() <= 1  # at most the held tensor's one segment, however often asked
    finally:
        stop_data_server(data)


@pytest.mark.parametrize(("role", "admitted"), [(None, False), ("client", False), ("stranger", False),
                                                ("actor", True)])
def test_a_data_port_with_keys_answers_only_the_actors_key_and_survives(keys, context, role, admitted):
    actor_key = auth.load_key_file(keys["actor"])
    data = start_data_server(actor_key)
    try:
        report = Report(f"actor data port, keys on, key {role}")
        key = auth.load_key_file(keys[role]) if role else None
        fuzz_port(data.address, fuzz.port_messages(fuzz.DATA_COMMANDS, DATA_WORDS), context=context,
                  examples=KEYED_EXAMPLES, key=key, server_key=actor_key.public, alive=data.alive, report=report,
                  quiet_s=0.005 if admitted else 0.05)
        print(report.line())
        data.serves_a_fetch()
        if admitted:
            assert report.fuzzed.answered > 0
        else:
            assert report.fuzzed.answered == 0, f"a peer with key {role} was answered on a data port"
    finally:
        stop_data_server(data)
