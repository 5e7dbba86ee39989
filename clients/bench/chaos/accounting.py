"""The accounting of `lego bench chaos`, pure: the run's settings, what became of each
request (`Observation`, `classify`, `was_accepted`), a scenario's row (`tally`), what
breaks the promise (`problems`) and the markdown table.

No process, no socket, no clock: what the load and the tap observed comes in, the
counts go out. Every submitted request lands in exactly one of completed, failed
(typed), rejected, lost (accepted, never answered) and unanswered (never accepted nor
answered); duplicated counts the request ids the broker answered more than once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from clients.core import DEFAULT_BROKER_SILENCE_S, RESUBMIT_AFTER_S
from clients.errors import RequestFailed, RequestRejected, Timeout

WORKFLOW = "flux-schnell-txt2img"
REQUEST = {"steps": 4, "width": 512, "height": 512}  # ~0.7 s end to end at time_scale 1

COMPLETED, FAILED, REJECTED, UNANSWERED = "completed", "failed", "rejected", "unanswered"
# The broker's own account of its recovery, shown beside the client's: evidence that a
# fault hit work in flight rather than an idle cluster.
RECOVERY_COUNTERS = ("actors_lost", "agents_lost", "tasks_requeued", "stale_results", "requests_restarted",
                     "requests_resumed", "requests_orphaned", "requests_expired")


@dataclass(frozen=True)
class ChaosSettings:
    """One run's knobs. Heartbeats and timeouts are shorter than a production broker's
    (1 s x 5, 600 s, 120 s) so that faults are noticed, and answered, within a run."""

    scenarios: tuple[str, ...] = ()  # empty: all
    rate_per_s: float = 4.0  # offered load (Poisson), whatever the cluster is going through
    load_s: float = 20.0  # seconds of arrivals per scenario
    fault_every_s: float = 3.0  # actor kills
    time_scale: float = 1.0  # emulated model times x this
    replicas: int = 2  # actors per model
    heartbeat_interval_s: float = 0.5
    heartbeat_misses: int = 4  # an actor silent 2 s is declared dead
    request_timeout_s: float = 60.0  # the broker's bound on any accepted request
    orphan_timeout_s: float = 30.0  # long enough for a replacement to join
    unreplaced_orphan_timeout_s: float = 2.0  # actor-kill-unreplaced: fail fast once a model is gone
    broker_down_s: float = 1.0  # broker-restart, broker-hang-kill: the outage (and the hang)
    slack_s: float = 15.0  # past every bound the system has, before a request counts as lost
    seed: int = 13
    run_dir: str = ""  # empty: a fresh temporary directory
    log_level: str = "warning"
    # overload: the capacity measured closed loop (this many requests in flight, admission
    # off, completions counted after a warm-up), then overload_factor x it offered, admission on
    capacity_concurrency: int = 16
    capacity_warm_s: float = 2.0
    capacity_s: float = 8.0
    overload_factor: float = 5.0
    admission_bound: str = "lookahead"  # the broker's default (broker.core.settings)
    admission_overhead_s: float = 0.0  # the broker's default: runtime seconds added to the profiles' solo latency
    goodput_bar: float = 0.9  # goodput / capacity the issue asks for (reported, not enforced)
    # poison: this many of the load's requests, spread evenly over it, carry a prompt that
    # crashes every actor that encodes it
    poison_requests: int = 4

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_misses

    @property
    def answer_bound_s(self) -> float:
        """How long after the last submission a request may still be answered: the
        broker ends every accepted one within request_timeout_s of accepting it, which a
        SUBMIT a dead or hung broker never read waits for until the client sends it again
        (RESUBMIT_AFTER_S later); and the client gives up on a silent broker after
        broker_silence_s (the client's default, as users run it)."""
        return max(self.request_timeout_s + RESUBMIT_AFTER_S, DEFAULT_BROKER_SILENCE_S) + self.slack_s


# Every scenario (broker-hang-kill included since the client resends unacknowledged SUBMITs).
QUICK = {"load_s": 5.0, "rate_per_s": 4.0, "fault_every_s": 2.0, "slack_s": 10.0, "capacity_warm_s": 1.0,
         "capacity_s": 4.0, "poison_requests": 1}  # poison: one per 5 s of load, as in the full run


@dataclass(frozen=True)
class Observation:
    """What one request came to, as its client and the wire saw it."""

    request_id: str
    accepted: bool
    outcome: str  # COMPLETED | FAILED | REJECTED | UNANSWERED
    code: str | None = None
    answers: int = 0  # terminal answers (RESULT, FAILED, REJECTED, ERROR) the broker sent for it
    submitted_s: float = 0.0  # after the load started: to set beside the faults' timeline
    latency_s: float | None = None  # submitted to its first answer on the wire (None: none)
    retry_after_s: float | None = None  # what a rejection said (RequestRejected.retry_after_s)


def classify(error: BaseException | None) -> tuple[str, str | None]:
    """(outcome, code) of `job.result()`'s return (None) or exception. A base LegoError
    is no typed outcome: it counts as failed with an `untyped:` code, which `problems`
    reports."""
    if error is None:
        return COMPLETED, None
    if isinstance(error, RequestRejected):
        return REJECTED, error.code
    if isinstance(error, RequestFailed):  # BrokerUnreachable and Cancelled included
        return FAILED, error.code
    if isinstance(error, Timeout):
        return UNANSWERED, None
    return FAILED, f"untyped:{type(error).__name__}"


def was_accepted(client_saw_accepted: bool, wire_saw_accepted: bool, outcome: str, answers: int) -> bool:
    """Accepted: its ACCEPTED arrived, or the broker answered it other than by a refusal
    (a resumed request's RESULT may come without a second ACCEPTED)."""
    return client_saw_accepted or wire_saw_accepted or (outcome in (COMPLETED, FAILED) and answers > 0)


@dataclass
class Row:
    scenario: str
    faults: int
    submitted: int
    accepted: int
    completed: int
    failed: dict[str, int]
    rejected: dict[str, int]
    lost: int  # accepted, never answered
    unanswered: int  # never accepted, never answered
    duplicated: int  # request ids the broker answered more than once
    wall_s: float
    recovery: dict[str, int] = field(default_factory=dict)  # RECOVERY_COUNTERS that are not 0
    notes: list[str] = field(default_factory=list)  # anomalies besides the counts (reported as problems)
    timeline: list[str] = field(default_factory=list)  # the faults, seconds after the load started
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few request ids per problem, to grep logs for
    overload: dict = field(default_factory=dict)  # the overload scenario's figures (overload.overload_figures)
    poison: dict = field(default_factory=dict)  # the poison scenario's figures (poison.poison_figures)


EXAMPLES = 5


def tally(scenario: str, observations: list[Observation], faults: int, wall_s: float,
          counters: dict | None = None, notes: list[str] | None = None, timeline: list[str] | None = None) -> Row:
    """One table row: every submitted request in exactly one of completed, failed,
    rejected, lost, unanswered; duplicated counted across them."""
    def codes(outcome: str) -> dict[str, int]:
        return dict(sorted(Counter(o.code or "?" for o in observations if o.outcome == outcome).items()))

    def examples(which: Callable[[Observation], bool]) -> list[str]:
        return [f"{o.request_id} (submitted at {o.submitted_s:.2f} s)" for o in observations if which(o)][:EXAMPLES]

    found = {"lost": examples(lambda o: o.accepted and o.outcome == UNANSWERED),
             "unanswered": examples(lambda o: not o.accepted and o.outcome == UNANSWERED),
             "duplicated": examples(lambda o: o.answers > 1)}

    return Row(
        scenario=scenario, faults=faults, submitted=len(observations),
        accepted=sum(o.accepted for o in observations),
        completed=sum(o.outcome == COMPLETED for o in observations),
        failed=codes(FAILED), rejected=codes(REJECTED),
        lost=sum(o.accepted and o.outcome == UNANSWERED for o in observations),
        unanswered=sum(not o.accepted and o.outcome == UNANSWERED for o in observations),
        duplicated=sum(o.answers > 1 for o in observations),
        wall_s=round(wall_s, 1), notes=list(notes or []),
        recovery={name: counters[name] for name in RECOVERY_COUNTERS if (counters or {}).get(name)},
        timeline=list(timeline or []), examples={name: ids for name, ids in found.items() if ids},
    )


def problems(rows: list[Row]) -> list[str]:
    """What breaks the promise that every request ends once, typed: one line each."""
    out = []
    for row in rows:
        for name in ("lost", "unanswered", "duplicated"):
            if getattr(row, name):
                out.append(f"{row.scenario}: {getattr(row, name)} {name}, e.g. {'; '.join(row.examples.get(name, []))} "
                           f"(faults at {'; '.join(row.timeline) or '-'})")
        untyped = sum(n for code, n in row.failed.items() if code.startswith("untyped:"))
        if untyped:
            out.append(f"{row.scenario}: {untyped} ended with an untyped error")
        out += [f"{row.scenario}: {note}" for note in row.notes]
    return out


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code}: {n}" for code, n in counts.items()) or "-"


def chaos_table(rows: list[Row]) -> str:
    """The markdown table, one row per scenario."""
    head = ("| scenario | faults | submitted | accepted | completed | failed (typed) | rejected | lost | "
            "unanswered | duplicated | wall s | broker recovery |\n"
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|")
    lines = [f"| {r.scenario} | {r.faults} | {r.submitted} | {r.accepted} | {r.completed} | {_codes(r.failed)} | "
             f"{_codes(r.rejected)} | {r.lost} | {r.unanswered} | {r.duplicated} | {r.wall_s:g} | "
             f"{_codes(r.recovery)} |" for r in rows]
    return "\n".join([head, *lines])



def rows_of(result: dict) -> list[Row]:
    return [Row(**row) for row in result["rows"]]

