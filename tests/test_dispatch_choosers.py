"""The broker's dispatch choices (`broker.core.choosers`) alone: plain actors and nodes,
no core, no queue but a stand-in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from broker.core import choosers
from broker.core.state import DONE, RUNNING, ActorState

CLAY = (("clay", 1.0),)
INK = (("ink", 1.0),)


def actor(actor_id, *, busy=False, credits=1, adapters=(), last_workflow=""):
    a = ActorState(actor_id, actor_id.encode(), "den", "h", f"gpu-{actor_id}", "emulated", "", 4, credits, 0.0,
                   adapters=adapters, last_workflow=last_workflow)
    if busy:
        a.in_flight[1] = []
    return a


def node(*, kind="denoise", inputs=(), siblings=(), adapters=None, submitted_at=0.0, deadline=None, tail_s=0.0,
         cost_s=0.0, workflow="wf"):
    request = SimpleNamespace(workflow=workflow, submitted_at=submitted_at, deadline=deadline)
    return SimpleNamespace(kind=kind, request=request, inputs=[SimpleNamespace(actor_id=i) for i in inputs],
                           siblings=list(siblings), adapters=adapters, tail_s=tail_s, cost_s=cost_s)


def all_free(_actor) -> bool:
    return True


def test_the_holder_of_the_input_gets_the_step_when_idle():
    a, b = actor("a"), actor("b")
    assert choosers.pick_actor(node(inputs=["b"]), [a, b], all_free) is b


def test_affinity_yields_to_an_idle_actor_when_the_holder_is_busy():
    a, b = actor("a"), actor("b", busy=True)
    assert choosers.pick_actor(node(inputs=["b"]), [a, b], all_free) is a


def test_avoid_sends_the_step_away_from_its_holder():
    a, b = actor("a"), actor("b")
    assert choosers.pick_actor(node(inputs=["b"]), [a, b], all_free, affinity="avoid") is a


def test_an_idle_actor_on_a_free_gpu_comes_first():
    a, b = actor("a"), actor("b")
    assert choosers.pick_actor(node(), [a, b], lambda x: x is b) is b


def test_a_cfg_branch_goes_away_from_its_running_sibling():
    a, b = actor("a"), actor("b")
    sibling = SimpleNamespace(actor_id="a", state=RUNNING)
    assert choosers.pick_actor(node(inputs=["a"], siblings=[sibling]), [a, b], all_free) is b
    sibling.state = DONE
    assert choosers.pick_actor(node(inputs=["a"], siblings=[sibling]), [a, b], all_free) is b


def test_adapter_affinity_outranks_the_free_gpu():
    a, b = actor("a", adapters=CLAY), actor("b")
    head = node(adapters=CLAY)
    assert choosers.pick_actor(head, [a, b], lambda x: x is b) is a
    assert choosers.pick_actor(head, [a, b], lambda x: x is b, adapter_affinity=False) is b


def test_a_monolith_prefers_the_actor_that_ran_the_workflow_last():
    a, b = actor("a", last_workflow="other", credits=5), actor("b", last_workflow="wf")
    assert choosers.pick_actor(node(kind="pipeline"), [a, b], all_free) is b


@pytest.mark.parametrize(("bypass_s", "expected"), [(2.5, "mine"), (0.5, "head")])
def test_an_actor_takes_its_own_set_first_within_the_bypass(bypass_s, expected):
    head, mine = node(adapters=INK, submitted_at=0.0), node(adapters=CLAY, submitted_at=1.0)
    queue = SimpleNamespace(head_with=lambda wanted: mine if wanted(("denoise", (64, 64), CLAY)) else None)
    chosen = choosers.own_set_first(queue, head, actor("a", adapters=CLAY), True, bypass_s)
    assert chosen is {"mine": mine, "head": head}[expected]
    assert choosers.own_set_first(queue, head, actor("a", adapters=CLAY), False, bypass_s) is head
    assert choosers.own_set_first(queue, head, actor("a"), True, bypass_s) is head


def test_long_tasks_and_monoliths_go_one_batch_at_a_time():
    assert choosers.one_batch_at_a_time(True, None, 0.05)
    assert choosers.one_batch_at_a_time(False, node(cost_s=0.05), 0.05)
    assert not choosers.one_batch_at_a_time(False, node(cost_s=0.01), 0.05)
    assert not choosers.one_batch_at_a_time(False, None, 0.05)


def test_batch_rows_take_the_profile_cap_the_actor_cap_and_one_for_a_monolith():
    assert choosers.batch_rows(False, 8, 4) == 4
    assert choosers.batch_rows(False, 8, None) == 8
    assert choosers.batch_rows(False, 2, 4) == 2
    assert choosers.batch_rows(True, 8, 4) == 1


def test_past_deadline_and_hopeless():
    assert not choosers.past_deadline(node(deadline=None), 100.0, True)
    assert choosers.past_deadline(node(deadline=1.0), 2.0, False)
    assert not choosers.past_deadline(node(deadline=3.0, tail_s=2.0), 2.0, False)
    assert choosers.past_deadline(node(deadline=3.0, tail_s=2.0), 2.0, True)
