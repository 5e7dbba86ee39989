"""clients/bench/gpu_check.py's served-vs-pipeline stages, shrunken on the CPU (its `--dry-run`).

On a lent GPU the `flux` stage builds FLUX.1-schnell-sized components
(actors/models/fullsize.py `build_flux`), serves them one actor per model and compares
the image with FluxPipeline's; here the same code runs at the dry size, in bfloat16, with
one torch thread in this process as in the actors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from actors.models import fullsize  # noqa: E402
from broker.catalog import parse_catalog  # noqa: E402
from clients.bench import gpu_check  # noqa: E402


def test_the_flux_catalog_has_no_cfg_and_the_default_sampler_only(tmp_path):
    built = fullsize.Built("flux", tmp_path / "flux", "bfloat16", 64, {"clip": "text_encoder", "t5": "text_encoder_2"},
                           "transformer", 16)
    catalog = parse_catalog(tomllib.loads(fullsize.catalog_text(built, "check-flux")))
    workflow = catalog.workflows["check-flux-txt2img"]
    assert not workflow.cfg and workflow.family == "flux"
    assert "negative_prompt" not in workflow.inputs and "guidance" not in workflow.inputs
    assert workflow.inputs["sampler"].choices == ("default",)
    denoiser = catalog.models["check-flux-denoiser"]
    assert (denoiser.latent_channels, denoiser.vae_scale) == (16, 8)
    assert fullsize.pipeline_class("flux") == "FluxPipeline"


def test_unknown_stages_are_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["run", "--dry-run", "--stages", "flux,nope"])


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_the_gpu_checks_flux_stage_serves_the_pipelines_image_shrunken_on_the_cpu(tmp_path: Path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_check and the actors: the thread count changes the low bits
    try:
        result = gpu_check.check_family("flux", dry=True, device="cpu", root=tmp_path, short=2, long=4, rounds=1)
    finally:
        torch.set_num_threads(before)
    assert result["identical"] is True, result
    assert result["max_abs_diff"] == 0
    assert (result["dtype"], result["size"]) == ("bfloat16", 64)
    assert result["fetches"] > 0 and result["ipc_fallbacks"] == 0 and result["ipc_pins_left"] == 0
    assert not (tmp_path / "flux").exists()  # the built weights are removed after the stage
    text = gpu_check.table({"flux": result, "dry_run": True})
    assert "FLUX shrunken (dry run), bfloat16, 64 px: micro-served image == pipeline's (2 steps) | yes" in text
