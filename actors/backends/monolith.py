"""The emulated monolith: whole workflows on one device, request after request.

This is the baseline micro-serving is measured against, in the same runtime: what a
diffusers pipeline behind a per-GPU queue does. One request at a time (the broker
gives a monolith one task at a time), every model of the workflow called in order,
CFG as one batch-2 call per step, no sharing of models between workflows (each
hosted workflow holds its own copy of every model), no batching across requests.
Its time is the sum of the workflow's node times from the measured profiles, so it
replays exactly the work micro-serving decomposes.

An actor named `pipeline/A+B+C` hosts several workflows (the Clockwork-style
baseline): as many as fit in `gpu_memory_gib` stay resident, least recently used
first out, and a request for one that is not resident waits for its models' load
time from the profiles (disk to host to GPU).

Runs in an actor process; imports no torch.
"""

from __future__ import annotations

import collections
import time

from actors.backends.emulated import content_digest, render_image
from actors.backends.emulated_gpu import EmulatedGpu
from actors.store import Bundle, RawTensor
from broker.catalog import PipelineSpec, WorkflowSpec
from broker.costs.model import CostModel
from broker.protocol.messages import TaskSpec


class MonolithBackend:
    tensor_kind = "raw"

    def __init__(self, model: PipelineSpec, device: str, options: dict):
        if getattr(model, "kind", "") != "pipeline":
            raise ValueError(f"model: the monolith backend serves pipeline/WORKFLOW models, got {model.name!r}")
        self.spec = model
        self.device = device
        self.time_scale = float(options.get("time_scale", 1.0))
        self.load_time_scale = float(options.get("load_time_scale", 0.0))
        self.budget_bytes = int(float(options.get("gpu_memory_gib", 80.0)) * 1024**3)
        self.costs = CostModel(model.catalog)
        for workflow in model.workflows:
            if not self.costs.knows(workflow):
                raise ValueError(f"model: workflow {workflow.name} has a model without a profile: cannot emulate it")
            if self.footprint(workflow) > self.budget_bytes:
                raise ValueError(f"options.gpu_memory_gib: {workflow.name} needs {self.footprint(workflow)} bytes")
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # workflow -> bytes, LRU first
        self.loads = 0
        self.gpu = EmulatedGpu(options.get("device_lock", ""), options.get("device_sharing", "shared"))

    def footprint(self, workflow: WorkflowSpec) -> int:
        return sum(self.costs.resident_bytes(m) for m in workflow.models)

    def memory_bytes(self) -> int:
        return sum(self.resident.values())

    def load(self) -> None:
        self._make_resident(self.spec.workflows[0])

    def _make_resident(self, workflow: WorkflowSpec) -> float:
        """Seconds spent loading `workflow`'s models (0 when resident)."""
        if workflow.name in self.resident:
            self.resident.move_to_end(workflow.name)
            return 0.0
        need = self.footprint(workflow)
        while self.resident and self.memory_bytes() + need > self.budget_bytes:
            self.resident.popitem(last=False)
        seconds = sum(self.costs.load_s(m) for m in workflow.models) * self.load_time_scale
        time.sleep(seconds)  # copying weights in: the GPU's compute stays free for others
        self.resident[workflow.name] = need
        self.loads += 1
        return seconds

    def run(self, tasks: list[TaskSpec], inputs: list[list[Bundle]]) -> list[Bundle]:
        return [self._run_one(task) for task in tasks]

    def _run_one(self, task: TaskSpec) -> Bundle:
        workflow = next((w for w in self.spec.workflows if w.name == task.workflow), None)
        if workflow is None:
            raise ValueError(f"workflow: {self.spec.name} does not host {task.workflow!r}")
        self._make_resident(workflow)  # a request for a cold workflow waits for its load
        started = time.perf_counter()
        request = task.params.request  # the request's own parameters (PipelineParams)
        cost = self.costs.request(workflow, request)  # every node in order, CFG as batch 2
        self.gpu.compute(cost.work_s * self.time_scale - (time.perf_counter() - started))
        height, width = task.shape
        digest = content_digest(workflow.name, request.get("prompt", ""), request.get("seed", 0))
        image = render_image(digest, height, width)
        return {"image": RawTensor("uint8", image.shape, image)}
