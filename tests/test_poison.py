"""A poison request, end to end (issue 13): a prompt that kills every actor that encodes
it is quarantined after two crashes, with a typed failure, and every other request
completes.

Real processes: a LocalCluster of emulated actors whose backend exits when it encodes
the poison prompt (the `crash_on_prompt` fault option), three actors per text encoder
so that two can die and one still serves the others.
"""

from __future__ import annotations

import pytest

from clients import Client, RequestFailed
from clients.local import LocalCluster, LocalClusterSpec

pytestmark = pytest.mark.cluster
WORKFLOW = "flux-schnell-txt2img"
POISON = "a prompt that crashes its encoder"


@pytest.mark.timeout(180)
def test_a_poison_prompt_is_quarantined_after_two_crashes_and_the_others_complete(tmp_path):
    spec = LocalClusterSpec(workflows=[WORKFLOW], replicas={"CLIP_Flux": 3, "T5_Flux": 3},
                            options={"time_scale": 0.02, "crash_on_prompt": POISON}, heartbeat_interval_s=0.2,
                            run_dir=str(tmp_path / "run"), log_level="warning", max_batch_rows=1)
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        encoders = {a.actor_id for a in client.stats().actors if a.model in ("CLIP_Flux", "T5_Flux")}
        poison = client.submit(WORKFLOW, prompt=POISON, seed=1, steps=2, width=256, height=256)
        others = [client.submit(WORKFLOW, prompt=f"a lighthouse {i}", seed=i, steps=2, width=256, height=256)
                  for i in range(6)]

        with pytest.raises(RequestFailed) as caught:
            poison.result(timeout=90)
        assert caught.value.code == "attempts_exhausted" and "quarantined" in caught.value.message
        for job in others:
            assert job.result(timeout=90).image.shape == (256, 256, 3)

        stats = client.stats()
        assert stats.counters["tasks_quarantined"] >= 1
        lost = encoders - {a.actor_id for a in stats.actors}
        # Two crashes of actors running it alone per encoder at most (CLIP and T5 both encode it).
        assert 2 <= stats.counters["actors_lost"] <= 4 and len(lost) == stats.counters["actors_lost"]
        # One of each encoder is left and served the others after it.
        assert {a.model for a in stats.actors} >= {"CLIP_Flux", "T5_Flux"}
