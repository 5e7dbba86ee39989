"""The open-loop load of `lego bench chaos`: requests submitted at scheduled instants
whatever the cluster is going through, and their ends collected.

Runs in the bench's process, on a thread of its own (`chaos-load`); it owns no socket:
it submits through the `Client` it is given (connected to the tap), and `collect`
folds the tap's counts and answer times into one `Observation` per request (the
accounting's input). Its `instants` and `params` may be set until `start` (the
overload scenario sets the instants once it has measured the capacity; the poison
scenario sets the params of a few requests to its poison prompt).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable

from clients.bench.chaos.accounting import REQUEST, WORKFLOW, Observation, classify, was_accepted
from clients.bench.chaos.tap import AnswerTap
from clients.client import Client, Job
from clients.errors import LegoError

# Once every job has ended, the broker must stay silent this long before the tap's counts
# are read: longer than one request takes end to end on an idle cluster, so that a
# request run a second time (say for a repeat of its SUBMIT that reached the broker after
# it had ended: the client resends one unacknowledged for RESUBMIT_AFTER_S) answers
# again within it. Read after QUIET_LIMIT_S at the latest.
QUIET_S, QUIET_LIMIT_S = 3.0, 10.0


def request_params(index: int) -> dict:
    """A distinct prompt and seed per request, a small image: the faults, not the
    model times, should decide the run."""
    return {"prompt": f"chaos request {index}", "seed": index, **REQUEST}


class OpenLoop:
    """Submits at scheduled instants on its own thread whatever the cluster is going
    through: a closed loop would stop offering requests exactly while a fault stalls the
    cluster, and hide what becomes of requests that arrive then."""

    def __init__(self, client: Client, instants: list[float]):
        self.client, self.instants = client, instants
        self.params: Callable[[int], dict] = request_params  # the index-th request's params
        self.jobs: list[Job] = []
        self.submitted_s: dict[str, float] = {}  # request id -> when, after the load started
        self.request_ids: list[str] = []  # the index-th request's id
        self.refused: list[tuple[str, LegoError]] = []  # refused by the client library before sending
        self.finished = threading.Event()
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> OpenLoop:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for index, at in enumerate(self.instants):
                self.finished.wait(max(0.0, self.started_at + at - time.monotonic()))
                request_id = f"chaos-{index}-{os.urandom(4).hex()}"
                self.submitted_s[request_id] = self.elapsed_s()
                self.request_ids.append(request_id)
                try:
                    self.jobs.append(self.client.submit(WORKFLOW, request_id=request_id, progress=False,
                                                        wait_accepted=False, **self.params(index)))
                except LegoError as exc:
                    self.refused.append((request_id, exc))
        finally:
            self.finished.set()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def submitted_through(self, at_s: float) -> bool:
        """Whether every request scheduled at or before `at_s` has been handed to the client."""
        return len(self.submitted_s) >= bisect.bisect_right(self.instants, at_s)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s`; True once every request has been submitted."""
        return self.finished.wait(timeout_s)

    def join(self) -> None:
        self._thread.join()


def collect(load: OpenLoop, tap: AnswerTap, bound_s: float) -> list[Observation]:
    """Wait for every request's end (up to `bound_s` after the last submission), then
    fold in what the wire saw."""
    deadline = time.monotonic() + bound_s
    ends: list[tuple[str, bool, BaseException | None]] = [(rid, False, exc) for rid, exc in load.refused]
    for job in load.jobs:
        try:
            job.result(timeout=max(0.0, deadline - time.monotonic()))
            error = None
        except LegoError as exc:
            error = exc
        ends.append((job.request_id, bool(job.params), error))
    tap.wait_quiet(QUIET_S, QUIET_LIMIT_S)
    answers, accepted = tap.snapshot()
    answered_at = tap.answer_times()
    observations = []
    for request_id, client_accepted, error in ends:
        outcome, code = classify(error)
        n = answers.get(request_id, 0)
        submitted = load.submitted_s.get(request_id, 0.0)
        latency = answered_at[request_id] - load.started_at - submitted if request_id in answered_at else None
        observations.append(Observation(request_id, was_accepted(client_accepted, request_id in accepted, outcome, n),
                                        outcome, code, n, round(submitted, 3), latency,
                                        getattr(error, "retry_after_s", None)))
    return observations

