"""One batch on the actor's compute thread: inputs in, the backend's run, DONE out.

Runs in the actor process, on the compute thread, which owns the work DEALER it is
handed (receiving a batch and answering it on the thread that computes it keeps
thread hand-offs off the per-task path). Owns no socket of its own: inputs held by
peers come through the fetcher (actors/fetcher.py), and outputs the broker did not
ask back stay in the store (actors/store.py) for the data thread to serve.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
import zmq

from actors import cuda_ipc
from actors.fetcher import Fetcher, InputUnavailable
from actors.store import Bundle, TensorStore, bundle_nbytes, pack_bundle, unpack_bundle
from broker import protocol as p
from broker.protocol.errors import ErrorCode
from broker.protocol.tasks import KINDS_WITHOUT_CONSTANTS

log = structlog.get_logger(__name__)


class BatchRunner:
    def __init__(self, *, actor_id: str, backend: Any, store: TensorStore, fetcher: Fetcher,
                 telemetry: p.ActorTelemetry):
        self.actor_id = actor_id
        self.backend = backend
        self.store = store
        self.fetcher = fetcher
        self.telemetry = telemetry  # shared with the heartbeat thread, which reads it

    def run(self, epoch: int, batch: p.Tasks, payload: list, work: zmq.Socket) -> None:
        """Run a batch of session `epoch` and answer it on `work`: DONE, or BATCH_FAILED."""
        bound = log.bind(actor_id=self.actor_id, batch_id=batch.batch_id)
        started = time.perf_counter()
        tasks, inputs, missing = self._resolve_inputs(batch.tasks, payload)
        missing_reason = "; ".join(sorted(set(missing.values())))[:500]
        if missing:
            bound.warning("inputs_unavailable", task_ids=sorted(missing), reason=missing_reason)
        try:
            outputs = self.backend.run(tasks, inputs) if tasks else []
            if len(outputs) != len(tasks):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(tasks)} tasks")
        except Exception as exc:
            bound.exception("batch_failed", task_ids=[t.task_id for t in batch.tasks])
            self._report_failure(work, batch, ErrorCode.TASK_ERROR, f"{type(exc).__name__}: {exc}", bound)
            return
        exec_s = time.perf_counter() - started
        results, payload = [], []
        for task, bundle in zip(tasks, outputs, strict=True):
            # A step's conditioning, made or used here, is held here: when the request's
            # steps come back from a peer, theirs need not travel again.
            self.fetcher.constants.keep(task.request_id, bundle)
            nbytes = bundle_nbytes(bundle)
            if task.return_output:
                descs, buffers = pack_bundle(bundle, first_frame=len(payload))
                payload.extend(buffers)
                results.append(p.TaskResult(task.task_id, task.attempt, task.output_id, nbytes, descs))
            else:
                if not self.store.put(task.output_id, bundle, epoch, ready=cuda_ipc.record_ready(bundle)):
                    return  # the session ended meanwhile; the broker re-queued this batch
                results.append(p.TaskResult(task.task_id, task.attempt, task.output_id, nbytes))
        t = self.telemetry
        t.batches += 1
        t.tasks += len(tasks)
        t.rows += sum(task.rows for task in tasks)
        t.busy_s += exec_s
        t.memory_used_bytes = getattr(self.backend, "peak_bytes", t.memory_used_bytes)
        done = p.BatchDone(batch.batch_id, results, exec_s, 1, sorted(missing), missing_reason)
        work.send_multipart([b"", *p.encode(done, payload)], copy=False)

    def _report_failure(self, work, batch: p.Tasks, code: ErrorCode, message: str, bound) -> None:
        bound.warning("batch_not_done", code=code.value, error=message)
        msg = p.BatchFailed(batch.batch_id, [t.task_id for t in batch.tasks], [t.attempt for t in batch.tasks], code.value, message, 1)
        work.send_multipart([b"", *p.encode(msg)])

    def _resolve_inputs(self, tasks: list[p.TaskSpec], payload: list):
        """(runnable tasks, their input bundles, {task_id: why} for tasks lacking an input).

        A task's own client tensors (an img2img image, carried in the batch's payload)
        come last among its inputs.

        One task's missing input (its request was cancelled, its holder died) must not
        cost the other requests of the batch their step.
        """
        fetched: dict[tuple[str, bool], Bundle] = {}
        runnable, resolved, missing = [], [], {}
        for task in tasks:
            reads_constants = task.kind not in KINDS_WITHOUT_CONSTANTS
            try:
                bundles = []
                for ref in task.inputs:
                    if ref.holder == self.actor_id:
                        bundle = self.store.get(ref.tensor_id)
                    else:
                        key = (ref.tensor_id, reads_constants)
                        bundle = fetched.get(key) or self.fetcher.fetch(ref, task.request_id,
                                                                        constants=reads_constants)
                        fetched[key] = bundle
                    if bundle is None:
                        raise InputUnavailable(f"{ref.tensor_id} is not in this actor's store")
                    bundles.append(bundle)
                if task.tensors:
                    bundles.append(unpack_bundle(task.tensors, payload, as_torch=self.backend.tensor_kind == "torch"))
            except InputUnavailable as exc:
                missing[task.task_id] = str(exc)
                continue
            runnable.append(task)
            resolved.append(bundles)
        return runnable, resolved, missing
