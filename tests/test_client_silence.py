"""A client whose broker goes silent raises instead of waiting for ever (issue 13).

Before: `Job.result()` without a timeout (the default) waited for ever once the broker
stopped answering. Now the client probes a silent broker while jobs wait and fails
them with BrokerUnreachable after `broker_silence_s` without any answer; a broker that
answers the probes keeps a long job waiting however long it runs.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from broker import protocol as p
from clients import BrokerUnreachable, Client
from clients.core import PROBE_AFTER_S, RESUBMIT_AFTER_S, SilenceWatch
from clients.local import free_port


class FakeBroker:
    """A frontend that accepts every SUBMIT, then answers workflow lists only if told to."""

    def __init__(self, answer_probes: bool, ignore_submits: int = 0):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.answer_probes = answer_probes
        self.ignore_submits = ignore_submits  # the first N SUBMITs are lost, as with a broker killed before reading them
        self.submits: list[str] = []
        self.probes = 0
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(self.address)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)
        self._context.term()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            identity, _, *frames = self._sock.recv_multipart()
            msg, _ = p.decode(frames)
            if isinstance(msg, p.Submit):
                self.submits.append(msg.request_id)
                if len(self.submits) <= self.ignore_submits:
                    continue
                reply = p.Accepted(msg.request_id, 4, 2, msg.params)
            elif isinstance(msg, p.ListWorkflows):
                self.probes += 1
                if not self.answer_probes:
                    continue
                reply = p.Workflows([], call_id=msg.call_id)
            else:
                continue
            self._sock.send_multipart([identity, b"", *p.encode(reply)])


def test_a_job_fails_broker_unreachable_once_the_broker_says_nothing_for_broker_silence_s():
    with FakeBroker(answer_probes=False) as broker, Client(broker.address, broker_silence_s=3.0) as client:
        job = client.submit("any", prompt="x")  # accepted, then silence
        started = time.monotonic()
        with pytest.raises(BrokerUnreachable) as caught:
            job.result()  # no timeout: before, this waited for ever
        waited = time.monotonic() - started
        assert 2.5 <= waited < 8.0
        assert caught.value.code == "broker_unreachable" and broker.address in caught.value.message
        assert broker.probes >= 1  # it asked before giving up


def test_a_broker_that_answers_probes_keeps_a_long_job_waiting():
    with FakeBroker(answer_probes=True) as broker, Client(broker.address, broker_silence_s=3.0) as client:
        job = client.submit("any", prompt="x")
        with pytest.raises(TimeoutError):
            job.result(timeout=6.0)  # twice the silence limit: the probes' answers keep it alive
        assert broker.probes >= 2


def test_a_submit_the_broker_never_read_is_sent_again_until_acknowledged():
    # Found by `lego bench chaos` (broker-hang-kill): SUBMITs unread when the broker died
    # were never answered by the restarted broker, and the client waited for ever.
    with FakeBroker(answer_probes=True, ignore_submits=1) as broker, Client(broker.address) as client:
        started = time.monotonic()
        job = client.submit("any", request_id="r-lost", prompt="x", wait_accepted=False)
        job.wait_accepted(timeout=RESUBMIT_AFTER_S + 5.0)
        assert broker.submits == ["r-lost", "r-lost"]  # the same request, sent once more
        assert time.monotonic() - started >= RESUBMIT_AFTER_S * 0.9
        time.sleep(RESUBMIT_AFTER_S + 0.5)
        assert broker.submits == ["r-lost", "r-lost"]  # acknowledged: not sent again


def test_the_silence_watch_probes_then_gives_up_only_while_something_waits():
    watch = SilenceWatch(10.0, now=0.0)
    assert watch.check(100.0, waiting=False) is None  # idle: the clock does not run
    assert watch.check(100.0 + PROBE_AFTER_S - 0.1, waiting=True) is None
    assert watch.check(100.0 + PROBE_AFTER_S, waiting=True) == SilenceWatch.PROBE
    assert watch.check(100.0 + PROBE_AFTER_S + 0.1, waiting=True) is None  # one probe per interval
    watch.heard(105.0)
    assert watch.check(114.9, waiting=True) == SilenceWatch.PROBE
    assert watch.check(115.0, waiting=True) == SilenceWatch.GIVE_UP
    assert SilenceWatch(None, 0.0).check(1e9, waiting=True) == SilenceWatch.PROBE  # None: probes, never gives up


@pytest.mark.parametrize("bad", [0, -1.0, True, "60"])
def test_a_bad_broker_silence_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="broker_silence_s"):
        Client("tcp://127.0.0.1:1", broker_silence_s=bad)
