"""A validated request unrolled into its DAG of node plans: pure functions.

One encode node per text encoder, one denoise node per step (or two CFG branch nodes
and a combine), ControlNet nodes, one VAE decode node. Sampler state and the prompt
conditioning travel with the latent, so any actor of the base model can take the next
step.
"""

from __future__ import annotations

import dataclasses

from broker.catalog.params import img2img_runs
from broker.catalog.specs import NodePlan, WorkflowSpec, control_suffixes
from broker.protocol.tasks import (
    ControlImageParams,
    ControlParams,
    DecodeParams,
    DenoiseBranchParams,
    DenoiseParams,
    EncodeImageParams,
    EncodeParams,
    PipelineParams,
    StepParams,
    TaskKind,
)


def unroll_monolith(workflow: WorkflowSpec, params: dict, pipeline: str) -> list[NodePlan]:
    """The whole request as one node on a monolith (`pipeline`): no sharing, no
    decomposition; the baseline that micro-serving is measured against."""
    shape = (params["height"], params["width"])
    node = NodePlan("pipeline", TaskKind.PIPELINE, pipeline, 1, shape, PipelineParams(workflow.name, dict(params)), [],
                    1, return_output=True)
    return [node]


def unroll(workflow: WorkflowSpec, params: dict, cfg_split: bool = False, tensors=None) -> list[NodePlan]:
    """The request's DAG, producers before consumers. `params` must be validated.

    `cfg_split` (CFG workflows): each step becomes two branch nodes, the unconditional
    and the conditional model call (one row each, meant for two actors), and a
    `denoise` node that combines them (guidance and the sampler update).

    ControlNets: a `control_image` node per net prepares its control image (on the
    net's actors: canny on the CPU, scaling, the CFG rows), then a `control` node per
    step in the net's [control_start, control_end) range, on the latent the step starts
    from; the step sums their residuals in the workflow's net order, as diffusers'
    MultiControlNetModel does. Outside its range a net has no node at all: the pipeline
    runs it with scale 0, which adds exact zeros. `tensors`: the names of the request's
    tensor inputs (None: the required ones), since an optional control image may be absent.
    """
    steps = params["steps"]
    shape = (params["height"], params["width"])
    rows = 2 if workflow.cfg else 1
    # img2img runs the last steps x strength steps of the schedule, from the noised image
    runs = img2img_runs(workflow.family, steps, params["strength"]) if workflow.img2img else steps
    first_step = steps - runs
    adapters = params.get("loras") or ()  # the request's LoRA set: text encoders' (where it has layers) and the base model's
    seed, sampler = params["seed"], params["sampler"]
    guidance = params["guidance"] if workflow.cfg else None
    distilled = params["guidance"] if workflow.distilled_guidance else None
    begin_index = first_step if workflow.img2img else None
    nodes = []
    for enc in workflow.text_encoders:
        negative = params["negative_prompt"] if workflow.cfg else None
        nodes.append(NodePlan(f"encode/{enc}", TaskKind.ENCODE, enc, rows, shape,
                              EncodeParams(params["prompt"], negative, adapters), [], 0))
    previous = [n.key for n in nodes]
    image_nodes, controls = _control_plans(workflow, params, rows, shape, tensors)
    nodes += image_nodes
    if workflow.img2img:
        nodes.append(NodePlan("encode_image", TaskKind.ENCODE_IMAGE, workflow.vae, 1, shape,
                              EncodeImageParams(params["seed"]), [], 0))
        previous.append("encode_image")
    for k in range(runs):
        # `step` indexes the scheduler's timesteps; `first` marks where the latents start
        # StepParams' fields in their order: every task of the step starts from them
        step = (first_step + k, steps, k == 0, seed, sampler, guidance, distilled, begin_index)
        key = f"denoise/{k}"
        residuals = []
        for net, (start, end), image, scale, index in controls:  # on the latent this step starts from
            if k / runs < start or (k + 1) / runs > end:  # the pipeline's controlnet_keep = 0
                continue
            residuals.append(f"control/{net}/{k}")
            # `lead`: the workflow's first net, whose config the SD3 pipeline applies to all of its nets;
            # no adapters: the request's LoRA set is the base model's, not the net's
            control = ControlParams(*step, scale=scale, denoiser=workflow.denoiser, vae=workflow.vae,
                                    index=index, lead=workflow.controlnets[0])
            nodes.append(NodePlan(residuals[-1], TaskKind.CONTROL, net, rows, shape, control,
                                  previous + ([image] if image else []), 0, step=k))
        if k == 0 and workflow.family == "flux" and image_nodes:
            residuals.append("control_images")  # Flux draws its initial latents after the images' samples
        previous = previous + residuals
        split = cfg_split and workflow.cfg
        if split:
            branches = [f"branch/{k}/{b}" for b in (0, 1)]  # 0: unconditional, 1: conditional
            for b, branch in enumerate(branches):
                nodes.append(NodePlan(branch, TaskKind.DENOISE_BRANCH, workflow.denoiser, 1, shape,
                                      DenoiseBranchParams(*step, adapters, branch=b), previous, 0,
                                      step=k, group=f"cfg/{k}"))
            previous = branches + previous
        nodes.append(NodePlan(key, TaskKind.DENOISE, workflow.denoiser, rows, shape,
                              DenoiseParams(*step, adapters, split), previous, 0, step=k))
        previous = [key]
    if params.get("output") == "latents":
        nodes[-1].return_output = True  # the last step's latents are the result
    else:
        nodes.append(NodePlan("decode", TaskKind.DECODE, workflow.vae, 1, shape, DecodeParams(), previous, 1,
                              return_output=True))
    _set_path_lengths(nodes)
    return nodes


LATENT_CONTROL_FAMILIES = ("sd3", "flux")  # their ControlNets take the control image VAE-encoded


def _control_plans(workflow: WorkflowSpec, params: dict, rows: int, shape: tuple[int, int],
                   tensors) -> tuple[list[NodePlan], list[tuple]]:
    """The control-image nodes, and per ControlNet (net, (start, end), the key of the node
    holding its image or None, scale, the image's index in that node's output).

    SD 1.5 / SDXL nets take pixels: one node per net on the net's own actors. SD3 and Flux
    nets take the image VAE-encoded: one node on the workflow's VAE encodes every net's
    image in net order from one generator seeded with the request's seed (the pipelines
    draw those samples one after another: SD3 from torch's global generator, Flux from
    the request's own, which then draws the initial latents)."""
    nets, images = [], []
    latent = workflow.family in LATENT_CONTROL_FAMILIES
    for net, s in zip(workflow.controlnets, control_suffixes(len(workflow.controlnets)), strict=True):
        name = f"control_image{s}"
        present = workflow.inputs[name].required if tensors is None else name in tensors
        key, index = None, 0
        if present and latent:
            key, index = "control_images", len(images)
        elif present:
            key = f"control_image/{net}"
        if present:
            images.append((net, key, name, params[f"control_preprocess{s}"]))
        nets.append((net, (params[f"control_start{s}"], params[f"control_end{s}"]), key, params[f"control_scale{s}"],
                     index))
    if latent and images:
        node_params = ControlImageParams([name for _, _, name, _ in images], [pre for _, _, _, pre in images],
                                         params["seed"])
        return [NodePlan("control_images", TaskKind.CONTROL_IMAGE, workflow.vae, rows, shape, node_params, [], 0)], nets
    return [NodePlan(key, TaskKind.CONTROL_IMAGE, net, rows, shape, ControlImageParams([name], [pre]), [], 0)
            for net, key, name, pre in images], nets


# The step tuple above is StepParams' fields in order: checked once, at import.
if tuple(f.name for f in dataclasses.fields(StepParams)) != (
        "step", "steps", "first", "seed", "sampler", "guidance", "distilled_guidance", "begin_index"):
    raise RuntimeError("unroll's step tuple no longer matches StepParams")


def _set_path_lengths(nodes: list[NodePlan]) -> None:
    """Each node's longest path to the output, counting itself (the output node: 1)."""
    longest = {}
    for node in reversed(nodes):  # consumers come after their producers
        longest.setdefault(node.key, 1)
        node.path_len = longest[node.key]
        for producer in node.inputs:
            longest[producer] = max(longest.get(producer, 1), node.path_len + 1)
