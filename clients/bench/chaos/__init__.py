"""`lego bench chaos`: faults injected into an emulated cluster under open-loop load,
and every request accounted for (issue 13, fault injection).

Each scenario runs on a fresh local cluster of real processes (broker, node agent, two
emulated actors per model of one workflow) while a thread submits requests at Poisson
instants whatever the cluster is going through, and one fault is injected:

- `actor-kill`: SIGKILL a random actor every few seconds; an operator (this bench, by
  admin spawn) starts a replacement at once;
- `actor-kill-unreplaced`: the same kills, no replacement: once a model has no actor
  left, its requests fail `no_capacity` after `orphan_timeout_s`;
- `actor-stop`: SIGSTOP the busiest actor until the broker declares it dead (heartbeat
  expiry), then SIGCONT: its work re-runs elsewhere, its late results are dropped;
- `agent-kill`: SIGKILL the node agent with requests in flight (its actors exit with
  it); a supervisor starts it again and the operator spawns the actors again;
- `broker-restart`: SIGKILL the journaled broker once a burst is accepted and start it
  again on the same ports and journal: what it had accepted re-runs there;
- `broker-hang-kill`: SIGSTOP the journaled broker just before a burst, SIGKILL it once
  the burst has been sent (as a watchdog kills a hung process), start it again: the
  SUBMITs it never read were never accepted; the client sends them again once they go
  unacknowledged for RESUBMIT_AFTER_S (`clients.core`), and the new broker runs them;
- `overload`: the cluster's capacity measured first (closed loop, admission off), then
  5x it offered with admission on: refusals must be typed (`slo_unattainable`,
  `overloaded`), `slo_unattainable` ones carry `retry_after_s`; their latency and the
  goodput (completed within the SLO, per second, against the capacity) are reported;
- `poison`: `poison_requests` of the load's requests carry a prompt that crashes every
  actor that encodes it (the emulated backend's `crash_on_prompt`); the operator (this
  bench) replaces each actor that exits at once. Each poison request must fail
  `attempts_exhausted` by the broker's quarantine and every other request complete; the
  actor crashes it cost are reported.

Every request ends in one of: completed, failed with a typed code, rejected, lost
(accepted, then no answer within a generous bound), unanswered (never accepted nor
answered), and the broker's answers are counted on the wire as well, by a pass-through
between the load's client and the broker (`AnswerTap`): the client keeps the first
answer for a request id and drops later ones, so a duplicate answer is visible only
below it. Lost, unanswered and duplicated must be 0.

The modules, each importing only those before it:

- `accounting`: the settings, `classify`, `tally`, `problems`, `chaos_table` (pure);
- `tap`: `AnswerTap`, its thread and sockets;
- `load`: `OpenLoop` (the load's thread) and `collect`;
- `faults`: process signalling, `Rig` and the fault injectors;
- `overload`: the overload scenario's capacity run and figures (goodput, refusals);
- `poison`: the poison scenario's prompts, replacements and figures (quarantines, crashes);
- `scenarios`: `SCENARIOS`, one cluster per scenario (`run_scenario`), the whole run
  (`run_chaos_bench`), `record` and the command (`run_cli`).
"""

from __future__ import annotations

from clients.bench.chaos.accounting import (
    COMPLETED,
    FAILED,
    QUICK,
    REJECTED,
    UNANSWERED,
    ChaosSettings,
    Observation,
    Row,
    chaos_table,
    classify,
    problems,
    rows_of,
    tally,
    was_accepted,
)
from clients.bench.chaos.faults import fewest_left
from clients.bench.chaos.overload import (
    ADMISSION_CODES,
    goodput,
    overload_figures,
    overload_notes,
    overload_table,
    percentile,
    request_slo_s,
)
from clients.bench.chaos.poison import (
    POISON_PROMPT,
    QUARANTINE_CODE,
    poison_figures,
    poison_indices,
    poison_notes,
    poison_table,
)
from clients.bench.chaos.scenarios import (
    SCENARIOS,
    Scenario,
    record,
    run_chaos_bench,
    run_cli,
    run_scenario,
    tables,
)
from clients.bench.chaos.tap import AnswerTap

__all__ = [
    "ADMISSION_CODES", "COMPLETED", "FAILED", "POISON_PROMPT", "QUARANTINE_CODE", "QUICK", "REJECTED", "SCENARIOS",
    "UNANSWERED", "AnswerTap", "ChaosSettings", "Observation", "Row", "Scenario", "chaos_table", "classify",
    "fewest_left", "goodput", "overload_figures", "overload_notes", "overload_table", "percentile", "poison_figures",
    "poison_indices", "poison_notes", "poison_table", "problems", "record", "request_slo_s", "rows_of",
    "run_chaos_bench", "run_cli", "run_scenario", "tables", "tally", "was_accepted",
]
