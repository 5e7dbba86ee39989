"""ComfyUI's HTTP and WebSocket API on the gateway (clients/gateway/comfy_api.py, comfy_ws.py).

Unit tests of the graph shape and the definition match; then a cluster of the tiny SD 1.5
models serving an imported graph, a gateway with ComfyUI's API on, and the real
`comfy-api-simplified` package (unmodified) queueing the graph and getting its image:
the diffusers pipeline's pixels for the graph's seed. A graph no served workflow computes,
over the served models, is registered at the broker and runs on the same actors (the
pipeline's pixels again); malformed and unsupported graphs get ComfyUI's node errors.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import uuid
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("diffusers")
aiohttp = pytest.importorskip("aiohttp")

import test_comfy_import  # noqa: E402
from gateway_helpers import Gateway, app_routes, request, write_keys  # noqa: E402 (tests/ is on sys.path)

from clients.comfy import import_graph  # noqa: E402
from clients.gateway.comfy_api import graph_shape, same_definition  # noqa: E402
from clients.gateway.comfy_ws import safe_relative  # noqa: E402

graph = test_comfy_import.graph
tiny = test_comfy_import.tiny  # the fixture: the tiny models and their ComfyUI models folder
GRAPH = "sd15_txt2img_api.json"
SERVED = "comfy-sd15"


def titled(g: dict) -> dict:
    """The graph as ComfyUI's "Save (API)" writes it: every node with a `_meta` title."""
    out = copy.deepcopy(g)
    for node_id, node in out.items():
        node["_meta"] = {"title": "Save Image" if node["class_type"] == "SaveImage" else f"{node['class_type']} {node_id}"}
    return out


# ---- pure functions


def test_the_shape_ignores_literals_and_keeps_links_class_types_and_input_names():
    g = graph(GRAPH)
    other = copy.deepcopy(g)
    other["3"]["inputs"].update(seed=7, steps=30, cfg=1.0)
    other["6"]["inputs"]["text"] = "a cat"
    other["4"]["inputs"]["ckpt_name"] = "another.safetensors"
    assert graph_shape(g) == graph_shape(other) == graph_shape(titled(g))
    relinked = copy.deepcopy(g)
    relinked["3"]["inputs"]["negative"] = ["6", 0]
    renamed = copy.deepcopy(g)
    renamed["9"]["class_type"] = "PreviewImage"
    extra = copy.deepcopy(g)
    extra["3"]["inputs"]["extra"] = 1
    assert len({graph_shape(x) for x in (g, relinked, renamed, extra)}) == 4


def test_same_definition_compares_models_and_structure_not_names_defaults_or_slos(tiny):
    _, _, catalog, models = tiny
    a = import_graph(graph(GRAPH), name="a", models_dir=models, catalog=catalog).workflow
    changed = copy.deepcopy(graph(GRAPH))
    changed["3"]["inputs"].update(seed=1, steps=9)
    changed["6"]["inputs"]["text"] = "a cat"
    b = import_graph(changed, name="b", models_dir=models, catalog=catalog).workflow
    assert a.inputs["steps"].default != b.inputs["steps"].default
    assert same_definition(a, b) and same_definition(a, replace(b, description="other", slo_s=3.0))
    no_cfg = copy.deepcopy(graph(GRAPH))
    no_cfg["3"]["inputs"]["cfg"] = 1.0
    c = import_graph(no_cfg, name="c", models_dir=models, catalog=catalog).workflow
    assert not same_definition(a, c)  # no CFG: another workflow
    assert not same_definition(a, replace(a, vae="tiny-sd15-other-vae"))
    assert not same_definition(a, replace(a, lora=True))
    assert not same_definition(a, replace(a, inputs={**a.inputs, "steps": replace(a.inputs["steps"], max=5)}))


def test_the_match_is_cached_by_shape_and_checked_against_each_compile(tiny, tmp_path):
    from types import SimpleNamespace

    from broker import protocol as p
    from clients.comfy import ComfyImportError
    from clients.gateway.comfy_api import served_workflow
    from clients.gateway.comfy_ws import COMFY, ComfyState
    from clients.gateway.state import GATEWAY

    _, _, catalog, models = tiny
    asked, registered = [], {}
    listed = ("tiny-sd15-txt2img-nocfg", "tiny-sd15-img2img")

    async def workflows():
        asked.append(1)
        return [p.WorkflowInfo(name, wf.description, wf.models, [], "image") for name, wf in catalog.workflows.items()
                if name in listed] + [p.WorkflowInfo(name, "", ["tiny-sd15-clip", "tiny-sd15-unet", "tiny-sd15-vae"],
                                                     [], "image", True) for name in registered]

    async def register_workflow(name, definition):
        registered[name] = definition
        return p.AdminReply(True, f"registered {name}")

    async def stats():  # actors of the SD 1.5 checkpoint's models only
        return SimpleNamespace(actors=[SimpleNamespace(model=m, stopping=False)
                                       for m in ("tiny-sd15-clip", "tiny-sd15-unet", "tiny-sd15-vae")])

    gw = SimpleNamespace(client=SimpleNamespace(workflows=workflows, register_workflow=register_workflow, stats=stats),
                         metrics=SimpleNamespace(broker_up=SimpleNamespace(set=lambda v: None)))
    state = ComfyState(models, tmp_path, load_catalog_like(catalog), 8, 60.0)
    request = SimpleNamespace(app={GATEWAY: gw, COMFY: state})

    def match(g: dict) -> str:
        imported = import_graph(g, name="comfy-prompt", models_dir=models, catalog=catalog, replace=True)
        return asyncio.run(served_workflow(request, graph_shape(g), imported, ["9"]))

    no_cfg = copy.deepcopy(graph(GRAPH))
    no_cfg["3"]["inputs"]["cfg"] = 1.0
    assert match(no_cfg) == "tiny-sd15-txt2img-nocfg" and len(asked) == 1
    other = copy.deepcopy(no_cfg)
    other["3"]["inputs"].update(seed=3, steps=7)
    assert match(other) == "tiny-sd15-txt2img-nocfg" and len(asked) == 1  # same shape: the cached match
    assert list(state.cache) == [graph_shape(no_cfg)]
    with_cfg = graph(GRAPH)  # same shape, another definition (CFG): asked again; registered over the same models
    name = match(with_cfg)
    assert len(asked) == 2 and list(registered) == [name] and name.startswith("comfy-")
    assert "default" not in json.dumps(registered[name]["inputs"])  # the graph's literals are not part of it
    assert set(registered[name]) >= {"denoiser", "vae", "text_encoders", "cfg"}
    literals = copy.deepcopy(with_cfg)
    literals["3"]["inputs"].update(seed=5, steps=9)
    literals["6"]["inputs"]["text"] = "a cat"
    assert match(literals) == name and len(asked) == 2 and len(registered) == 1  # cached: one workflow per structure
    state.cache.clear()
    assert match(literals) == name and len(asked) == 3 and len(registered) == 1  # served now: matched, not registered
    single_file_vae = copy.deepcopy(graph(GRAPH))  # a VAE no actor runs: not served, not registered
    single_file_vae["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_sd15_file.safetensors"}}
    single_file_vae["8"]["inputs"]["vae"] = ["11", 0]
    with pytest.raises(ComfyImportError) as err:
        match(single_file_vae)
    error = err.value.node_errors["9"]["errors"][0]
    assert error["type"] == "workflow_not_served" and "lego workflows import" in error["details"]
    assert len(registered) == 1


def load_catalog_like(catalog):
    """A copy the gateway may add registered workflows to (the fixture's is shared)."""
    from broker.catalog import Catalog

    return Catalog(dict(catalog.models), dict(catalog.workflows), dict(catalog.adapters))


def test_safe_relative_refuses_what_leaves_the_folder():
    assert safe_relative("sub", "a.png").as_posix() == "sub/a.png"
    assert safe_relative("", "a.png").as_posix() == "a.png"
    for parts in [("..", "a.png"), ("", "../a.png"), ("/etc", "passwd"), ("", "/etc/passwd"), ("a/../..", "x"),
                  ("", "C:\\x"), ("", ".hidden"), ("", "a\x00b")]:
        assert safe_relative(*parts) is None, parts


# ---- served


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """(gateway, keys, tiny root): a cluster serving the imported graph as `comfy-sd15`
    (and the built-in tiny SD 1.5 workflow), a gateway with ComfyUI's API on."""
    from clients.local import LocalCluster, LocalClusterSpec

    root, catalog_path, catalog, models = tiny
    tmp = tmp_path_factory.mktemp("comfy-gateway")
    toml_path = tmp / f"{SERVED}.toml"
    toml_path.write_text(import_graph(graph(GRAPH), name=SERVED, models_dir=models, catalog=catalog).toml)
    spec = LocalClusterSpec(workflows=[SERVED, "tiny-sd15-txt2img"], backend="diffusers",
                            catalog=[str(catalog_path), str(toml_path)], run_dir=str(tmp / "run"), log_level="warning")
    keys = write_keys(tmp / "keys.txt")
    config = tmp / "gateway.toml"
    config.write_text(f"[gateway]\ncomfy_models_dir = {json.dumps(str(models))}\n"
                      f"comfy_catalog = {json.dumps(os.pathsep.join([str(catalog_path), str(toml_path)]))}\n"
                      f"comfy_input_dir = {json.dumps(str(tmp / 'input'))}\n")
    with LocalCluster(spec) as cluster:
        gateway = Gateway(cluster.frontend, tmp / "keys.txt", tmp / "gateway.log", "--config", str(config))
        gateway.broker = cluster.frontend  # for the tests that ask the broker itself
        try:
            yield gateway, keys, root
        finally:
            gateway.stop()


def reference_image(root) -> np.ndarray:
    """The diffusers pipeline configured as docs/comfy.md maps the graph (euler / normal)."""
    return test_comfy_import.sd15_reference_image(root)


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def basic(key: str, user: str = "comfy") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


async def _watch(gateway, key: str, body: dict, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Connect /ws first (as ComfyUI's front end does), queue the prompt, collect its
    messages until `executing` with node null. Returns (the /prompt answer, the messages)."""
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async with session.ws_connect(f"{gateway.url}/ws?clientId={client_id}") as ws:
            first = await ws.receive_json(timeout=10)
            async with session.post(f"{gateway.url}/prompt", json={**body, "client_id": client_id}) as response:
                answer = await response.json()
                assert response.status == 200, answer
            messages = [first]
            while True:
                message = await ws.receive_json(timeout=timeout)
                messages.append(message)
                data = message["data"]
                if message["type"] == "executing" and data["node"] is None and data["prompt_id"] == answer["prompt_id"]:
                    return answer, messages


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_comfy_api_simplified_gets_the_diffusers_pipelines_image_and_ws_reports_progress(served):
    comfy_api_simplified = pytest.importorskip("comfy_api_simplified")
    gateway, keys, root = served
    api = comfy_api_simplified.ComfyApiWrapper(gateway.url, user="anyone", password=keys["alice"])
    images = api.queue_and_wait_images(comfy_api_simplified.ComfyWorkflowWrapper(titled(graph(GRAPH))), "Save Image")
    assert len(images) == 1
    (name, png), = images.items()
    assert name.startswith("ComfyUI_") and name.endswith("_.png")
    expected = reference_image(root)
    assert np.array_equal(png_pixels(png), expected)

    # the messages, from a socket connected before the prompt is queued
    answer, messages = asyncio.run(_watch(gateway, keys["alice"], {"prompt": titled(graph(GRAPH))}))
    assert answer["node_errors"] == {} and answer["number"] >= 2
    pid = answer["prompt_id"]
    kinds = [m["type"] for m in messages]
    assert messages[0]["type"] == "status" and "queue_remaining" in messages[0]["data"]["status"]["exec_info"]
    assert messages[0]["data"]["sid"]
    ours = [m for m in messages if m["data"].get("prompt_id") == pid]
    order = [m["type"] for m in ours]
    assert order[:2] == ["execution_start", "execution_cached"] and ours[1]["data"]["nodes"] == []
    progress = [m["data"] for m in ours if m["type"] == "progress"]
    assert [p["value"] for p in progress] == [1, 2, 3, 4] and {p["max"] for p in progress} == {4}
    assert {p["node"] for p in progress} == {"3"}
    executing = [m["data"]["node"] for m in ours if m["type"] == "executing"]
    assert "3" in executing and executing[-1] is None
    assert executing.index("3") < executing.index("9")
    executed = next(m["data"] for m in ours if m["type"] == "executed")
    assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
    assert order.index("executed") < order.index("execution_success") < len(order) - 1
    assert "status" in kinds[1:]  # queue length broadcasts

    # /view of that prompt's image: the same pixels, basic auth and bearer alike
    image = executed["output"]["images"][0]
    status, headers, body = request(gateway, "GET", f"/view?filename={image['filename']}&subfolder=&type=output",
                                    headers=basic(keys["alice"]))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert np.array_equal(png_pixels(body), expected)
    status, _, _ = request(gateway, "GET", f"/view?filename={image['filename']}&type=output", key=keys["bob"])
    assert status == 404  # another key's image


def malformed_variants(good: dict) -> list[tuple[dict, str, str]]:
    """(graph, node id, input name) the importer refuses, each for another reason: ComfyUI's
    own validation errors and what has no diffusers equivalent."""
    def changed(node_id: str, source: dict | None = None, **inputs) -> dict:
        g = copy.deepcopy(source or good)
        g[node_id]["inputs"].update(inputs)
        return g

    def advanced(**inputs) -> dict:
        g = copy.deepcopy(good)
        i = g["3"]["inputs"]
        g["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "enable", "noise_seed": i["seed"], "steps": i["steps"], "cfg": i["cfg"],
            "sampler_name": i["sampler_name"], "scheduler": i["scheduler"], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable", "model": i["model"], "positive": i["positive"],
            "negative": i["negative"], "latent_image": i["latent_image"], **inputs}}
        return g

    lora = titled(graph("sd15_lora_api.json"))
    return [
        (changed("3", scheduler="karras"), "3", "scheduler"),
        (changed("3", sampler_name="dpmpp_2m_sde"), "3", "sampler_name"),
        (changed("3", sampler_name=3), "3", "sampler_name"),
        (changed("3", cfg=0.5), "3", "cfg"),
        (changed("3", cfg="high"), "3", "cfg"),
        (changed("3", steps="four"), "3", "steps"),
        (changed("3", steps=0), "3", "steps"),
        (changed("3", steps=100000), "3", "steps"),
        (changed("3", seed=-1), "3", "seed"),
        (changed("3", denoise=0.5), "3", "denoise"),  # on an empty latent
        (changed("3", positive=["4", 0]), "3", "positive"),  # a MODEL where CONDITIONING goes
        (changed("5", batch_size=2), "5", "batch_size"),
        (changed("5", width=17), "5", "width"),
        (changed("5", width="wide"), "5", "width"),
        (changed("6", text="a (fox:1.2)"), "6", "text"),  # prompt weighting
        (changed("6", text="embedding:ink a fox"), "6", "text"),
        (changed("6", text=5), "6", "text"),
        (changed("6", clip=["4", 0]), "6", "clip"),
        (changed("8", vae=["4", 7]), "8", "vae"),  # an output the loader does not have
        (changed("4", ckpt_name="old.ckpt"), "4", "ckpt_name"),  # never unpickled
        (advanced(add_noise="disable"), "3", "add_noise"),
        (advanced(return_with_leftover_noise="enable"), "3", "return_with_leftover_noise"),
        (advanced(end_at_step=2), "3", "end_at_step"),
        (advanced(start_at_step=1), "3", "start_at_step"),
        (changed("10", lora, strength_model=3.0), "10", "strength_model"),
        (changed("10", lora, strength_clip=0.3), "10", "strength_clip"),
        (changed("11", lora, lora_name="nope.safetensors"), "11", "lora_name"),
    ]


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_malformed_graphs_get_400_with_node_errors_and_a_good_graph_then_works(served):
    gateway, keys, _ = served
    good = titled(graph(GRAPH))
    heun = copy.deepcopy(good)
    heun["3"]["inputs"]["sampler_name"] = "heun"
    missing = copy.deepcopy(good)
    del missing["3"]["inputs"]["steps"]
    dangling = copy.deepcopy(good)
    dangling["8"]["inputs"]["samples"] = ["99", 0]
    unknown = copy.deepcopy(good)
    unknown["10"] = {"class_type": "UpscaleModelLoader", "inputs": {}}
    no_output = {k: v for k, v in good.items() if k != "9"}
    other_model = copy.deepcopy(good)
    other_model["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    not_served = copy.deepcopy(good)  # decoded by the single-file VAE: it compiles, but no workflow has those models
    not_served["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_sd15_file.safetensors"}}
    not_served["8"]["inputs"]["vae"] = ["11", 0]
    no_cfg = copy.deepcopy(good)
    no_cfg["3"]["inputs"]["cfg"] = 1.0  # no CFG: the built-in tiny-sd15-txt2img-nocfg has that definition
    assert request(gateway, "POST", "/prompt", {"prompt": no_cfg}, key=keys["alice"])[0] == 200
    cases = [(heun, "3", "sampler_name"), (missing, "3", "steps"), (dangling, "8", "samples"),
             (unknown, "10", None), (other_model, "4", "ckpt_name"), (not_served, "9", None),
             *malformed_variants(good)]
    assert len(cases) >= 20 and len({json.dumps(g, sort_keys=True) for g, _, _ in cases}) == len(cases)  # distinct
    for bad, node_id, input_name in cases:
        status, _, body = request(gateway, "POST", "/prompt", {"prompt": bad, "client_id": "x"}, key=keys["alice"])
        assert status == 400, (node_id, input_name, body)
        assert set(body) == {"error", "node_errors"} and body["error"]["type"]
        assert node_id in body["node_errors"], body
        errors = body["node_errors"][node_id]["errors"]
        assert body["node_errors"][node_id]["class_type"] == bad[node_id]["class_type"]
        if input_name:
            assert errors[0]["extra_info"]["input_name"] == input_name, (node_id, input_name, body)
    status, _, body = request(gateway, "POST", "/prompt", {"prompt": not_served}, key=keys["alice"])
    assert "lego workflows import" in body["node_errors"]["9"]["errors"][0]["details"]
    status, _, body = request(gateway, "POST", "/prompt", {"prompt": no_output}, key=keys["alice"])
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs" and body["node_errors"] == {}
    for raw in (b"{not json", b"[]", b'{"prompt": 3}'):
        status, _, body = request(gateway, "POST", "/prompt", raw=raw, key=keys["alice"])
        assert status == 400 and "node_errors" in body, raw
    # a good graph after all that, with other literals (same shape: the cached match)
    other = copy.deepcopy(good)
    other["3"]["inputs"]["seed"] = 5
    answer, messages = asyncio.run(_watch(gateway, keys["bob"], {"prompt": other}))
    assert any(m["type"] == "execution_success" for m in messages)
    status, _, history = request(gateway, "GET", f"/history/{answer['prompt_id']}", key=keys["bob"])
    assert history[answer["prompt_id"]]["status"]["status_str"] == "success"


def _upload(gateway, key: str, name: str, png: bytes) -> dict:
    boundary = "xxBOUNDARYxx"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, body = request(gateway, "POST", "/upload/image", raw=form, headers=headers, key=key)
    assert status == 200, body
    return body


def img2img_nocfg_reference(root, image: np.ndarray) -> np.ndarray:
    """The img2img graph without CFG as the diffusers pipeline computes it: euler_ancestral
    (EulerAncestralDiscreteScheduler), 4 steps, strength 0.75, guidance 1 (no CFG), seed 42,
    with one torch thread as the actors run (the thread count changes the reduction order)."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(root / "sd15", safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pipe("a red fox in the snow", image=Image.fromarray(image), strength=0.75, num_inference_steps=4,
                   guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    finally:
        torch.set_num_threads(threads)
    return (out[0] * 255).round().astype(np.uint8)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_graph_no_served_workflow_computes_is_registered_and_runs_on_the_same_actors(served, tiny):
    """The img2img graph without CFG compiles to a workflow the cluster was not started with
    (no catalog workflow has its definition) over the models it serves: the gateway registers
    it at the broker and it runs on the actors the other workflows use, with the diffusers
    pipeline's pixels."""
    from clients import Client
    from clients.results import encode_png

    gateway, keys, root = served
    _, _, catalog, models = tiny
    g = titled(graph("sd15_img2img_api.json"))  # LoadImage fox.png -> VAEEncode -> KSampler (euler_ancestral, 0.75)
    g["3"]["inputs"].update(cfg=1.0, steps=4)
    compiled = import_graph(g, name="x", models_dir=models, catalog=catalog).workflow
    assert not [n for n, wf in catalog.workflows.items() if same_definition(wf, compiled)]  # the premise
    source = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    _upload(gateway, keys["alice"], "fox.png", encode_png(source))
    with Client(gateway.broker) as client:
        before = {w.name for w in client.workflows()}
        actors_before = sorted((a.actor_id, a.model) for a in client.stats().actors)
    answer, messages = asyncio.run(_watch(gateway, keys["alice"], {"prompt": g}))
    assert any(m["type"] == "execution_success" for m in messages), messages
    history = request(gateway, "GET", f"/history/{answer['prompt_id']}", key=keys["alice"])[2][answer["prompt_id"]]
    (image,) = history["outputs"]["9"]["images"]
    status, _, png = request(gateway, "GET", f"/view?filename={image['filename']}&type=output", key=keys["alice"])
    assert status == 200
    assert np.array_equal(png_pixels(png), img2img_nocfg_reference(root, source))

    with Client(gateway.broker) as client:
        infos = {w.name: w for w in client.workflows()}
        stats = client.stats()
    assert len(set(infos) - before) == 1, sorted(set(infos) - before)
    (name,) = set(infos) - before
    assert name.startswith("comfy-") and infos[name].registered and not infos[SERVED].registered
    assert infos[name].models == ["tiny-sd15-clip", "tiny-sd15-unet", "tiny-sd15-vae"]
    assert sorted((a.actor_id, a.model) for a in stats.actors) == actors_before  # no actor of its own
    for model in infos[name].models:  # its tasks ran on the models' shared actors, beside the other workflows'
        (model_stats,) = [m for m in stats.models if m.model == model]
        assert name in model_stats.workflows, (model, model_stats.workflows)

    # the same structure with other literals: the cached registration, one workflow per structure
    again = copy.deepcopy(g)
    again["3"]["inputs"]["seed"] = 7
    again["6"]["inputs"]["text"] = "a cat"
    answer, messages = asyncio.run(_watch(gateway, keys["alice"], {"prompt": again}))  # her upload
    assert any(m["type"] == "execution_success" for m in messages)
    with Client(gateway.broker) as client:
        assert {w.name for w in client.workflows()} - before == {name}


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_history_view_queue_object_info_system_stats_and_upload_answer_in_comfyuis_shape(served):
    gateway, keys, _ = served
    answer, _ = asyncio.run(_watch(gateway, keys["alice"], {"prompt": titled(graph(GRAPH)), "extra_data": {"a": 1}}))
    pid = answer["prompt_id"]
    status, _, history = request(gateway, "GET", f"/history/{pid}", key=keys["alice"])
    assert status == 200 and list(history) == [pid]
    entry = history[pid]
    number, prompt_id, sent, extra, outputs = entry["prompt"]
    assert (number, prompt_id, extra, outputs) == (answer["number"], pid, {"a": 1}, ["9"])
    assert sent == titled(graph(GRAPH))
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    (image,) = entry["outputs"]["9"]["images"]
    assert set(image) == {"filename", "subfolder", "type"} and image["type"] == "output"
    status, _, everything = request(gateway, "GET", "/history?max_items=100", key=keys["alice"])
    assert pid in everything and all(v["status"]["status_str"] for v in everything.values())
    assert request(gateway, "GET", f"/history/{pid}", key=keys["bob"])[2] == {}  # another key's prompt
    assert request(gateway, "GET", "/history/no-such-prompt", key=keys["alice"])[2] == {}
    assert request(gateway, "GET", "/api/history/" + pid, key=keys["alice"])[2] == history  # the /api/ twin

    status, _, body = request(gateway, "GET", f"/view?filename={image['filename']}&type=output", key=keys["alice"])
    assert status == 200 and body.startswith(b"\x89PNG")
    for query in ("filename=../../etc/passwd&type=output", "filename=passwd&subfolder=../../etc&type=input",
                  "filename=x.png&subfolder=/etc&type=output", "filename=..%2Fkeys.txt&type=input"):
        status, _, _ = request(gateway, "GET", f"/view?{query}", key=keys["alice"])
        assert status == 403, query
    assert request(gateway, "GET", "/view?filename=nothing.png&type=output", key=keys["alice"])[0] == 404

    status, _, queue = request(gateway, "GET", "/queue", key=keys["alice"])
    assert status == 200 and queue == {"queue_running": [], "queue_pending": []}
    status, _, _ = request(gateway, "POST", "/interrupt", raw=b"", key=keys["alice"])
    assert status == 200

    status, _, info = request(gateway, "GET", "/object_info", key=keys["alice"])
    assert status == 200 and {"KSampler", "CheckpointLoaderSimple", "SaveImage", "LoadImage"} <= set(info)
    sampler = info["KSampler"]
    assert sampler["input"]["required"]["steps"][0] == "INT" and sampler["input"]["required"]["model"] == ["MODEL", {}]
    assert "euler" in sampler["input"]["required"]["sampler_name"][0] and sampler["output"] == ["LATENT"]
    assert "diffusers" in sampler["description"] and "not ComfyUI" in sampler["description"]
    assert "tiny_sd15" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert info["SaveImage"]["output_node"] is True
    assert request(gateway, "GET", "/object_info/KSampler", key=keys["alice"])[2] == {"KSampler": sampler}
    status, _, stats = request(gateway, "GET", "/system_stats", key=keys["alice"])
    assert status == 200 and stats["system"]["ram_total"] > 0 and isinstance(stats["devices"], list)

    # upload: a multipart `image` field, then the file is a LoadImage choice and viewable
    png = _png(8, 8)
    boundary = "xxBOUNDARYxx"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"edges.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"subfolder\"\r\n\r\nmine\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, up = request(gateway, "POST", "/upload/image", raw=form, headers=headers, key=keys["alice"])
    assert status == 200 and up == {"name": "edges.png", "subfolder": "mine", "type": "input"}
    status, _, again = request(gateway, "POST", "/upload/image", raw=form, headers=headers, key=keys["alice"])
    assert again["name"] == "edges (1).png"  # no overwrite unless asked
    status, _, body = request(gateway, "GET", "/view?filename=edges.png&subfolder=mine&type=input", key=keys["alice"])
    assert status == 200 and body == png
    assert request(gateway, "GET", "/view?filename=edges.png&subfolder=mine&type=input", key=keys["bob"])[0] == 404
    choices = request(gateway, "GET", "/object_info/LoadImage", key=keys["alice"])[2]["LoadImage"]
    assert "mine/edges.png" in choices["input"]["required"]["image"][0]
    assert choices["input"]["required"]["image"][1] == {"image_upload": True}
    evil = form.replace(b'filename="edges.png"', b'filename="x.png"').replace(b"\r\n\r\nmine\r\n", b"\r\n\r\n../..\r\n")
    assert request(gateway, "POST", "/upload/image", raw=evil, headers=headers, key=keys["alice"])[0] == 400


def _png(width: int, height: int) -> bytes:
    from clients.results import encode_png

    return encode_png(np.full((height, width, 3), 200, np.uint8))


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_key_is_required_basic_and_bearer_both_accepted(served):
    gateway, keys, _ = served
    for path in ("/queue", "/history", "/object_info", "/system_stats", "/view?filename=a.png"):
        assert request(gateway, "GET", path)[0] == 401, path
        assert request(gateway, "GET", path, headers=basic("usr-" + "0" * 32))[0] == 401, path
        assert request(gateway, "GET", path, headers={"Authorization": "Basic !!!"})[0] == 401, path
    assert request(gateway, "POST", "/prompt", {"prompt": graph(GRAPH)})[0] == 401
    assert request(gateway, "GET", "/queue", headers=basic(keys["alice"]))[0] == 200
    assert request(gateway, "GET", "/queue", headers=basic(keys["bob"], user=""))[0] == 200
    assert request(gateway, "GET", "/queue", key=keys["alice"])[0] == 200
    assert request(gateway, "GET", "/healthz")[0] == 200  # the gateway's public routes stay public

    async def connect(url: str, headers: dict | None = None) -> int:
        async with aiohttp.ClientSession(headers=headers) as session:
            try:
                async with session.ws_connect(url) as ws:
                    message = await ws.receive_json(timeout=10)
                    assert message["type"] == "status"
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(connect(f"{gateway.url}/ws?clientId=a")) == 401
    assert asyncio.run(connect(f"{gateway.url}/ws?clientId=a&token=usr-{'0' * 32}")) == 401
    assert asyncio.run(connect(f"{gateway.url}/ws?clientId=a&token={keys['alice']}")) == 101
    assert asyncio.run(connect(f"{gateway.url}/ws?clientId=a", basic(keys["alice"]))) == 101


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_interrupt_cancels_the_running_prompt_and_the_socket_says_so(served):
    gateway, keys, _ = served
    long = titled(graph(GRAPH))
    long["3"]["inputs"]["steps"] = 100

    async def run() -> tuple[str, dict, list[dict]]:
        client_id = uuid.uuid4().hex
        auth = {"Authorization": f"Bearer {keys['alice']}"}
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.ws_connect(f"{gateway.url}/ws?clientId={client_id}") as ws:
                async with session.post(f"{gateway.url}/prompt", json={"prompt": long, "client_id": client_id}) as r:
                    pid = (await r.json())["prompt_id"]
                messages, queue = [], None
                while True:
                    message = await ws.receive_json(timeout=120)
                    messages.append(message)
                    if message["type"] == "progress" and queue is None:
                        async with session.get(f"{gateway.url}/queue") as r:
                            queue = await r.json()
                        async with session.post(f"{gateway.url}/interrupt") as r:
                            assert r.status == 200
                    if message["type"] == "executing" and message["data"]["node"] is None:
                        return pid, queue, messages

    pid, queue, messages = asyncio.run(run())
    assert [entry[1] for entry in queue["queue_running"]] == [pid] and queue["queue_pending"] == []
    kinds = [m["type"] for m in messages]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds
    steps = [m["data"]["value"] for m in messages if m["type"] == "progress"]
    assert 1 <= len(steps) < 100
    history = request(gateway, "GET", f"/history/{pid}", key=keys["alice"])[2][pid]
    assert history["status"]["status_str"] == "error" and history["outputs"] == {}


def test_the_gateway_takes_the_comfy_settings_as_flags():
    from broker.config import load_config
    from clients.gateway.config import GatewayConfig
    from clients.gateway.server import build_parser

    args = build_parser().parse_args(["--comfy-models-dir", "/models", "--comfy-catalog", "a.toml",
                                      "--comfy-input-dir", "/in"])
    cli = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    config = load_config(GatewayConfig, "gateway", None, cli, environ={})
    assert (config.comfy_models_dir, config.comfy_catalog, config.comfy_input_dir) == ("/models", "a.toml", "/in")


def test_the_openapi_document_covers_comfyuis_routes_when_they_are_on(tiny, tmp_path):
    from clients.gateway.app import build_app
    from clients.gateway.config import GatewayConfig
    from clients.gateway.keys import KeyRing
    from clients.gateway.openapi import openapi_document

    _, catalog_path, _, models = tiny
    config = GatewayConfig(comfy_models_dir=str(models), comfy_catalog=str(catalog_path),
                           comfy_input_dir=str(tmp_path / "input"))
    app = build_app(config, KeyRing.parse("admin 0123456789abcdef0123"))
    routes = app_routes(app)
    document = openapi_document(comfy=True)
    assert routes == {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert {"/prompt", "/api/prompt", "/ws", "/api/view"} <= set(document["paths"])
    assert "/prompt" not in openapi_document()["paths"]  # off: not documented


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_the_served_openapi_json_lists_comfyuis_routes(served):
    gateway, _, _ = served
    status, _, document = request(gateway, "GET", "/openapi.json")
    assert status == 200 and "ComfyUI" in document["paths"]["/prompt"]["post"]["summary"]
    assert "/api/history/{prompt_id}" in document["paths"]
