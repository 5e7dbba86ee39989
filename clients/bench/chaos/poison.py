"""The `poison` scenario of `lego bench chaos`: under the same open-loop load, a few
requests carry a prompt that crashes every actor that encodes it (the emulated backend's
`crash_on_prompt` fault option, given to every actor of the cluster, replacements
included). The broker must quarantine each of them (a failure `attempts_exhausted`,
"quarantined", once POISON_LOSSES actors died running its task alone:
broker/core/recovery.py), at the cost of a few actors, and every other request must
complete.

`prepare_poison` (the scenario's `prepare`) runs on the scenario's main thread before the
load starts: it makes `poison_requests` of the load's requests poison and notes which
model and device each actor's spawn id stands for. `replace_crashed` (its `inject`) acts
as an operator does (the node agent restarts nothing): every actor exit the agent
reports, through the admin `Client` straight to the broker, is a crash and is replaced
at once by an actor of the same model on the same device, until every request has
ended. `poison_result` counts the crashes from the agent's events and the broker's
counters at the end. `poison_indices`, `poison_figures`, `poison_notes` and
`poison_table` are pure.
"""

from __future__ import annotations

import time
from collections import Counter

from broker import protocol as p
from broker.catalog import load_catalog
from broker.core.recovery import POISON_LOSSES
from broker.protocol.errors import ErrorCode
from clients.bench.chaos.accounting import (
    COMPLETED,
    FAILED,
    REQUEST,
    UNANSWERED,
    WORKFLOW,
    Observation,
    Row,
)
from clients.bench.chaos.faults import Rig
from clients.bench.chaos.load import request_params
from clients.bench.chaos.overload import percentile
from clients.errors import RequestFailed

POISON_PROMPT = "chaos poison: this prompt crashes every actor that encodes it"
QUARANTINE_CODE = ErrorCode.ATTEMPTS_EXHAUSTED.value  # recovery.requeue's failure of a quarantined task
QUARANTINE_WORD = "quarantined"  # in that failure's message: apart from max_task_attempts' attempts_exhausted
POLL_S = 0.1
BROKER_COUNTERS = ("actors_lost", "tasks_quarantined")


# ---------------------------------------------------------------- pure


def poison_indices(n: int, k: int) -> frozenset[int]:
    """k of n requests spread evenly (the middle of each k-th of the load), so that each
    poison request's crashes and replacements are mostly over before the next one."""
    k = min(k, n)
    return frozenset(int((j + 0.5) * n / k) for j in range(k)) if k > 0 else frozenset()


def poison_params(index: int) -> dict:
    return {"prompt": POISON_PROMPT, "seed": index, **REQUEST}


def _codes(observations: list[Observation]) -> dict[str, int]:
    """What became of requests that did not complete: their code, else their outcome."""
    return dict(sorted(Counter(o.code or o.outcome for o in observations if o.outcome != COMPLETED).items()))


def poison_figures(observations: list[Observation], poison_ids: set[str], messages: dict[str, str], crashes: int,
                   replaced: int, encoders: int, counters: dict[str, int]) -> dict:
    """The poison row's figures: what became of the poison requests and of the others,
    and the actor crashes the poison cost (the agent's count and the broker's)."""
    poison = [o for o in observations if o.request_id in poison_ids]
    good = [o for o in observations if o.request_id not in poison_ids]
    quarantined = [o for o in poison if o.outcome == FAILED and o.code == QUARANTINE_CODE
                   and QUARANTINE_WORD in messages.get(o.request_id, "")]
    ended_s = [o.latency_s for o in quarantined if o.latency_s is not None]
    n = len(poison)
    return {
        "poison_submitted": n, "poison_quarantined": len(quarantined), "poison_ends": _codes(poison),
        "poison_completed": sum(o.outcome == COMPLETED for o in poison),
        "poison_unended": sum(o.outcome == UNANSWERED for o in poison),
        "quarantine_s": [round(percentile(ended_s, 50), 2), round(max(ended_s), 2)] if ended_s else [],
        "crashes": crashes, "crashes_per_poison": round(crashes / n, 2) if n else 0.0,
        "crash_bound": [POISON_LOSSES * n, POISON_LOSSES * encoders * n], "replaced": replaced,
        **{name: counters.get(name, 0) for name in BROKER_COUNTERS},
        "good_submitted": len(good), "good_completed": sum(o.outcome == COMPLETED for o in good),
        "good_ends": _codes(good),
    }


def poison_notes(f: dict) -> list[str]:
    """What breaks the promise (for `Row.notes`, so exit 1): a poison request that completed,
    was never answered or failed otherwise than by the quarantine; a good request that did not
    complete. Crashes past what the quarantine should cost (POISON_LOSSES per text encoder
    that runs the prompt, per poison request) are reported beside, not a problem: the cost is
    the broker's policy, the promise is the requests' ends."""
    notes = []
    if not f["poison_submitted"]:
        notes.append("no poison request was submitted")
    if f["poison_completed"]:
        notes.append(f"{f['poison_completed']} poison request(s) completed")
    if f["poison_unended"]:
        notes.append(f"{f['poison_unended']} poison request(s) never answered")
    if f["poison_quarantined"] < f["poison_submitted"] - f["poison_completed"] - f["poison_unended"]:
        notes.append(f"poison requests ended {f['poison_ends']}, {f['poison_quarantined']} of them "
                     f"{QUARANTINE_CODE} '{QUARANTINE_WORD}'")
    if f["good_completed"] < f["good_submitted"]:
        notes.append(f"{f['good_submitted'] - f['good_completed']} good request(s) did not complete: {f['good_ends']}")
    return notes


def poison_table(rows: list[Row]) -> str:
    """The poison scenario's own table ('' when no row has its figures)."""
    head = ("| scenario | poison submitted | poison ended | quarantined | failed after s (p50 / max) | actor crashes "
            "(per poison; bound) | replaced | broker actors_lost / tasks_quarantined | good completed / submitted |\n"
            "|---|---:|---|---:|---|---|---:|---|---|")
    lines = []
    for r in rows:
        f = r.poison
        if not f:
            continue
        ends = ", ".join(f"{code}: {n}" for code, n in f["poison_ends"].items()) or "-"
        after = " / ".join(f"{x:g}" for x in f["quarantine_s"]) or "-"
        good = ", ".join(f"{code}: {n}" for code, n in f["good_ends"].items())
        low, high = f["crash_bound"]
        over = "" if low <= f["crashes"] <= high else " **outside**"
        lines.append(f"| {r.scenario} | {f['poison_submitted']} | {ends} | {f['poison_quarantined']} | {after} | "
                     f"{f['crashes']} ({f['crashes_per_poison']:g}; {low}-{high}{over}) | "
                     f"{f['replaced']} | {f['actors_lost']} / {f['tasks_quarantined']} | "
                     f"{f['good_completed']} / {f['good_submitted']}{f' ({good})' if good else ''} |")
    return "\n".join([head, *lines]) if lines else ""


# ---------------------------------------------------------------- the cluster


def spawn_of(actor_id: str) -> str:
    """The spawn id an actor's id ends with (`model@host/device#spawn_id`, actors/agent.py)."""
    return actor_id.rpartition("#")[2]


def agent_events(stats: p.Stats, event: str) -> set[str]:
    """The spawn ids whose last event, as their agent reported it, is `event`."""
    return {spawn_id for agent in stats.agents for spawn_id, last in agent.actors if last == event}


def prepare_poison(rig: Rig) -> None:
    """Make poison_requests of the load's requests poison; note each actor's spawn id and
    the broker's counters before the load."""
    indices = poison_indices(len(rig.load.instants), rig.s.poison_requests)
    rig.load.params = lambda index: poison_params(index) if index in indices else request_params(index)
    stats = rig.admin.stats()
    rig.figures.update(indices=indices, replaced=0, exited_before=agent_events(stats, "exited"),
                       origin={spawn_of(a.actor_id): (a.model, a.device) for a in rig.our_actors(stats)},
                       counters_before={name: stats.counters.get(name, 0) for name in BROKER_COUNTERS})


def every_request_ended(rig: Rig) -> bool:
    return rig.load.finished.is_set() and all(job.done() for job in rig.load.jobs)


def replace_crashed(rig: Rig) -> int:
    """Replace each actor that exits, at once, until every request has ended (a poison
    request's last crash may come after the load's last submission); the poison requests
    submitted (the faults)."""
    f = rig.figures
    handled, origin = set(f["exited_before"]), f["origin"]
    deadline = None
    while not every_request_ended(rig):
        stats = rig.admin.stats()
        for spawn_id in sorted(agent_events(stats, "exited") - handled):
            handled.add(spawn_id)
            if spawn_id not in origin:
                rig.notes.append(f"an actor this bench did not start exited (spawn {spawn_id})")
                continue
            model, device = origin[spawn_id]
            rig.event(f"{model} on {device} exited (spawn {spawn_id}); replaced")
            origin.update(dict.fromkeys(rig.spawn(model, device), (model, device)))
            f["replaced"] += 1
        if deadline is None and rig.load.finished.is_set():
            deadline = time.monotonic() + rig.s.answer_bound_s
        if deadline is not None and time.monotonic() > deadline:
            break  # what never ended is counted lost by the accounting
        time.sleep(POLL_S)
    refused = agent_events(rig.admin.stats(), "refused")
    if refused:
        rig.notes.append(f"the agent refused {len(refused)} replacement spawn(s)")
    return sum(index < len(rig.load.request_ids) for index in f["indices"])


def failure_messages(rig: Rig, request_ids: set[str]) -> dict[str, str]:
    """The failure message of each of these requests that failed (every job has ended)."""
    messages = {}
    for job in rig.load.jobs:
        if job.request_id in request_ids and job.done():
            try:
                job.result(timeout=0)
            except RequestFailed as exc:
                messages[job.request_id] = exc.message
    return messages


def poison_result(rig: Rig, observations: list[Observation], stats: p.Stats) -> dict:
    """The row's figures, after the load, from the final stats: crashes are the actor exits
    the agent reported since the load started (nothing else stops an actor here)."""
    f = rig.figures
    poison_ids = {rig.load.request_ids[i] for i in f["indices"] if i < len(rig.load.request_ids)}
    crashes = len(agent_events(stats, "exited") - f["exited_before"])
    counters = {name: stats.counters.get(name, 0) - f["counters_before"][name] for name in BROKER_COUNTERS}
    encoders = len(load_catalog().workflows[WORKFLOW].text_encoders)
    return poison_figures(observations, poison_ids, failure_messages(rig, poison_ids), crashes, f["replaced"],
                          encoders, counters)
