"""One event, one set of sends: a core handler that raises halfway sends nothing it
queued (messages or FREEs), and the next event's sends are only its own."""

from __future__ import annotations

import pytest

from broker import protocol as p
from broker.core.state import FRONTEND
from broker.protocol.errors import ErrorCode
from broker.server import BrokerConfig, BrokerServer
from tests.broker_helpers import (
    CLIENT,
    batches,
    done,
    freed,
    ident,
    make_core,
    of,
    run,
    standard_actors,
    submit,
)


class Boom(RuntimeError):
    """What the injected handler failure raises (nothing else in the core raises it)."""


def raise_after(core, method: str):
    """Make the dispatcher's `method` do its work, then raise."""
    real = getattr(core.dispatcher, method)

    def broken(*args, **kwargs):
        real(*args, **kwargs)
        raise Boom("halfway")

    setattr(core.dispatcher, method, broken)
    return lambda: setattr(core.dispatcher, method, real)


def test_a_submit_that_raises_after_queueing_sends_nothing():
    core = make_core()
    run(core, standard_actors(core))
    mend = raise_after(core, "dispatch")
    with pytest.raises(Boom):
        core.on_frontend(CLIENT, p.Submit("r1", "plain", {"prompt": "x"}, True), [], 0.0)
    mend()
    # Its Accepted and its first Tasks were queued before the raise: neither leaves now.
    sends = core.on_frontend(CLIENT, p.GetStats(call_id="s"), [], 0.0)
    assert [type(s.msg) for s in sends] == [p.Stats]
    beat = core.on_backend(ident("vae-1"), p.Heartbeat(sent_at=0.0), [], 0.0)
    assert beat == []


def test_a_result_that_raises_after_freeing_sends_no_free():
    core = make_core()
    sends = submit(core, "r1") + standard_actors(core)
    (encode,) = batches(sends, "enc-a-1")
    (first,) = batches(done(core, "enc-a-1", encode), "den-1")
    (second,) = batches(done(core, "den-1", first), "den-1")
    mend = raise_after(core, "dispatch")
    with pytest.raises(Boom):
        done(core, "den-1", second)  # frees step 0's latent and queues the decode, then raises
    mend()
    sends = core.on_backend(ident("enc-a-1"), p.Credit(1), [], 0.0)
    assert freed(sends, "den-1") == [] and of(sends, p.Tasks) == [] and of(sends, p.Progress) == []
    assert sends == []


def test_the_server_answers_a_failed_handler_with_its_error_alone():
    server = BrokerServer(BrokerConfig())
    try:
        mend = raise_after(server.core, "dispatch")
        workflow = sorted(server.core.catalog.workflows)[0]
        sends = server._guarded(server.core.on_frontend, CLIENT, p.Submit("r1", workflow, {"prompt": "x"}, False), [],
                                0.0, reply_to=(FRONTEND, CLIENT))
        assert [(s.identity, type(s.msg), s.msg.code) for s in sends] == [(CLIENT, p.Error, ErrorCode.INTERNAL.value)]
        mend()
        assert server.core.on_tick(0.0) == []
    finally:
        server.close()
