"""`lego bench overhead --step-shapes`: the noop model's full-size tensors, the bench's
catalog, and a quick run end to end on a local cluster (real broker, agent and actor
processes). The full run is a benchmark, recorded in docs/benchmarks.md, not a test."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from actors.backends.emulated import STEP_SHAPES, noop_output
from broker.actor_options import check_options
from broker.catalog import parse_catalog
from broker.protocol.tasks import TaskKind
from broker.protocol.tensors import ITEMSIZE
from clients.bench.step_shapes import FAMILIES, catalog_text, parse_families

LEGO = str(Path(sys.executable).parent / "lego")


def test_flux_steps_carry_its_t5_conditioning_at_full_size():
    shapes = STEP_SHAPES["flux"]
    encoded = noop_output(shapes, TaskKind.ENCODE, [])
    assert (encoded["embeds"].dtype, encoded["embeds"].shape) == ("bfloat16", (1, 512, 4096))
    first = noop_output(shapes, TaskKind.DENOISE, [encoded], first=True)
    second = noop_output(shapes, TaskKind.DENOISE, [first])
    assert second["latents"].shape == (1, 4096, 64) and second["latents"] is not first["latents"]
    assert second["cond/embeds"] is encoded["embeds"]  # handed on by reference, as the real step does
    assert noop_output(shapes, TaskKind.DECODE, [second])["image"].shape == (1024, 1024, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_workflow_and_an_actor_option(family):
    catalog = parse_catalog(tomllib.loads(catalog_text()))
    assert catalog.workflows[f"noop-{family}"].cfg is STEP_SHAPES[family].cfg
    assert check_options("noop", {"step_shapes": family}) == {"step_shapes": family}


def test_unknown_families_are_refused():
    assert parse_families("sd15, flux") == ("sd15", "flux")
    for text in ("", "sd2", "sd15,kandinsky"):
        with pytest.raises(ValueError, match="--step-shapes"):
            parse_families(text)
    with pytest.raises(ValueError, match="options.step_shapes"):
        check_options("noop", {"step_shapes": "sd2"})


@pytest.mark.cluster
def test_quick_step_shapes_run_prints_the_family_row():
    run = subprocess.run([LEGO, "bench", "overhead", "--step-shapes", "sd15", "--steps", "3", "--repeats", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| sd15 |")]
    assert len(rows) == 2  # steps staying on one actor, steps migrating between two
    shapes = STEP_SHAPES["sd15"]
    latent_bytes = ITEMSIZE[shapes.dtype] * math.prod(shapes.latents)
    for cells in rows:
        steps, overhead_ms, moved_mb = int(cells[2]), float(cells[6]), float(cells[7])
        assert steps == 3 and overhead_ms >= 0
        assert moved_mb * 1e6 > latent_bytes
