"""`output = "latents"`: the final latents instead of an image, as a pipeline's
output_type="latent" gives them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from broker.catalog import load_catalog, unroll, validate_params
from clients import Client
from clients.local import LocalCluster, LocalClusterSpec

pytest.importorskip("diffusers")
from test_diffusers import PROMPT, pipeline_image, request_params, run_in_process, tiny_models  # noqa: E402


def test_latents_output_ends_the_dag_at_the_last_step():
    workflow = load_catalog().workflow("sd15-txt2img")
    plans = unroll(workflow, validate_params(workflow, {"prompt": "x", "steps": 3, "output": "latents"}))
    assert [p.kind for p in plans][-1] == "denoise" and "decode" not in {p.kind for p in plans}
    assert plans[-1].return_output and plans[-1].path_len == 1
    with pytest.raises(ValueError, match="output"):
        validate_params(workflow, {"prompt": "x", "output": "pil"})


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_latents_equal_the_pipelines_latent_output(tmp_path_factory, family):
    torch.set_num_threads(1)
    _, _, catalog = tiny_models(tmp_path_factory)
    root = tiny_models(tmp_path_factory)[0]
    workflow = catalog.workflow(f"tiny-{family}-txt2img")
    outputs = run_in_process(catalog, workflow, {**request_params(True, "default", 5), "output": "latents"})
    last = [k for k in outputs if k.startswith("denoise/")][-1]
    expected = pipeline_image(root, "default", True, 5, output_type="latent", family=family)
    assert torch.equal(outputs[last]["latents"], expected)


@pytest.mark.cluster
def test_a_cluster_returns_only_the_latents_when_asked(tmp_path):
    spec = LocalClusterSpec(workflows=["flux-schnell-txt2img"], options={"time_scale": 0.01}, run_dir=str(tmp_path),
                            log_level="warning")
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        result = client.generate("flux-schnell-txt2img", prompt=PROMPT, seed=3, steps=2, output="latents", timeout=30)
        image = client.generate("flux-schnell-txt2img", prompt=PROMPT, seed=3, steps=2, timeout=30)
    assert set(result.tensors) == {"latents"}  # not the conditioning that travels with it
    dtype, shape, _ = result.tensors["latents"]
    assert (dtype, shape) == ("bfloat16", [1, 16, 128, 128])
    assert set(image.tensors) == {"image"} and image.image.shape == (1024, 1024, 3)
    assert np.frombuffer(result.tensors["latents"][2], np.uint8).any()
