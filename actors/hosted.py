"""Emulated actors hosted inside the node agent's process (agent option `hosted_emulated`).

Runs in the node agent process. A `HostedActor` is one `ActorRuntime` whose compute
loop runs on a thread of the agent instead of as the main thread of a process of its
own; the runtime starts its heartbeat and data threads as it always does and owns its
own sockets (work, control, data, fetch), on a ZeroMQ context of its own unless
given one (the node agent gives none: see `NodeAgent._start_hosted`). The broker
sees an ordinary actor (its hello carries the agent's pid). Only emulated actors are
hosted: they sleep for profile times and import no torch, so an emulated cluster of
dozens of actors costs one process instead of dozens on a machine with few cores.

A `HostedActor` answers what the agent asks of the `subprocess.Popen` of an actor
process (`pid`, `returncode`, `poll`, `terminate`, `kill`, `wait`), so the agent's
bookkeeping of starts, stops, exits and device memory is the same for both. What
differs: no signal handlers (signals reach the main thread only: the agent's), no
pidfile and no log file of its own (its lines go to the agent's log, each carrying its
`actor_id`), peers' outputs come as frames rather than through shared memory (see
`NodeAgent._start_hosted`), and `kill` cannot end a thread: it stops waiting for it
(the thread ends after its current batch, and cannot outlive the agent's process).

Actors on one emulated device still take turns through the device lock: the emulated
GPU takes an `flock` on a descriptor it opens per batch, and flock locks belong to an
open file description, so they exclude threads of one process as they exclude
processes (tests/test_hosted_actors.py checks it).
"""

from __future__ import annotations

import os
import signal
import threading

import structlog
import zmq

from actors.runtime import ActorConfig, ActorRuntime

log = structlog.get_logger(__name__)

# The backends a hosted actor may run: the emulated ones (`monolith` is the emulated
# baseline), which sleep instead of computing and import no torch. `noop` stays a
# process: it measures the runtime's own cost per step (`lego bench overhead`).
HOSTED_BACKENDS = frozenset({"emulated", "monolith"})
# Options whose effect needs a process of its own: `crash_on_prompt` exits the process.
PROCESS_OPTIONS = frozenset({"crash_on_prompt"})
ABANDONED_CODE = -signal.SIGKILL  # what `poll` says of a thread `kill` stopped waiting for
FAILED_CODE = 1  # the runtime raised, as an actor process that raised exits


def hostable(backend: str, device_kind: str, options: dict) -> bool:
    """Whether an actor can run on a thread of the agent rather than in its own process:
    an emulated backend, not pinned to a real GPU, and no option that needs a process."""
    return backend in HOSTED_BACKENDS and device_kind != "cuda" and not PROCESS_OPTIONS & set(options)


class HostedActor:
    """One actor runtime on a thread of this process, shaped like a `subprocess.Popen`."""

    def __init__(self, config: ActorConfig, context: zmq.Context | None = None):
        self.config = config
        self.context = context
        self.pid = os.getpid()
        self.returncode: int | None = None
        self.runtime: ActorRuntime | None = None  # built on its own thread, as a process builds it
        self._code: int | None = None
        self._stop_requested = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=f"hosted-{config.actor_id}"[:64], daemon=True)

    def start(self) -> HostedActor:
        self._thread.start()
        return self

    def _run(self) -> None:
        structlog.contextvars.bind_contextvars(actor_id=self.config.actor_id)  # this thread's lines
        code = 0
        try:
            self.runtime = ActorRuntime(self.config, self.context)
            if self._stop_requested:  # stopped while it was being built
                self.runtime.stop()
            self.runtime.run()
        except BaseException:  # an actor process that raised exits non-zero: so does this one
            log.exception("hosted_actor_failed", actor_id=self.config.actor_id)
            code = FAILED_CODE
            self._close_after_failure()
        self._code = code

    def _close_after_failure(self) -> None:
        """A process's sockets close when it exits; a thread's must be closed (and its
        context terminated). `run` does both itself, except when it raised before
        computing (e.g. in the backend's `load`)."""
        if self.runtime is None:
            return
        try:
            self.runtime.close_data_plane()
        except Exception:
            log.exception("hosted_actor_close_failed", actor_id=self.config.actor_id)

    # ------------------------------------------------------------------ the Popen the agent sees

    def poll(self) -> int | None:
        """The exit code once its thread has ended (or `kill` gave up on it); else None."""
        if self.returncode is None:
            if not self._thread.is_alive():
                self.returncode = self._code if self._code is not None else FAILED_CODE
            elif self._abandoned:
                self.returncode = ABANDONED_CODE
        return self.returncode

    def terminate(self) -> None:
        """What SIGTERM does to an actor process: finish the current batch, say goodbye, end."""
        self._stop_requested = True
        runtime = self.runtime
        if runtime is not None:
            runtime.stop()

    def kill(self) -> None:
        """A thread cannot be killed: stop it and stop waiting for it."""
        if self._thread.is_alive():
            log.warning("hosted_actor_abandoned", actor_id=self.config.actor_id)
        self.terminate()
        self._abandoned = True

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._abandoned:
            self._thread.join(timeout)
        return self.poll()
