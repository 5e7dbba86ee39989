"""`lego bench chaos` (issue 13): faults under load, every request accounted for.

The accounting is pure and tested alone; the wire tap is tested against a fake broker
that answers one request twice (the client keeps one answer, the tap counts both);
the quick run kills and stops actors, the agent and the broker (killed outright, and
killed after a hang with SUBMITs unread) of real local clusters, overloads one (5x
its measured capacity, admission on) and sends one a poison request, and asserts that
nothing accepted was lost or answered twice, that work completed in every scenario, that
refusals under overload were typed and that the poison request, alone, failed by the
broker's quarantine. No timing is asserted (goodput included): the machine running it
may be busy.
"""

from __future__ import annotations

import threading

import pytest
import zmq

from broker import protocol as p
from broker.catalog import load_catalog, validate_params
from broker.costs.model import CostModel
from clients import Client, RequestFailed, RequestRejected, Timeout
from clients.bench.chaos import (
    ADMISSION_CODES,
    COMPLETED,
    FAILED,
    QUARANTINE_CODE,
    QUICK,
    REJECTED,
    SCENARIOS,
    UNANSWERED,
    AnswerTap,
    ChaosSettings,
    Observation,
    chaos_table,
    classify,
    fewest_left,
    goodput,
    overload_figures,
    overload_notes,
    overload_table,
    percentile,
    poison_figures,
    poison_indices,
    poison_notes,
    poison_table,
    problems,
    request_slo_s,
    rows_of,
    run_chaos_bench,
    run_cli,
    tables,
    tally,
    was_accepted,
)
from clients.cli.commands import build_parser
from clients.core import DEFAULT_BROKER_SILENCE_S, RESUBMIT_AFTER_S
from clients.errors import BrokerUnreachable, LegoError

# ---------------------------------------------------------------- accounting (pure)


@pytest.mark.parametrize(("error", "expected"), [
    (None, (COMPLETED, None)),
    (RequestFailed("r", "no_capacity", "gone"), (FAILED, "no_capacity")),
    (BrokerUnreachable("r", "broker_unreachable", "silent"), (FAILED, "broker_unreachable")),
    (RequestRejected("r", "overloaded", "busy"), (REJECTED, "overloaded")),
    (Timeout("r not finished"), (UNANSWERED, None)),
    (LegoError("what?"), (FAILED, "untyped:LegoError")),
])
def test_every_end_of_a_job_is_classified(error, expected):
    assert classify(error) == expected


def test_a_resumed_requests_result_counts_as_accepted_without_a_second_accepted():
    assert was_accepted(False, False, COMPLETED, answers=1)
    assert not was_accepted(False, False, REJECTED, answers=1)
    assert not was_accepted(False, False, FAILED, answers=0)  # the client's own BrokerUnreachable
    assert was_accepted(False, True, UNANSWERED, answers=0)


def _observations() -> list[Observation]:
    return [Observation("a", True, COMPLETED, answers=1), Observation("b", True, FAILED, "no_capacity", 1),
            Observation("c", True, FAILED, "no_capacity", 1), Observation("d", False, REJECTED, "overloaded", 1),
            Observation("e", True, UNANSWERED, submitted_s=1.5), Observation("f", False, UNANSWERED),
            Observation("g", True, COMPLETED, answers=2)]


def test_tally_puts_every_request_in_exactly_one_bucket():
    row = tally("x", _observations(), faults=2, wall_s=3.04, counters={"actors_lost": 2, "tasks_requeued": 0},
                timeline=["1.00 s: SIGKILL a"])
    assert (row.submitted, row.accepted, row.completed, row.lost, row.unanswered, row.duplicated) == (7, 5, 2, 1, 1, 1)
    assert row.failed == {"no_capacity": 2} and row.rejected == {"overloaded": 1}
    assert row.submitted == row.completed + sum(row.failed.values()) + sum(row.rejected.values()) + row.lost \
        + row.unanswered
    assert row.recovery == {"actors_lost": 2} and row.wall_s == 3.0
    assert row.examples["lost"] == ["e (submitted at 1.50 s)"]
    found = problems([row])
    assert len(found) == 3 and "1.00 s: SIGKILL a" in found[0]
    assert "| x | 2 | 7 | 5 | 2 | no_capacity: 2 | overloaded: 1 | 1 | 1 | 1 | 3 | actors_lost: 2 |" in chaos_table([row])


def test_an_untyped_end_is_a_problem():
    row = tally("x", [Observation("a", True, FAILED, "untyped:LegoError", 1)], 0, 1.0)
    assert problems([row]) == ["x: 1 ended with an untyped error"]


def test_without_replacements_kills_go_to_the_model_with_fewest_actors_left():
    actors = [p.ActorStats(f"{m}-{i}", m, "h", "emu:0", "idle", 1, 0, 0, 0, 0, 0, 0)
              for m, n in (("A", 2), ("B", 1), ("C", 1)) for i in range(n)]
    assert {a.model for a in fewest_left(actors)} == {"B", "C"}
    assert fewest_left([]) == []


def test_the_burst_joins_the_poisson_arrivals_in_time_order():
    s = ChaosSettings(load_s=6.0, rate_per_s=4.0)
    plain, burst = SCENARIOS["actor-kill"].instants(s, 1), SCENARIOS["broker-restart"].instants(s, 1)
    assert plain == SCENARIOS["actor-kill"].instants(s, 1)  # seeded
    assert len(burst) == len(plain) + 16 and burst == sorted(burst) and burst.count(2.0) == 16


def test_the_answer_bound_leaves_room_for_the_clients_resubmit():
    """A SUBMIT a hung broker never read is accepted only once the client sends it again:
    the bench waits for it past request_timeout_s + RESUBMIT_AFTER_S, and --quick runs
    broker-hang-kill."""
    for s in (ChaosSettings(), ChaosSettings(**QUICK)):
        assert s.answer_bound_s >= s.request_timeout_s + RESUBMIT_AFTER_S + s.slack_s
        assert s.answer_bound_s >= DEFAULT_BROKER_SILENCE_S + s.slack_s
    assert ChaosSettings(**QUICK).scenarios == ()  # every scenario


def test_an_unknown_scenario_is_refused_before_anything_starts(capsys):
    args = build_parser().parse_args(["bench", "chaos", "--quick", "--scenarios", "actor-kill,nope"])
    assert run_cli(args, "lego bench chaos") == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------- overload (pure)


def test_percentile_is_nearest_rank():
    values = [float(x) for x in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0 and percentile([7.0], 1) == 7.0
    assert percentile([], 99) is None


def test_goodput_counts_completions_within_the_slo_per_second_of_arrivals():
    obs = [Observation("a", True, COMPLETED, latency_s=0.5), Observation("b", True, COMPLETED, latency_s=1.0),
           Observation("c", True, COMPLETED, latency_s=1.01), Observation("d", True, COMPLETED),  # no answer time
           Observation("e", False, REJECTED, "slo_unattainable", 1, latency_s=0.001),
           Observation("f", True, FAILED, "deadline_exceeded", 1, latency_s=0.2)]
    assert goodput(obs, slo_s=1.0, window_s=4.0) == (2, 0.5)
    assert goodput(obs, slo_s=1.0, window_s=0.0) == (2, 0.0)


def _overloaded(n_in_slo: int, capacity: float) -> list[Observation]:
    fast = [Observation(f"ok{i}", True, COMPLETED, answers=1, latency_s=0.5) for i in range(n_in_slo)]
    late = [Observation("late", True, COMPLETED, answers=1, latency_s=3.0)]
    refused = [Observation(f"r{i}", False, REJECTED, "slo_unattainable", 1, latency_s=(i + 1) / 1000,
                           retry_after_s=0.1 * (i + 1)) for i in range(100)]
    return fast + late + refused


def test_overload_figures_set_goodput_against_the_capacity():
    # 10 s of arrivals, capacity 2/s: 19 within the SLO is 1.9/s, 95% of it
    f = overload_figures(_overloaded(19, 2.0), capacity_per_s=2.0, slo_s=1.0, window_s=10.0, bar=0.9,
                         broker_slo_met=19)
    assert (f["completed"], f["within_slo"], f["goodput_per_s"], f["goodput_share"]) == (20, 19, 1.9, 0.95)
    assert f["bar_met"] and f["offered_per_s"] == 12.0 and f["rejected"] == 100
    assert f["rejection_p50_ms"] == 50.0 and f["rejection_p99_ms"] == 99.0
    assert f["retry_after_s"] == [0.1, 10.0] and f["untyped_rejections"] == f["without_retry_after"] == 0
    assert overload_notes(f) == []
    missed = overload_figures(_overloaded(17, 2.0), 2.0, 1.0, 10.0, 0.9)
    assert missed["goodput_share"] == 0.85 and not missed["bar_met"]
    assert overload_notes(missed) == []  # under the bar is reported, not a broken promise


def test_an_untyped_or_unactionable_refusal_is_a_problem():
    obs = [Observation("a", True, COMPLETED, answers=1, latency_s=0.1),
           Observation("b", False, REJECTED, "invalid_param", 1, latency_s=0.01),
           Observation("c", False, REJECTED, "slo_unattainable", 1, latency_s=0.01, retry_after_s=0.0),
           Observation("d", False, REJECTED, "overloaded", 1, latency_s=0.01)]  # the broker gives none for this one
    f = overload_figures(obs, 1.0, 1.0, 1.0, 0.9)
    assert (f["untyped_rejections"], f["without_retry_after"]) == (1, 1)
    assert "overloaded" in ADMISSION_CODES and len(overload_notes(f)) == 2
    quiet = overload_figures([Observation("a", True, COMPLETED, answers=1, latency_s=0.1)], 1.0, 1.0, 1.0, 0.9)
    assert overload_notes(quiet) == ["nothing rejected at 1/s offered: admission never engaged"]
    assert overload_notes(overload_figures([], 0.0, 1.0, 1.0, 0.9)) == ["the capacity run completed nothing"]


def test_the_overload_table_shows_only_rows_with_figures():
    obs = _overloaded(17, 2.0)
    row = tally("overload", obs, 1, 12.0)
    row.overload = overload_figures(obs, 2.0, 1.0, 10.0, 0.9)
    plain = tally("actor-kill", obs[:3], 1, 5.0)
    assert overload_table([plain]) == "" and tables([plain]) == chaos_table([plain])
    table = overload_table([plain, row])
    assert "actor-kill" not in table
    assert ("| overload | 2 | 11.8 | 1 | slo_unattainable: 100 | 50.0 / 99.0 | 0.1-10 | 18 | 500.0 / 3000.0 | 17 | 1.7 | "
            "85% (bar 90%: **missed**) |") in table
    assert rows_of({"rows": [row.__dict__]})[0].overload == row.overload  # through --json and back


def test_the_slo_is_the_brokers_multiple_of_the_requests_solo_latency_scaled():
    catalog = load_catalog()
    workflow = catalog.workflows["flux-schnell-txt2img"]
    solo = CostModel(catalog).solo_s(workflow, validate_params(workflow, {"prompt": "x", "seed": 1, "steps": 4,
                                                                         "width": 512, "height": 512}))
    assert request_slo_s(2.0, 1.0) == pytest.approx(2.0 * solo)
    assert request_slo_s(3.0, 0.5) == pytest.approx(1.5 * solo)


# ---------------------------------------------------------------- poison (pure)


def test_poison_requests_are_spread_over_the_load():
    assert poison_indices(80, 4) == {10, 30, 50, 70}
    assert poison_indices(20, 1) == {10}
    assert poison_indices(3, 5) == {0, 1, 2} and poison_indices(0, 4) == poison_indices(10, 0) == frozenset()


def _poisoned() -> tuple[list[Observation], set[str], dict[str, str]]:
    obs = [Observation("p1", True, FAILED, QUARANTINE_CODE, 1, latency_s=2.0),
           Observation("p2", True, FAILED, QUARANTINE_CODE, 1, latency_s=3.0),
           *(Observation(f"g{i}", True, COMPLETED, answers=1, latency_s=0.5) for i in range(6))]
    quarantined = "encode/T5_Flux's actor died 2 times, the last time running it alone: quarantined as the likely cause"
    return obs, {"p1", "p2"}, {"p1": quarantined, "p2": quarantined}


def test_poison_figures_count_quarantines_crashes_and_the_good_requests():
    obs, poison, messages = _poisoned()
    f = poison_figures(obs, poison, messages, crashes=7, replaced=6, encoders=2,
                       counters={"actors_lost": 7, "tasks_quarantined": 2})
    assert (f["poison_submitted"], f["poison_quarantined"], f["poison_completed"], f["poison_unended"]) == (2, 2, 0, 0)
    assert f["poison_ends"] == {QUARANTINE_CODE: 2} and f["quarantine_s"] == [2.0, 3.0]
    assert (f["crashes"], f["crashes_per_poison"], f["crash_bound"]) == (7, 3.5, [4, 8])
    assert (f["good_submitted"], f["good_completed"], f["good_ends"]) == (6, 6, {})
    assert poison_notes(f) == []
    row = tally("poison", obs, 2, 10.0)
    row.poison = f
    assert "| poison | 2 | attempts_exhausted: 2 | 2 | 2 / 3 | 7 (3.5; 4-8) | 6 | 7 / 2 | 6 / 6 |" in poison_table([row])
    assert tables([row]).endswith(poison_table([row])) and poison_table([tally("x", obs, 0, 1.0)]) == ""


def test_a_poison_that_completes_or_goes_unanswered_or_a_good_request_that_fails_is_a_problem():
    obs, poison, messages = _poisoned()
    obs[0] = Observation("p1", True, COMPLETED, answers=1)
    obs[1] = Observation("p2", True, UNANSWERED)
    obs[2] = Observation("g0", True, FAILED, QUARANTINE_CODE, 1)
    f = poison_figures(obs, poison, messages, 9, 9, 2, {})
    notes = poison_notes(f)
    assert len(notes) == 3 and "1 poison request(s) completed" in notes and "1 poison request(s) never answered" in notes
    assert "1 good request(s) did not complete: {'attempts_exhausted': 1}" in notes
    row = tally("poison", obs, 2, 1.0)
    row.poison = f
    assert "9 (4.5; 4-8 **outside**)" in poison_table([row])  # reported, not a problem (poison_notes)


def test_a_poison_failing_other_than_by_the_quarantine_is_a_problem():
    obs, poison, messages = _poisoned()
    messages["p2"] = "encode/T5_Flux lost 3 times (last: silent for 2.0s)"  # max_task_attempts, not the quarantine
    notes = poison_notes(poison_figures(obs, poison, messages, 4, 4, 2, {}))
    assert notes == [f"poison requests ended {{'{QUARANTINE_CODE}': 2}}, 1 of them {QUARANTINE_CODE} 'quarantined'"]
    assert poison_notes(poison_figures(obs[2:], set(), {}, 0, 0, 2, {})) == ["no poison request was submitted"]


# ---------------------------------------------------------------- the tap


def _broker_answering_twice(sock: zmq.Socket, stop: threading.Event) -> None:
    """A fake broker: ACCEPTED, then the same RESULT twice, for each SUBMIT."""
    while not stop.is_set():
        if not sock.poll(50):
            continue
        identity, _, *frames = sock.recv_multipart()
        msg, _ = p.decode(frames)
        if isinstance(msg, p.Submit):
            for reply in (p.Accepted(msg.request_id, 1, 1, msg.params), p.Result(msg.request_id, [], 0.1),
                          p.Result(msg.request_id, [], 0.1)):
                sock.send_multipart([identity, b"", *p.encode(reply)])


def test_the_tap_counts_a_duplicate_the_client_drops():
    context = zmq.Context()
    broker = context.socket(zmq.ROUTER)
    broker.linger = 0
    address = f"tcp://127.0.0.1:{broker.bind_to_random_port('tcp://127.0.0.1')}"
    stop = threading.Event()
    thread = threading.Thread(target=_broker_answering_twice, args=(broker, stop), daemon=True)
    thread.start()
    try:
        with AnswerTap(address) as tap, Client(tap.address) as client:
            job = client.submit("wf", request_id="r1", prompt="x", wait_accepted=False)
            assert job.result(timeout=10).request_id == "r1"  # one answer for the client
            tap.wait_quiet(quiet_s=0.3, limit_s=5.0)
            answers, accepted = tap.snapshot()
            assert answers["r1"] == 2 and accepted == {"r1"}
            assert set(tap.answer_times()) == {"r1"}  # the first answer's time
    finally:
        stop.set()
        thread.join(5)
        broker.close()
        context.term()


# ---------------------------------------------------------------- the quick run


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_quick_chaos_loses_nothing_and_answers_nothing_twice(tmp_path):
    result = run_chaos_bench(ChaosSettings(**{**QUICK, "run_dir": str(tmp_path / "chaos")}))
    rows = rows_of(result)
    assert [row.scenario for row in rows] == list(SCENARIOS)  # broker-hang-kill included
    table = chaos_table(rows)
    assert problems(rows) == [], f"{table}\nlogs in {result['run_dir']}"
    for row in rows:
        assert row.faults >= 1, f"{row.scenario}: no fault injected\n{table}"
        assert row.completed > 0, f"{row.scenario}: nothing completed\n{table}"
        assert row.lost == row.unanswered == row.duplicated == 0
    unreplaced = next(row for row in rows if row.scenario == "actor-kill-unreplaced")
    assert set(unreplaced.failed) <= {"no_capacity", "attempts_exhausted"}, table
    overload = next(row for row in rows if row.scenario == "overload")
    assert overload.rejected and set(overload.rejected) <= set(ADMISSION_CODES), table
    assert overload.overload["capacity_per_s"] > 0 and overload.overload["without_retry_after"] == 0, table
    poison = next(row for row in rows if row.scenario == "poison").poison
    assert poison["poison_submitted"] == QUICK["poison_requests"] == poison["poison_quarantined"], table
    assert poison["poison_ends"] == {QUARANTINE_CODE: poison["poison_submitted"]}, table
    assert poison["good_completed"] == poison["good_submitted"] > 0, table
    assert poison["crashes"] >= poison["crash_bound"][0] and poison["tasks_quarantined"] >= 1, table
