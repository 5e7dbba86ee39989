"""The real `openai` package gets images through the gateway from tiny real diffusers
models on CPU: the same pixels the Python client gets for the same seeds."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")
from gateway_helpers import Gateway, write_keys  # noqa: E402 (tests/ is on sys.path)
from PIL import Image  # noqa: E402 (diffusers' dependency)
from test_diffusers import NEGATIVE, PROMPT, tiny_models  # noqa: E402 (one tiny build per session)

from clients import Client  # noqa: E402
from clients.local import LocalCluster, LocalClusterSpec  # noqa: E402

WORKFLOW = "tiny-sd15-txt2img"


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_the_openai_package_gets_images_of_tiny_real_models_through_the_gateway(tmp_path_factory, tmp_path):
    _, catalog_path, _ = tiny_models(tmp_path_factory)
    # n=2 images are two requests that share denoise batches; each must equal its own request
    # run alone bit for bit, which fused batching (the default) gives only within a tolerance.
    spec = LocalClusterSpec(workflows=[WORKFLOW], backend="diffusers", catalog=[str(catalog_path)],
                            run_dir=str(tmp_path / "run"), log_level="warning", options={"batching": "exact"})
    keys = write_keys(tmp_path / "keys.txt")
    params = {"steps": 3, "sampler": "ddim", "negative_prompt": NEGATIVE, "guidance": 7.5}
    with LocalCluster(spec) as cluster:
        gateway = Gateway(cluster.frontend, tmp_path / "keys.txt", tmp_path / "gateway.log")
        try:
            client = openai.OpenAI(api_key=keys["alice"], base_url=f"{gateway.url}/v1", max_retries=0, timeout=120)
            response = client.images.generate(model=WORKFLOW, prompt=PROMPT, n=2, size="64x64",
                                              response_format="b64_json", extra_body={"seed": 7, **params})
            with pytest.raises(openai.BadRequestError) as err:
                client.images.generate(model=WORKFLOW, prompt=PROMPT, response_format="b64_json",
                                       extra_body={"steps": 1000})
            assert err.value.body["param"] == "steps"
            with pytest.raises(openai.BadRequestError) as err:
                client.images.generate(model="no-such-workflow", prompt=PROMPT, response_format="b64_json")
            assert err.value.body["param"] == "model"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(api_key="usr-" + "0" * 32, base_url=f"{gateway.url}/v1", max_retries=0).images.generate(
                    model=WORKFLOW, prompt=PROMPT, response_format="b64_json")
            with Client(cluster.frontend) as python_client:
                expected = [python_client.generate(WORKFLOW, timeout=120, prompt=PROMPT, seed=seed, width=64,
                                                   height=64, **params).image for seed in (7, 8)]
        finally:
            gateway.stop()
    assert response.created > 0 and len(response.data) == 2
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in response.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert np.array_equal(images[0], expected[0]) and np.array_equal(images[1], expected[1])
    assert not np.array_equal(images[0], images[1])  # n images, n distinct seeds
